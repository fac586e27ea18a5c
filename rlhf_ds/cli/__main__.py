"""`python -m rlhf_ds.cli ...` (how the deepspeed launcher starts each rank)."""
import sys

from rlhf_ds.cli import main

sys.exit(main())
