"""Rollout engines (HF generate; the vLLM engine is not in this release yet), the engine contract
(``base.RolloutEngine``) and the assembly of samples into an Experience. The transports that carry
actor weights to the engines belong to the groups (``rlhf_ds.cluster``)."""
