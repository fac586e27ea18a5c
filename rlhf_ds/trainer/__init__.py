"""The RL loop, the SFT warm start, logging and run checkpoints."""
