#!/usr/bin/env python
"""Build a tiny model directory (causal LM, or value model with --value) from a preset and a seed.

    python scripts/build_tiny_models.py llama-arith                 # into the cache, prints the dir
    python scripts/build_tiny_models.py llama-arith --out /tmp/m    # into a chosen directory
    python scripts/build_tiny_models.py qwen2-arith --value --seed 3

Nothing is downloaded: the tokenizer and weights are made locally (rlhf_ds.models.tiny).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rlhf_ds.models.tiny import PRESETS, build_tiny_lm, resolve_model_path
from rlhf_ds.models.value_model import make_value_model_from_lm


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS), help="architecture preset")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: the tiny-model cache, "
                             "$RLHF_DS_CACHE or .cache/rlhf_ds)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    parser.add_argument("--value", action="store_true", help="build the value model (scalar head) instead")
    args = parser.parse_args(argv)
    if args.out is None:
        suffix = "-value" if args.value else ""
        out = Path(resolve_model_path(f"tiny:{args.preset}{suffix}", seed=args.seed))
    elif args.value:
        with tempfile.TemporaryDirectory() as lm_dir:
            build_tiny_lm(args.preset, lm_dir, seed=args.seed)
            out = make_value_model_from_lm(lm_dir, args.out)
    else:
        out = build_tiny_lm(args.preset, args.out, seed=args.seed)
    print(out)
    return out


if __name__ == "__main__":
    main()
