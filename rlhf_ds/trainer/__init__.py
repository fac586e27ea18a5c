"""The loops (RL; the SFT and reward-model stages, and the cached SFT warm start of RL), what a run logs,
and run checkpoints."""
