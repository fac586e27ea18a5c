"""`rlhf-ds plan`: model shapes from configs on the meta device, the ZeRO-3 arithmetic against hand-derived
figures and DeepSpeed's own estimator, devices and verdicts, the fixes it proposes, and the refusal
before a run that cannot fit. (Engines vs plan: tests/dist/test_plan_engines.py.)"""
import pytest

from rlhf_ds import cli
from rlhf_ds.config import ConfigError, load_config
from rlhf_ds.plan import report
from rlhf_ds.plan.advice import suggest_fixes
from rlhf_ds.plan.memory import (GiB, ZeroSettings, activation_bytes, engine_rank_usage, model_state_bytes,
                                 partition_numel)
from rlhf_ds.plan.planner import Target, plan_run, role_lines
from rlhf_ds.plan.report import PlanError, check_fits
from rlhf_ds.plan.shapes import ShapeError, model_shape


def qwen2_params(vocab, h, i, layers, heads, kv_heads, tied):
    """Parameters of a Qwen2 model by hand: embeddings, per layer q/k/v (with biases), o, gate/up/down
    and two RMSNorms, the final norm, and an untied lm_head."""
    head_dim = h // heads
    kv = kv_heads * head_dim
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    return vocab * h + layers * per_layer + h + (0 if tied else vocab * h)


# Qwen2.5-0.5B: 494,032,768 parameters (tied head); Qwen2.5-7B: 7,615,616,512 (untied).
QWEN_05B = qwen2_params(151936, 896, 4864, 24, 14, 2, tied=True)
QWEN_7B = qwen2_params(152064, 3584, 18944, 28, 28, 4, tied=False)


def test_hand_derived_parameter_counts_match_the_meta_device_build():
    assert QWEN_05B == 494_032_768 and QWEN_7B == 7_615_616_512
    assert model_shape("shape:qwen2.5-0.5b").num_params == QWEN_05B
    assert model_shape("shape:qwen2.5-7b").num_params == QWEN_7B
    shape = model_shape("shape:qwen2.5-7b")
    assert (shape.head_dim, shape.num_kv_heads, shape.largest_module_numel) == (128, 4, 152064 * 3584)


