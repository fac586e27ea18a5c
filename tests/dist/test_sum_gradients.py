"""The gradient a ZeRO-3 engine steps with equals the plain-PyTorch gradient of the global objective,
for dp 1 and 2, micro-batch 1 / 2 / 4, every loss-reduction mode, with KL and entropy terms on, and for
the critic's clipped value loss. DeepSpeed's default semantics (negative control) does not. The same holds
when every parameter is partitioned and gathered around its use, with the transformer blocks as ZeRO-3
leaf units or every module on its own, and with gradient checkpointing."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import _jobs
import _reference as ref
from _launch import run_ranks
from rlhf_ds.algo import LOSS_REDUCTIONS
from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.models.value_model import ValueModel

MICROS = [1, 2, 4]
TOLERANCE = 1e-4  # fp32 round-off; a wrong scaling is off by a factor >= 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny LM, and a value model with a random head (a zero head would give zero backbone grads)."""
    lm_dir = resolve_model_path("tiny:llama-arith")
    value_dir = str(tmp_path_factory.mktemp("value"))
    value = ValueModel.from_pretrained(resolve_model_path("tiny:llama-arith-value"))
    with torch.no_grad():
        value.value_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    value.save_pretrained(value_dir)
    return lm_dir, value_dir


@pytest.fixture(scope="module")
def batches(models):
    lm_dir, _ = models
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    exp = ref.make_experience(lm.config.vocab_size)
    return ref.fill_actor_fields(lm, exp), ref.fill_critic_fields(exp)


def expected_grads(models, batches, modes=LOSS_REDUCTIONS, micros=MICROS) -> dict:
    lm_dir, value_dir = models
    actor_exp, critic_exp = batches
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    value = ValueModel.from_pretrained(value_dir, dtype=torch.float32)
    want = {}
    for mode in modes:
        for micro in micros:
            w = ref.hand_weights(actor_exp.response_mask, mode, actor_exp.group_ids, micro)
            want[("actor", mode, micro)] = ref.reference_grads(lm, ref.actor_objective(lm, actor_exp, w))
    for micro in micros:
        w = ref.hand_weights(critic_exp.response_mask, "token_mean", critic_exp.group_ids, micro)
        want[("critic", "token_mean", micro)] = ref.reference_grads(value, ref.critic_objective(value, critic_exp, w))
    return want


def gather_all_extra(tmp_dir, leaf_modules: str, checkpointing: bool) -> tuple:
    """Overrides for actor and critic: every parameter partitioned (persistence threshold 0; the shipped
    templates keep the tiny model's parameters whole), the given leaf modules and checkpointing."""
    with open("ds_configs/zero3_train.json") as f:
        template = json.load(f)
    template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_dir / "zero3_gather_all.json"
    path.write_text(json.dumps(template))
    return tuple(f"{role}.{key}" for role in ("actor", "critic")
                 for key in (f"ds_config={path}", f"zero3_leaf_modules={leaf_modules}",
                             f"gradient_checkpointing={str(checkpointing).lower()}"))


GATHERED = [("auto", False), ("none", False), ("auto", True)]
GATHERED_MODES, GATHERED_MICROS = ["token_mean", "sequence_mean"], [1, 4]


@pytest.fixture(scope="module")
def two_ranks(models, batches, tmp_path_factory):
    """Every 2-rank case in one pair of processes (their start-up is most of a case's cost): the shipped
    template in all modes, and every parameter gathered with each leaf-module setting."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    cases = {"shipped": (list(LOSS_REDUCTIONS), MICROS, ())}
    for leaf_modules, checkpointing in GATHERED:
        cases[f"gathered-{leaf_modules}-{checkpointing}"] = (GATHERED_MODES, GATHERED_MICROS,
                                                             gather_all_extra(tmp, leaf_modules, checkpointing))
    lm_dir, value_dir = models
    return run_ranks(_jobs.gradient_cases_job, 2, lm_dir, value_dir, str(tmp), *batches, cases)[0]


def _check_exact(got: dict, models, batches, label: str, modes=LOSS_REDUCTIONS, micros=MICROS) -> None:
    want = expected_grads(models, batches, modes, micros)
    report = {key: ref.max_rel_diff(got[key], want[key]) for key in want}
    worst = max(report.values())
    print(f"\n{label}: max relative gradient difference over {len(report)} cases = {worst:.2e}")
    assert worst < TOLERANCE, {k: v for k, v in report.items() if v >= TOLERANCE}
    # Negative control: DeepSpeed's default (loss / accumulation steps, gradients averaged over ranks).
    control = ref.max_rel_diff(got[("actor_ds_default", "token_mean", 2)], want[("actor", "token_mean", 2)])
    print(f"DeepSpeed default semantics: max relative difference = {control:.2e}")
    assert control > 0.3


@pytest.mark.dist
def test_engine_gradient_equals_global_objective_gradient_on_one_rank(models, batches, tmp_path):
    lm_dir, value_dir = models
    got = run_ranks(_jobs.gradient_job, 1, lm_dir, value_dir, str(tmp_path), *batches, list(LOSS_REDUCTIONS), MICROS)[0]
    got.pop("layout")
    _check_exact(got, models, batches, "world_size=1")


@pytest.mark.dist
def test_engine_gradient_equals_global_objective_gradient_on_two_ranks(two_ranks, models, batches):
    got = dict(two_ranks["shipped"])
    got.pop("layout")
    _check_exact(got, models, batches, "world_size=2")


@pytest.mark.dist
@pytest.mark.parametrize("leaf_modules,checkpointing", GATHERED)
def test_gradient_is_exact_when_every_parameter_is_gathered(leaf_modules, checkpointing, two_ranks, models, batches):
    """The shipped templates keep the tiny model's parameters whole (persistence threshold 1e6); here the
    threshold is 0, so ZeRO-3 partitions every parameter over the 2 ranks and gathers it in its hooks."""
    got = dict(two_ranks[f"gathered-{leaf_modules}-{checkpointing}"])
    for role, layout in got.pop("layout").items():
        assert layout["partitioned"] == layout["parameters"], (role, layout)
        assert layout["leaf classes"] == (["LlamaDecoderLayer"] if leaf_modules == "auto" else []), (role, layout)
    want = expected_grads(models, batches, GATHERED_MODES, GATHERED_MICROS)
    report = {key: ref.max_rel_diff(got[key], want[key]) for key in got if key[0] != "actor_ds_default"}
    assert len(report) == len(want) == 6
    worst = max(report.values())
    print(f"\nleaf modules {leaf_modules}, checkpointing {checkpointing}: max relative gradient difference over "
          f"{len(report)} cases = {worst:.2e}")
    assert worst < TOLERANCE, {k: v for k, v in report.items() if v >= TOLERANCE}
