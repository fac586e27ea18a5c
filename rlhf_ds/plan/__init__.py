"""`rlhf-ds plan`: whether a run fits, role by role and device by device, before anything is launched.

- ``shapes``: a model's parameter shapes from its HF config, built on the meta device (no weights);
- ``memory``: the arithmetic, pure: ZeRO-3 partitions, offload, activations, gathered parameters,
  rollout engines;
- ``planner``: a config -> every role's ranks -> devices -> totals against capacity -> a verdict;
- ``advice``: the config changes that would make a run fit, each re-planned, ranked by cost;
- ``report``: the text a user reads.
"""
