"""Everything DeepSpeed: device/backend, config merge, engine build, sum-gradient step, gather,
checkpoint and the data-parallel metric combine. Submodules import DeepSpeed lazily where they can, so
``import rlhf_ds.engine`` stays cheap."""
