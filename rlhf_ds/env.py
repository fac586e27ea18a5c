"""Which process this is among the ranks of a launch: the one place that reads ``RANK``.

Under the deepspeed launcher every process has ``RANK`` from the launcher; a Ray rank gets it from its
group before its worker is built (``ray_group.RankHost``); the Ray driver and a plain process have none
and count as rank 0.
"""
from __future__ import annotations

import os


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))
