"""ds_configs/*.json and the one merge function: every shipped file loads, keeps its user-owned keys,
gets the run-dependent ones from the config tree, and passes DeepSpeed's own batch-size check."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from rlhf_ds.config import load_config
from rlhf_ds.engine.build import lr_factor
from rlhf_ds.engine.ds_config import (REPO_ROOT, load_template, merge_ds_config, resolve_precision,
                                      role_ds_config, write_ds_config)
from rlhf_ds.engine.step import NonFiniteStepError, SkipCounter

SHIPPED = sorted((REPO_ROOT / "ds_configs").glob("*.json"))


def deepspeed_accepts(ds: dict, dp: int) -> None:
    """DeepSpeed's own parser, with a stand-in for the data-parallel group size."""
    from deepspeed.runtime import config as ds_runtime_config
    mpu = SimpleNamespace(get_data_parallel_world_size=lambda: dp, get_model_parallel_world_size=lambda: 1,
                          get_sequence_parallel_world_size=lambda: 1)
    # Without a process group DeepSpeed falls back to world size 1 before asking the mpu.
    with mock.patch.object(ds_runtime_config.dist, "get_rank", return_value=0):
        parsed = ds_runtime_config.DeepSpeedConfig(json.loads(json.dumps(ds)), mpu=mpu)
    assert parsed.world_size == dp
    assert parsed.train_batch_size == parsed.train_micro_batch_size_per_gpu * parsed.gradient_accumulation_steps * dp


