"""DeepSpeed JSON: load a template from ``ds_configs/`` and merge in what the run decides.

Ownership of keys (one rule, applied by :func:`merge_ds_config`):

* **Run-dependent** keys are filled from the config tree when the template leaves them out or sets them
  to ``"auto"``: ``train_micro_batch_size_per_gpu`` (role ``micro_batch_size``),
  ``gradient_accumulation_steps`` and ``train_batch_size`` (DeepSpeed's batch identity
  ``train_batch_size = micro * accumulation * dp``), ``bf16.enabled`` (``precision``), and for trainable
  roles ``optimizer.params.lr / betas / weight_decay`` (role ``lr``, ``adam_betas``, ``weight_decay``) and
  ``optimizer.params.torch_adam`` (true on CPU without optimizer offload, where DeepSpeed's fused Adam
  would need a ~95 s compile).
* Every other key is **user-owned** and passes through untouched (ZeRO stage and offload, buckets,
  ``gradient_clipping``, ``optimizer.params.eps``, a ``scheduler`` section...). A user's explicit value
  for a run-dependent key also wins over the config tree.
* Inference-only roles (reference, reward) drop ``optimizer`` and ``scheduler``: they never step.

DeepSpeed's ``train_batch_size`` is bookkeeping here: the training step sets the accumulation boundary
itself and scales the loss for sum semantics (``engine.step``), so the true mini-batch is
``algo.mini_batch_size`` even when it is not a multiple of ``micro * dp``.

The run's batch arithmetic (the mini-batch splits evenly over the ranks) is a config rule, checked once
by the validator in rlhf_ds/config.py; this module trusts it.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from rlhf_ds.choices import PRECISIONS, ROLES, TRAINABLE_ROLES

AUTO = "auto"
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_ds_config_path(path: str) -> Path:
    """An absolute path, a path relative to the working directory, or one relative to the repo root
    (so ``ds_configs/zero3_train.json`` works from anywhere)."""
    candidates = [Path(path)] if os.path.isabs(path) else [Path.cwd() / path, REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = sorted(p.name for p in (REPO_ROOT / "ds_configs").glob("*.json"))
    raise FileNotFoundError(f"ds_config {path!r} not found (looked in {[str(c) for c in candidates]}); "
                            f"shipped templates: {shipped}")


def load_template(path: str) -> dict:
    resolved = resolve_ds_config_path(path)
    with open(resolved) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"ds_config {resolved}: invalid JSON: {err}") from err


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """'auto' -> bf16 on GPU, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid: {list(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision


def _is_auto(section: dict, key: str) -> bool:
    return section.get(key, AUTO) == AUTO


def _fill(section: dict, key: str, value: Any) -> None:
    if _is_auto(section, key):
        section[key] = value


def accumulation_steps(per_rank_batch: int, micro_batch_size: int) -> int:
    """Micro-batches of one rank's share of a mini-batch (the last one may be short)."""
    return max(1, math.ceil(per_rank_batch / micro_batch_size))


def _merge_batch_sizes(ds: dict, micro: int, per_rank_batch: int, dp: int, where: str) -> None:
    _fill(ds, "train_micro_batch_size_per_gpu", micro)
    micro = ds["train_micro_batch_size_per_gpu"]
    if _is_auto(ds, "gradient_accumulation_steps"):
        if not _is_auto(ds, "train_batch_size"):
            total = ds["train_batch_size"]
            if total % (micro * dp):
                raise ValueError(f"{where}: train_batch_size={total} is not a multiple of "
                                 f"train_micro_batch_size_per_gpu={micro} x dp={dp}")
            ds["gradient_accumulation_steps"] = total // (micro * dp)
        else:
            ds["gradient_accumulation_steps"] = accumulation_steps(per_rank_batch, micro)
    _fill(ds, "train_batch_size", micro * ds["gradient_accumulation_steps"] * dp)
    check_batch_identity(ds, dp, where)


def check_batch_identity(ds: dict, dp: int, where: str = "ds_config") -> None:
    """DeepSpeed refuses a config whose batch sizes disagree; say so with the numbers first."""
    micro, gas, total = (ds[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                             "train_batch_size"))
    if micro * gas * dp != total:
        raise ValueError(f"{where}: train_batch_size={total} != train_micro_batch_size_per_gpu={micro} x "
                         f"gradient_accumulation_steps={gas} x dp={dp}")


def _merge_optimizer(ds: dict, role_cfg: Any, on_gpu: bool) -> None:
    optimizer = ds.setdefault("optimizer", {"type": "AdamW"})
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", float(role_cfg.lr))
    _fill(params, "betas", [float(b) for b in role_cfg.adam_betas])
    _fill(params, "weight_decay", float(role_cfg.weight_decay))
    # DeepSpeed reads torch_adam from optimizer.params only; one written beside "type" is silently ignored
    # (and a CPU run then JIT-compiles DeepSpeed's fused Adam), so it is moved where DeepSpeed looks.
    if "torch_adam" in optimizer:
        params.setdefault("torch_adam", optimizer.pop("torch_adam"))
    offloaded = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none") != "none"
    if _is_auto(params, "torch_adam"):
        if on_gpu or offloaded:
            params.pop("torch_adam", None)  # DeepSpeed picks FusedAdam (GPU) / DeepSpeedCPUAdam (offload)
        else:
            params["torch_adam"] = True
    if _is_auto(params, "fused"):
        # torch's AdamW runs ZeRO-3's flat fp32 partition through a dozen whole-tensor passes and temporaries
        # per step unless fused (one pass; 21 -> 4 ms for 6.3 M parameters on 2 cores). DeepSpeed's own
        # Adams (FusedAdam, DeepSpeedCPUAdam) are fused already and take no such argument.
        if params.get("torch_adam") is True:
            params["fused"] = True
        else:
            params.pop("fused")


def _find_auto(node: Any, path: str = "") -> list[str]:
    if node == AUTO:
        return [path or "<root>"]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    return []


def merge_ds_config(template: dict, *, role: str, role_cfg: Any, precision: str, dp_size: int,
                    mini_batch_size: Optional[int], on_gpu: bool) -> dict:
    """The DeepSpeed config one role runs with. Pure: returns a new dict.

    template: parsed JSON; role: actor | critic | reference | reward; role_cfg: the role's section of the
    config tree; precision: auto | fp32 | bf16; mini_batch_size: sequences per optimizer step over all
    ranks, a multiple of ``dp_size`` (trainable roles; ignored for inference roles).
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r}; valid: {list(ROLES)}")
    where = f"{role}.ds_config"
    ds = copy.deepcopy(template)
    trainable = role in TRAINABLE_ROLES
    micro = int(role_cfg.micro_batch_size)
    if trainable:
        if mini_batch_size is None:
            raise ValueError(f"role={role!r} takes optimizer steps: pass its mini_batch_size")
        per_rank = mini_batch_size // dp_size
    else:
        per_rank = micro
        for key in ("optimizer", "scheduler"):
            ds.pop(key, None)
    _merge_batch_sizes(ds, micro, per_rank, dp_size, where)
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", resolve_precision(precision, on_gpu) == "bf16")
    if trainable:
        _merge_optimizer(ds, role_cfg, on_gpu)
    left = _find_auto(ds)
    if left:
        raise ValueError(f"{where}: keys {left} are 'auto' but are not filled from the config tree; "
                         f"set them explicitly")
    return ds


def role_ds_config(cfg: Any, role: str, dp_size: int, on_gpu: bool) -> dict:
    """Load the role's template (``cfg.<role>.ds_config``) and merge it with the config tree."""
    role_cfg = getattr(cfg, role)
    template = load_template(role_cfg.ds_config)
    return merge_ds_config(template, role=role, role_cfg=role_cfg, precision=cfg.precision,
                           dp_size=dp_size, mini_batch_size=cfg.algo.mini_batch_size, on_gpu=on_gpu)


def write_ds_config(ds: dict, output_dir: str | os.PathLike, role: str) -> Path:
    """Save what ran as ``<output_dir>/ds_config_<role>.json``."""
    path = Path(output_dir) / f"ds_config_{role}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds, indent=2, sort_keys=True) + "\n")
    return path
