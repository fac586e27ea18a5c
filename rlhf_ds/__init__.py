"""rlhf_ds: DeepSpeed ZeRO-3 RLHF framework."""
__version__ = "0.1.0"