def cfg_for(template: Path, dp: int = 2, **extra):
    overrides = [f"actor.ds_config={template}", f"actor.num_ranks={dp}", "actor.micro_batch_size=4",
                 "algo.mini_batch_size=32", "actor.lr=3e-5", "actor.weight_decay=0.1",
                 "actor.adam_betas=[0.8,0.95]", f"reference.ds_config={template}",
                 "reference.model_path=tiny:llama-arith", "reference.micro_batch_size=8", "algo.kl_placement=loss",
                 "algo.kl_coef=0.01", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(None, overrides)


def test_templates_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"zero3_train.json", "zero3_offload_optimizer.json", "zero3_offload_all.json",
            "zero3_inference.json"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
@pytest.mark.parametrize("role", ["actor", "reference"])
@pytest.mark.parametrize("dp", [1, 2])
def test_every_template_merges_to_a_valid_config(path, role, dp):
    template = load_template(str(path))
    assert "gradient_clipping" in template, f"{path.name}: DeepSpeed silently defaults gradient_clipping to 1.0"
    assert template["zero_optimization"]["stage"] == 3
    cfg = cfg_for(path, dp)
    ds = role_ds_config(cfg, role, dp, on_gpu=False)
    deepspeed_accepts(ds, dp)
    micro = cfg.actor.micro_batch_size if role == "actor" else cfg.reference.micro_batch_size
    assert ds["train_micro_batch_size_per_gpu"] == micro
    if role == "actor":
        assert ds["gradient_accumulation_steps"] == 32 // dp // 4
        assert ds["train_batch_size"] == 32
        assert ds["optimizer"]["params"]["lr"] == 3e-5
        assert ds["optimizer"]["params"]["betas"] == [0.8, 0.95]
        assert ds["optimizer"]["params"]["weight_decay"] == 0.1
        # CPU: torch's AdamW, no fused-Adam compile (in params, where DeepSpeed reads it); with optimizer
        # offload DeepSpeed's CPU Adam runs the step
        offloaded = "offload_optimizer" in template["zero_optimization"]
        assert ds["optimizer"]["params"].get("torch_adam") is (None if offloaded else True)
        assert ds["optimizer"]["params"].get("fused") is (None if offloaded else True)   # torch's fused kernel
    else:
        assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["bf16"]["enabled"] is False                    # precision auto on CPU
    assert ds["zero_optimization"] == template["zero_optimization"]  # user-owned, untouched


def test_torch_adam_written_beside_the_type_moves_where_deepspeed_reads_it():
    template = json.loads((REPO_ROOT / "ds_configs/zero3_train.json").read_text())
    template["optimizer"]["params"].pop("torch_adam")
    template["optimizer"]["torch_adam"] = False            # an older template's place: DeepSpeed ignores it
    cfg = cfg_for(REPO_ROOT / "ds_configs/zero3_train.json")
    ds = merge_ds_config(template, role="actor", role_cfg=cfg.actor, precision="auto", dp_size=1,
                         mini_batch_size=32, on_gpu=False)
    assert "torch_adam" not in ds["optimizer"] and ds["optimizer"]["params"]["torch_adam"] is False


def test_gpu_precision_and_optimizer_choice():
    cfg = cfg_for(REPO_ROOT / "ds_configs/zero3_train.json")
    ds = role_ds_config(cfg, "actor", 2, on_gpu=True)
    assert ds["bf16"]["enabled"] is True and "torch_adam" not in ds["optimizer"]["params"]
    assert "fused" not in ds["optimizer"]["params"]              # DeepSpeed's FusedAdam takes no such argument
    assert resolve_precision("fp32", on_gpu=True) == "fp32"
    with pytest.raises(ValueError, match="valid"):
        resolve_precision("fp16", on_gpu=True)


def test_explicit_user_values_win():
    template = load_template("ds_configs/zero3_train.json")
    template["train_micro_batch_size_per_gpu"] = 2
    template["optimizer"]["params"]["lr"] = 0.5
    template["bf16"]["enabled"] = True
    cfg = cfg_for(REPO_ROOT / "ds_configs/zero3_train.json")
    ds = merge_ds_config(template, role="actor", role_cfg=cfg.actor, precision="auto", dp_size=2,
                         mini_batch_size=32, on_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 8 and ds["train_batch_size"] == 32
    assert ds["optimizer"]["params"]["lr"] == 0.5 and ds["bf16"]["enabled"] is True
    assert template["train_micro_batch_size_per_gpu"] == 2 and template["train_batch_size"] == "auto"  # pure


def test_inconsistent_explicit_batch_sizes_are_refused():
    cfg = cfg_for(REPO_ROOT / "ds_configs/zero3_train.json")
    template = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3, "train_batch_size": 32,
                "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match="train_batch_size=32"):
        merge_ds_config(template, role="actor", role_cfg=cfg.actor, precision="fp32", dp_size=2,
                        mini_batch_size=32, on_gpu=False)


def test_unfillable_auto_and_unknown_role_are_refused():
    cfg = cfg_for(REPO_ROOT / "ds_configs/zero3_train.json")
    template = {"gradient_clipping": "auto", "zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match="gradient_clipping"):
        merge_ds_config(template, role="actor", role_cfg=cfg.actor, precision="fp32", dp_size=1,
                        mini_batch_size=32, on_gpu=False)
    with pytest.raises(ValueError, match="valid"):
        merge_ds_config({}, role="policy", role_cfg=cfg.actor, precision="fp32", dp_size=1,
                        mini_batch_size=32, on_gpu=False)
    with pytest.raises(FileNotFoundError, match="zero3_train.json"):
        load_template("ds_configs/missing.json")


def test_merged_config_is_written_per_role(tmp_path):
    path = write_ds_config({"train_batch_size": 8}, tmp_path, "critic")
    assert path == tmp_path / "ds_config_critic.json"
    assert json.loads(path.read_text()) == {"train_batch_size": 8}


def test_lr_factor_by_hand():
    kw = dict(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [lr_factor(s, schedule="constant", **kw) for s in (0, 1, 3, 4, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    # after warmup, progress = (step - 4) / 10
    assert lr_factor(9, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(14, schedule="linear", **kw) == pytest.approx(0.1)
    assert lr_factor(9, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(50, schedule="cosine", **kw) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="valid"):
        lr_factor(0, schedule="step", **kw)


def test_consecutive_skips_abort():
    skips = SkipCounter(max_consecutive=3)
    for flag in (True, True, False, True, True):
        skips.record(flag, "actor")
    assert skips.total == 4 and skips.consecutive == 2
    with pytest.raises(NonFiniteStepError, match="actor: 3 consecutive"):
        skips.record(True, "actor")
