"""Rollout engines (HF generate now; vLLM in its own issue) and actor -> engine weight sync."""
