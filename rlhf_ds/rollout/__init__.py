"""Rollout engines (HF generate; the vLLM engine is not in this release yet) and actor -> engine weight sync."""
