"""The loops (RL, and the SFT warm start), what a run logs, and run checkpoints."""