@pytest.mark.parametrize("name,params,ranks", [("shape:qwen2.5-0.5b", QWEN_05B, 8), ("shape:qwen2.5-7b", QWEN_7B, 4)])
def test_zero3_model_states_per_rank_by_hand(name, params, ranks):
    # every tensor of these models divides by 8, so a rank holds exactly P / ranks elements
    states = model_state_bytes(model_shape(name), ranks, dtype_bytes=2, trainable=True)
    assert states == {"parameters": 2 * params // ranks, "gradients": 2 * params // ranks,
                      "optimizer states": 12 * params // ranks}
    # Qwen2.5-7B on 4 ranks in bf16: 3.55 GiB of parameters and 21.3 GiB of optimizer states per rank
    if name.endswith("7b"):
        assert states["parameters"] == 3_807_808_256 and states["optimizer states"] == 22_846_849_536
    # an inference role holds the parameter partition only
    assert model_state_bytes(model_shape(name), ranks, 2, trainable=False) == {"parameters": 2 * params // ranks}


def test_partitions_are_padded_per_parameter():
    shape = model_shape("tiny:llama-arith", value_head=True)     # the value head's bias has 1 element
    assert partition_numel(shape, 2) == sum(-(-n // 2) for n in shape.param_numels) > shape.num_params / 2


@pytest.mark.parametrize("offload_param", [False, True])
def test_offloaded_states_match_deepspeeds_estimator(offload_param):
    """DeepSpeed's estimate of ZeRO-3 with CPU offload: 2 bytes/param/GPU stay on the GPU (none with
    parameter offload) and 16 (18 with parameters) go to host memory per node, before its 1.5 buffer."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape, gpus = model_shape("shape:qwen2.5-7b"), 8
    zero = ZeroSettings(offload_optimizer=True, offload_param=offload_param)
    usage = engine_rank_usage(shape, dp=gpus, dtype_bytes=2, zero=zero, trainable=True, micro_batch=1, seq_len=1,
                              response_len=1, causal_lm=True)
    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(
        shape.num_params, shape.largest_module_numel, num_gpus_per_node=gpus, cpu_offload=True,
        cpu_offload_params=offload_param, additional_buffer_factor=1.0)
    states_on_gpu = usage.device.get("parameters (partition)", 0) + usage.device.get("gradients (partition)", 0)
    assert states_on_gpu == gpu - largest
    assert gpus * usage.host_total == cpu


def test_deepspeeds_no_offload_figure_is_two_bytes_per_parameter_above_the_held_states():
    # 18 bytes per parameter in DeepSpeed's estimate; built engines hold 16 (tests/dist/test_plan_engines.py)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape, gpus = model_shape("shape:qwen2.5-0.5b"), 8
    _, gpu, largest = estimate_zero3_model_states_mem_needs(shape.num_params, shape.largest_module_numel,
                                                            num_gpus_per_node=gpus, cpu_offload=False)
    ours = sum(model_state_bytes(shape, gpus, 2, trainable=True).values())
    assert ours == 16 * shape.num_params // gpus and gpu - largest == 18 * shape.num_params // gpus


def test_activations_by_hand_and_checkpointing_saves_them():
    shape = model_shape("shape:qwen2.5-0.5b")
    per_token_layer = 7 * 896 + 4 * 2 * 64 + 4 * 4864
    full = activation_bytes(shape, micro_batch=2, seq_len=100, dtype_bytes=2, training=True)
    assert full == 2 * 100 * 24 * per_token_layer * 2
    checkpointed = activation_bytes(shape, 2, 100, 2, training=True, checkpointing=True)
    assert checkpointed == 2 * 100 * (24 * 896 + per_token_layer) * 2 < full / 10
    assert activation_bytes(shape, 2, 100, 2, training=False) == 2 * 100 * (3 * 896 + 2 * 4864) * 2


def _gsm8k(*extra):
    return load_config("grpo_qwen2.5_1.5b_gsm8k", ["actor.model_path=shape:qwen2.5-1.5b",
                                                   "reference.model_path=shape:qwen2.5-1.5b", *extra])


def test_devices_follow_placement_and_colocation():
    target = Target(80 * GiB, 1024 * GiB)
    plan = plan_run(_gsm8k(), target)
    gpus = [d for d in plan.devices if d.name.startswith("gpu")]
    assert len(gpus) == 4 + 2 + 2 and [d.roles() for d in gpus[:5]] == [["actor"]] * 4 + [["reference"]]
    together = plan_run(_gsm8k("cluster.colocate=true", "reference.num_ranks=4", "rollout.num_engines=4"), target)
    gpus = [d for d in together.devices if d.name.startswith("gpu")]
    assert len(gpus) == 4 and all(d.roles() == ["actor", "reference", "rollout"] for d in gpus)
    spmd = plan_run(_gsm8k("cluster.launcher=deepspeed", "reference.num_ranks=4"), target)
    assert [d.roles() for d in spmd.devices if d.name.startswith("gpu")] == [["actor", "reference", "rollout"]] * 4


def test_hf_engines_inside_the_actor_share_its_devices_without_a_process_of_their_own():
    target = Target(80 * GiB, 1024 * GiB)
    inside = plan_run(_gsm8k("rollout.backend=hf", "rollout.num_engines=1"), target)
    gpus = [d for d in inside.devices if d.name.startswith("gpu")]
    assert len(gpus) == 4 + 2 and [d.roles() for d in gpus] == [["actor", "rollout"]] * 4 + [["reference"]] * 2
    engine = [bytes_ for label, _, bytes_ in gpus[3].parts if label == "rollout engine 3 (in actor rank 3)"]
    assert engine and "CUDA context" not in engine[0]   # the actor rank's process has the one context
    own = plan_run(_gsm8k("rollout.backend=hf", "rollout.hf_in_actor=false"), target)
    assert [d.roles() for d in own.devices if d.name.startswith("gpu")][-2:] == [["rollout"]] * 2
    # asynchronous generation overlaps training: its engines keep processes of their own
    ahead = plan_run(_gsm8k("rollout.backend=hf", "rollout.async_generation=true"), target)
    assert [d.roles() for d in ahead.devices if d.name.startswith("gpu")][-2:] == [["rollout"]] * 2
    with pytest.raises(ConfigError, match=r"rollout.num_engines=3, but with rollout.hf_in_actor=true .* 4 rank"):
        _gsm8k("rollout.backend=hf", "rollout.num_engines=3")


def test_a_run_that_does_not_fit_gets_fixes_that_are_planned_again():
    target = Target(80 * GiB, 1024 * GiB)
    changes = ["rollout.max_response_len=256", "actor.gradient_checkpointing=false", "actor.micro_batch_size=64",
               "data.prompts_per_step=32", "data.num_eval=64"]
    cfg = _gsm8k(*changes)
    plan = plan_run(cfg, target)
    assert not plan.fits and {r for d in plan.failing() for r in d.roles()} == {"actor"}
    fixes = suggest_fixes(cfg, plan, target)
    assert fixes and all(fix.plan.fits for fix in fixes)
    assert [f.changes[0].rank for f in fixes] == sorted(f.changes[0].rank for f in fixes)   # cheapest first
    for fix in fixes:   # each fix, applied as the user would, fits
        assert plan_run(_gsm8k(*changes, *fix.overrides), target).fits, fix.overrides
    # halving the micro-batch (the cheapest change) is not enough alone; checkpointing is next in cost
    assert not plan_run(_gsm8k(*changes, "actor.micro_batch_size=32"), target).fits
    assert fixes[0].overrides == ["actor.gradient_checkpointing=true"]


def test_train_refuses_a_run_that_cannot_fit_before_building_anything(monkeypatch):
    cfg = load_config("grpo_tiny")
    monkeypatch.setattr(report, "local_target", lambda: Target(0, 512 * 2 ** 20))   # a 512 MiB host
    with pytest.raises(PlanError, match=r"host \(actor, rollout\) needs .* short.*trainer.skip_plan=true"):
        check_fits(cfg)
    check_fits(load_config("grpo_tiny", ["trainer.skip_plan=true"]))       # asked to start anyway
    monkeypatch.setattr(report, "local_target", lambda: Target(0, 64 * GiB))
    check_fits(cfg)


def test_cli_plan_prints_the_breakdown_and_exits_1_when_it_does_not_fit(capsys):
    assert cli.main(["plan", "grpo_tiny", "--host-memory-gib", "16"]) == 0
    out = capsys.readouterr().out
    assert "actor rank 0" in out and "optimizer states (partition)" in out and "verdict: the run fits." in out
    assert "actor: 1 rank(s), trained, ds_configs/zero3_train.json (offload: none), fp32, micro-batch 128" in out
    qwen = ["plan", "grpo_qwen2.5_1.5b_gsm8k", "actor.model_path=shape:qwen2.5-1.5b",
            "reference.model_path=shape:qwen2.5-1.5b"]
    assert cli.main(qwen + ["--gpu-memory-gib", "24"]) == 1
    out = capsys.readouterr().out
    assert "gpu 0: " in out and "DOES NOT FIT" in out
    assert "changes that make it fit" in out or "closest found" in out
    # the HF engine keeps one decoding step's logits, not every step's: 512 x 1024 tokens fit on 80 GiB
    assert cli.main(qwen + ["rollout.backend=hf", "rollout.hf_in_actor=false", "--gpu-memory-gib", "80"]) == 0
    assert "logits of the step decoded 1.01 GiB" in capsys.readouterr().out


def test_unknown_models_are_named_with_the_valid_choices(capsys):
    with pytest.raises(ShapeError, match="known: shape:qwen2.5-0.5b"):
        model_shape("shape:gpt-5")
    assert cli.main(["plan", "grpo_tiny", "actor.model_path=/nowhere/model"]) == 2
    assert "cannot read the HF config of '/nowhere/model'" in capsys.readouterr().err
    assert cli.main(["plan", "--gpu-memory-gib", "-1"]) == 2
    assert "--gpu-memory-gib must be > 0, got -1.0" in capsys.readouterr().err


def test_sft_and_reward_model_stages_plan_only_what_they_start():
    """`rlhf-ds sft` starts the trained actor and the engines that evaluate it; `rlhf-ds rm` the trained
    reward model alone (its forward scores chosen and rejected together): the plans say so, and a stage
    that cannot fit is refused before anything starts."""
    target = Target(80 * GiB, 1024 * GiB)
    cfg = _gsm8k("reward.use_model=true", "reward.model_path=shape:qwen2.5-1.5b", "reward.num_ranks=2")
    rl = {d.name: d.roles() for d in plan_run(cfg, target).devices if d.name.startswith("gpu")}
    sft = {d.name: d.roles() for d in plan_run(cfg, target, "sft").devices if d.name.startswith("gpu")}
    rm_plan = plan_run(cfg, target, "rm")
    rm = {d.name: d.roles() for d in rm_plan.devices if d.name.startswith("gpu")}
    assert "reward" in {r for roles in rl.values() for r in roles}
    assert {r for roles in sft.values() for r in roles} == {"actor", "rollout"}
    assert rm == {"gpu 0": ["reward"], "gpu 1": ["reward"]}
    trained = dict(next(d for d in rm_plan.devices if d.name == "gpu 0").parts[0][2])
    inference = dict(next(d for d in plan_run(cfg, target).devices if "reward" in d.roles()).parts[0][2])
    assert "optimizer states" in " ".join(trained) and "optimizer states" not in " ".join(inference)
    lines = role_lines(cfg, target, "rm")
    assert len(lines) == 1 and lines[0].startswith("reward: 2 rank(s), trained")
    with pytest.raises(ValueError, match="unknown stage 'ppo'; valid stages: rl, sft, rm"):
        plan_run(cfg, target, "ppo")


def test_stage_commands_refuse_a_stage_that_cannot_fit(monkeypatch, capsys):
    monkeypatch.setattr(report, "local_target", lambda: Target(0, 256 * 2 ** 20))   # a 256 MiB host
    assert cli.main(["sft", "sft_tiny"]) != 0
    err = capsys.readouterr().err
    assert "does not fit CPU" in err and "host (actor, rollout) needs" in err and "rlhf-ds plan --stage sft" in err
    assert cli.main(["rm", "rm_tiny"]) != 0
    assert "host (reward) needs" in capsys.readouterr().err
    assert cli.main(["plan", "rm_tiny", "--stage", "rm", "--host-memory-gib", "16"]) == 0
