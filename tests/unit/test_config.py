"""The config tree: loading, overrides, every validation rule, freezing, printing, `rlhf-ds config`."""
import ast
import dataclasses
import re
import subprocess
import sys
from typing import get_args, get_type_hints

import pytest
import yaml

from rlhf_ds import cli, config
from rlhf_ds.choices import (ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, POLICY_LOSS_HOMOGENEOUS,
                             PRESCALED_REDUCTIONS, TOKEN_REWARD_ESTIMATORS)
from rlhf_ds.config import Config, ConfigError, load_config, parse_overrides, validate
from rlhf_ds.config_loader import apply_overrides, build, iter_fields


def load(*overrides, recipe=None):
    return load_config(recipe, list(overrides))


def write_yaml(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- loading and overrides

def test_default_is_the_grpo_tiny_recipe():
    cfg = load_config(None)
    assert cfg == load_config(str(config.resources.files("rlhf_ds") / "recipes" / "grpo_tiny.yaml"))
    assert (cfg.algo.advantage_estimator, cfg.algo.loss_reduction, cfg.algo.kl_placement) == \
        ("grpo", "token_mean", "none")
    assert (cfg.data.prompts_per_step, cfg.rollout.n, cfg.rollout.backend) == (32, 8, "hf")
    assert (cfg.actor.model_path, cfg.actor.num_ranks, cfg.actor.lr) == ("tiny:llama-arith", 1, 2e-4)
    assert cfg.data.train_path == "synthetic:multiplication"


def test_dataclass_defaults_are_valid():
    validate(Config())


def test_overrides_nested_keys_lists_and_scalars():
    cfg = load("algo.kl_placement=loss", "reference.model_path=tiny:llama-arith", "algo.kl_coef=1e-3",
               "reward.functions=[exact_match, format]", "reward.function_weights=[1, 0.5]",
               "rollout.vllm.cudagraph_capture_sizes=[1,2,4]", "actor.adam_betas=[0.9,0.95]",
               "cluster.colocate=true", "data.eval_path=", "rollout.top_k=5")
    assert cfg.algo.kl_coef == 1e-3 and isinstance(cfg.algo.kl_coef, float)
    assert cfg.reward.functions == ("exact_match", "format")
    assert cfg.reward.function_weights == (1.0, 0.5)
    assert all(isinstance(w, float) for w in cfg.reward.function_weights)
    assert cfg.rollout.vllm.cudagraph_capture_sizes == (1, 2, 4)
    assert cfg.actor.adam_betas == (0.9, 0.95)
    assert cfg.cluster.colocate is True and cfg.data.eval_path == "" and cfg.rollout.top_k == 5
    assert cfg.needs_reference


def test_override_keeps_the_rest_of_a_section_and_later_wins():
    cfg = load("rollout.vllm={enforce_eager: true}", "actor.lr=1e-3", "actor.lr=2e-3",
               recipe="grpo_qwen2.5_1.5b_gsm8k")
    assert cfg.rollout.vllm.enforce_eager is True
    assert cfg.rollout.vllm.gpu_memory_utilization == 0.6  # from the recipe, untouched
    assert cfg.actor.lr == 2e-3
    assert cfg.actor.num_ranks == 4  # the rest of the actor section comes from the recipe


def test_partial_section_keeps_slot_defaults(tmp_path):
    # the actor slot's own default model path survives a YAML that sets only other actor keys
    cfg = load_config(write_yaml(tmp_path, "actor: {lr: 1e-4}\n"))
    assert cfg.actor.model_path == "tiny:llama-arith" and cfg.actor.lr == 1e-4


def test_yaml_reads_exponent_floats(tmp_path):
    cfg = load_config(write_yaml(tmp_path, "actor:\n  lr: 1e-4\nalgo:\n  kl_coef: 2E-3\n"))
    assert cfg.actor.lr == 1e-4 and cfg.algo.kl_coef == 2e-3


def test_parse_overrides_values_and_malformed_items():
    assert parse_overrides(["a.b=true", "c=1e-4", "d=[1, 2]", "e=", "f=x=y"]) == \
        [("a.b", True), ("c", 1e-4), ("d", [1, 2]), ("e", ""), ("f", "x=y")]
    for bad in ["algo.kl_coef", "=1", "algo..kl_coef=1", ".x=1"]:
        with pytest.raises(ConfigError, match="dotted.key=value"):
            parse_overrides([bad])


def test_override_through_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"algo\.kl_coef is a value"):
        load("algo.kl_coef.x=1")  # grpo_tiny sets algo.kl_coef
    with pytest.raises(ConfigError, match=r"algo: expected a mapping"):
        load("algo=3")


def test_missing_file_lists_recipes():
    with pytest.raises(ConfigError, match=r"not found.*grpo_tiny.*ppo_tiny"):
        load_config("no/such/file.yaml")


def test_non_mapping_yaml_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write_yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path, "algo: [unclosed\n"))


# ----------------------------------------------------------------------------- unknown keys

@pytest.mark.parametrize("text,expected", [
    ("algoo:\n  kl_coef: 0.1\n", "unknown key 'algoo'; did you mean 'algo'?"),
    ("algo:\n  kl_cof: 0.1\n", "unknown key 'algo.kl_cof'; did you mean 'algo.kl_coef'?"),
    ("rollout:\n  vllm:\n    enforce_eagr: true\n",
     "unknown key 'rollout.vllm.enforce_eagr'; did you mean 'rollout.vllm.enforce_eager'?"),
])
def test_unknown_yaml_key_suggests(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path, text))
    assert str(err.value) == expected


@pytest.mark.parametrize("override,expected", [
    ("sed=1", "did you mean 'seed'?"),
    ("trainer.sft.stpes=3", "unknown key 'trainer.sft.stpes'; did you mean 'trainer.sft.steps'?"),
    ("actor.micro_batch=2", "did you mean 'actor.micro_batch_size'?"),
])
def test_unknown_override_key_suggests(override, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("?", r"\?")):
        load(override)


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load("cluster.zzzzzz=1")
    names = [f.name for f in dataclasses.fields(config.ClusterConfig)]
    assert "valid keys in section 'cluster'" in str(err.value)
    assert all(name in str(err.value) for name in names)


# ----------------------------------------------------------------------------- enums

ENUM_FIELDS = [f for f in iter_fields(Config) if f.choices]


def _choices_in_message(message):
    listed = message.split("valid choices: ", 1)[1].split("; did you mean", 1)[0]
    return tuple(ast.literal_eval(item) for item in listed.split(", "))


def test_enum_fields_are_found():
    paths = {f.path for f in ENUM_FIELDS}
    assert {"precision", "actor.lr_schedule", "critic.lr_schedule", "rollout.backend",
            "rollout.vllm.cudagraph_mode", "algo.advantage_estimator", "algo.loss_reduction",
            "algo.policy_loss", "algo.kl_estimator", "algo.kl_placement", "cluster.launcher",
            "cluster.placement_strategy"} <= paths


@pytest.mark.parametrize("info", ENUM_FIELDS, ids=lambda f: f.path)
def test_invalid_enum_lists_every_choice(info):
    # the choices come from the field's Literal annotation, the one source the validator reads
    owner_path, name = info.path.rpartition(".")[::2]
    owner = Config
    for part in filter(None, owner_path.split(".")):
        owner = get_type_hints(owner)[part]
    assert info.choices == get_args(get_type_hints(owner)[name])
    with pytest.raises(ConfigError) as err:
        load(f"{info.path}=not_a_choice")
    message = str(err.value)
    assert message.startswith(f"{info.path}: invalid value 'not_a_choice'")
    assert _choices_in_message(message) == info.choices
    for choice in info.choices:  # each listed choice passes the field check
        build(Config, apply_overrides({}, parse_overrides([f"{info.path}={choice}"])))


def test_invalid_enum_suggests_the_closest_choice():
    with pytest.raises(ConfigError, match=r"did you mean 'sequence_mean'\?"):
        load("algo.loss_reduction=sequense_mean")


# ----------------------------------------------------------------------------- types and bounds

@pytest.mark.parametrize("override,expected", [
    ("actor.lr=abc", "actor.lr: expected float, got str 'abc'"),
    ("rollout.n=2.5", "rollout.n: expected int, got float 2.5"),
    ("rollout.n=true", "rollout.n: expected int, got bool True"),
    ("cluster.colocate=1", "cluster.colocate: expected bool, got int 1"),
    ("data.prompt_key=[a]", "data.prompt_key: expected str, got list ['a']"),
    ("reward.functions=exact_match", "reward.functions: expected list[str], got str 'exact_match'"),
    ("reward.function_weights=[1, x]", "reward.function_weights[1]: expected float, got str 'x'"),
    ("actor.adam_betas=[0.9]", "actor.adam_betas: expected [float, float] (2 items), got 1 items"),
    ("rollout.vllm=3", "rollout.vllm: expected a mapping of keys, got int 3"),
])
def test_type_errors_name_field_and_type(override, expected):
    with pytest.raises(ConfigError) as err:
        load(override)
    assert str(err.value).startswith(expected)


def test_int_is_accepted_for_float():
    cfg = load("algo.kl_coef=0", "rollout.temperature=1")
    assert isinstance(cfg.algo.kl_coef, float) and isinstance(cfg.rollout.temperature, float)


@pytest.mark.parametrize("override,expected", [
    ("actor.num_ranks=0", "actor.num_ranks: must be >= 1, got 0"),
    ("algo.clip_low=1.0", "algo.clip_low: must be >= 0 and < 1, got 1.0"),
    ("algo.clip_high=-0.1", "algo.clip_high: must be >= 0 and < 1, got -0.1"),
    ("algo.kl_coef=-1", "algo.kl_coef: must be >= 0, got -1.0"),
    ("rollout.top_p=0", "rollout.top_p: must be > 0 and <= 1, got 0.0"),
    ("actor.lr=.nan", "actor.lr: must be > 0, got nan"),
    ("rollout.vllm.gpu_memory_utilization=1.5", "rollout.vllm.gpu_memory_utilization: must be > 0"),
])
def test_bounds(override, expected):
    with pytest.raises(ConfigError) as err:
        load(override)
    assert str(err.value).startswith(expected)


FLOAT_FIELDS = [f for f in iter_fields(Config) if f.hint is float or get_args(f.hint)[:1] == (float,)]


def test_float_fields_are_found():
    paths = {f.path for f in FLOAT_FIELDS}
    assert {"actor.lr", "reward.model_weight", "reward.failure_value", "actor.adam_betas",
            "critic.adam_betas", "reward.function_weights", "algo.kl_coef"} <= paths


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("info", FLOAT_FIELDS, ids=lambda f: f.path)
def test_every_float_refuses_nan_and_inf(info, bad):
    # scalars and every item of a float sequence; a bound, if any, may be the check that refuses it
    if info.hint is float:
        override, path = f"{info.path}={bad}", info.path
    else:
        items = max(len(info.default), 1)
        override, path = f"{info.path}=[{', '.join(['0.5'] * (items - 1) + [bad])}]", f"{info.path}[{items - 1}]"
    with pytest.raises(ConfigError) as err:
        load(override)
    message = str(err.value)
    assert message.startswith(f"{path}: must be ") and message.endswith(f"got {bad.replace('.', '', 1)}")


@pytest.mark.parametrize("override,expected", [
    ("reward.model_weight=.nan", "reward.model_weight: must be a finite number, got nan"),
    ("reward.failure_value=-.inf", "reward.failure_value: must be a finite number, got -inf"),
    ("algo.kl_coef=.inf", "algo.kl_coef: must be a finite number, got inf"),
    ("actor.adam_betas=[0.9, .nan]", "actor.adam_betas[1]: must be a finite number, got nan"),
    ("reward.function_weights=[.inf]", "reward.function_weights[0]: must be a finite number, got inf"),
])
def test_nonfinite_floats_name_the_key_and_the_value(override, expected):
    with pytest.raises(ConfigError) as err:
        load(override)
    assert str(err.value) == expected


def test_seed_must_not_be_negative():
    assert load("seed=0").seed == 0
    with pytest.raises(ConfigError) as err:
        load("seed=-1")
    assert str(err.value) == "seed: must be >= 0, got -1"


def test_clip_ranges_accept_the_closed_lower_end():
    cfg = load("algo.clip_low=0", "algo.clip_high=0.99")
    assert (cfg.algo.clip_low, cfg.algo.clip_high) == (0.0, 0.99)


# ----------------------------------------------------------------------------- cross-field rules

def assert_rule(overrides, fragment, recipe=None):
    """The rule fails with `fragment` in the message (and nothing else fails)."""
    with pytest.raises(ConfigError) as err:
        load(*overrides, recipe=recipe)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid config:" and len(lines) == 2, str(err.value)
    assert fragment in lines[1]


def test_rollout_batch_divisible_by_mini_batch():
    load("algo.mini_batch_size=128", "actor.micro_batch_size=32")
    assert_rule(["algo.mini_batch_size=96", "actor.micro_batch_size=32"],
                "data.prompts_per_step * rollout.n = 32 * 8 = 256 sequences per step must be "
                "divisible by algo.mini_batch_size=96")


def test_mini_batch_divisible_by_actor_ranks_times_micro():
    load("actor.num_ranks=2")  # 2 * 128 = 256
    load("actor.num_ranks=4", "actor.micro_batch_size=64")  # 4 * 64 = 256
    assert_rule(["actor.num_ranks=3"], "algo.mini_batch_size=256 must be divisible by "
                "actor.num_ranks * actor.micro_batch_size = 3 * 128 = 384")


def test_critic_layout_checked_only_when_critic_is_used():
    load("critic.num_ranks=3")  # grpo: the critic is not used
    load("critic.num_ranks=2", recipe="ppo_tiny")  # 2 * 32 divides 128
    assert_rule(["critic.num_ranks=3"], "critic.num_ranks * critic.micro_batch_size = 3 * 32 = 96",
                recipe="ppo_tiny")


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_group_estimators_need_two_samples(estimator):
    base = [f"algo.advantage_estimator={estimator}", "algo.mini_batch_size=32",
            "actor.micro_batch_size=32"]
    load(*base, "rollout.n=2")
    assert_rule([*base, "rollout.n=1"], f"algo.advantage_estimator={estimator!r} normalises "
                "within each prompt's samples and needs rollout.n >= 2, got rollout.n=1")


def test_non_group_estimators_accept_one_sample():
    load("algo.advantage_estimator=reinforce_pp", "rollout.n=1", "algo.mini_batch_size=32",
         "actor.micro_batch_size=32")
    load("rollout.n=1", "data.prompts_per_step=128", recipe="ppo_tiny")


def test_gae_needs_a_critic():
    assert_rule(["algo.advantage_estimator=gae"], "needs a critic: set critic.model_path")
    cfg = load("algo.advantage_estimator=gae", "critic.model_path=tiny:llama-arith-value")
    assert cfg.needs_critic and cfg.trainable_roles == ("actor", "critic")


def test_loss_reduction_refused_for_non_homogeneous_loss(monkeypatch):
    for mode in PRESCALED_REDUCTIONS:
        load("algo.policy_loss=gspo", f"algo.loss_reduction={mode}")
    monkeypatch.setitem(POLICY_LOSS_HOMOGENEOUS, "gspo", False)
    for mode in PRESCALED_REDUCTIONS:
        assert_rule(["algo.policy_loss=gspo", f"algo.loss_reduction={mode}"],
                    f"algo.policy_loss='gspo' is not positively homogeneous in the advantage, so "
                    f"algo.loss_reduction={mode!r}")
        load("algo.policy_loss=ppo", f"algo.loss_reduction={mode}")


@pytest.mark.parametrize("value,ok", [(0, True), (1.01, True), (3, True), (1, False), (0.5, False),
                                      (-2, False)])
def test_dual_clip_is_zero_or_above_one(value, ok):
    # the one check of dual_clip (the losses trust it); clip_low / clip_high bounds: test_bounds
    if ok:
        assert load(f"algo.dual_clip={value}").algo.dual_clip == value
    else:
        assert_rule([f"algo.dual_clip={value}"], "algo.dual_clip must be 0 (off) or > 1")


@pytest.mark.parametrize("placement", ["loss", "reward"])
def test_kl_placement_needs_reference(placement):
    estimator = "algo.advantage_estimator=reinforce_pp_baseline"
    assert_rule([f"algo.kl_placement={placement}", "algo.kl_coef=0.1", estimator],
                f"algo.kl_placement={placement!r} needs a reference model")
    cfg = load(f"algo.kl_placement={placement}", "algo.kl_coef=0.1", estimator,
               "reference.model_path=tiny:llama-arith")
    assert cfg.needs_reference


def test_kl_in_reward_needs_token_rewards():
    # the one check of this rule (compute_advantages trusts it)
    base = ["algo.kl_placement=reward", "algo.kl_coef=0.1", "reference.model_path=tiny:llama-arith"]
    sequence_level = [e for e in ADVANTAGE_ESTIMATORS if e not in TOKEN_REWARD_ESTIMATORS]
    assert sequence_level == ["grpo", "grpo_no_std", "rloo"]
    for estimator in sequence_level:
        assert_rule(base + [f"algo.advantage_estimator={estimator}"],
                    f"algo.kl_placement='reward' needs per-token rewards, which "
                    f"algo.advantage_estimator={estimator!r} has not; use one of "
                    f"{', '.join(TOKEN_REWARD_ESTIMATORS)}")
    for estimator in TOKEN_REWARD_ESTIMATORS:
        assert load(*base, f"algo.advantage_estimator={estimator}",
                    "critic.model_path=tiny:llama-arith-value").needs_reference


def test_adaptive_kl_needs_a_placement_and_a_start():
    assert_rule(["algo.adaptive_kl=true"], "algo.adaptive_kl=true has no effect")
    load("algo.adaptive_kl=true", recipe="ppo_tiny")
    assert_rule(["algo.adaptive_kl=true", "algo.kl_coef=0"], "set an initial algo.kl_coef > 0", recipe="ppo_tiny")


def test_reward_sources():
    assert_rule(["reward.use_model=true"], "reward.use_model=true needs reward.model_path")
    assert load("reward.use_model=true", "reward.model_path=tiny:llama-arith-value").uses_reward_model
    assert_rule(["reward.functions=[]"], "no reward source")
    load("reward.functions=[]", "reward.use_model=true", "reward.model_path=x")
    assert_rule(["reward.functions=[exact_match, format]", "reward.function_weights=[1]"],
                "reward.function_weights has 1 entries but reward.functions has 2")
    load("reward.functions=[exact_match, format]", "reward.function_weights=[1, 0.1]")


def test_a_remote_endpoint_is_a_reward_source_of_its_own():
    url = "http://127.0.0.1:8000/score"
    cfg = load("reward.functions=[]", f"reward.remote.url={url}", "reward.remote.headers=['X-Run: demo']")
    assert cfg.reward.remote.url == url and cfg.reward.remote.headers == ("X-Run: demo",)
    assert_rule(["reward.functions=[]"], "set reward.functions, reward.remote.url or reward.use_model=true")
    load("reward.functions=[]", f"reward.remote.url={url}", "reward.correct_score=5")   # the remote's range is unknown
    load_config("sft_tiny", ["reward.functions=[]", f"reward.remote.url={url}"], stage="sft")


@pytest.mark.parametrize("overrides,message", [
    (["reward.remote.url=127.0.0.1:8000/score"], "must be an http:// or https:// URL with a host"),
    (["reward.remote.url=ftp://host/score"], "must be an http:// or https:// URL"),
    (["reward.remote.url=http:///score"], "with a host"),
    (["reward.remote.url=http://h/s", "reward.remote.headers=['X-Run demo']"], "'X-Run demo' is not 'Name: value'"),
    (["reward.remote.url=http://h/s", "reward.remote.headers=[': v']"], "is not 'Name: value'"),
    (["reward.remote.url=http://h/s", "reward.remote.headers=['Authorization: Bearer a']", "reward.remote.token=b"],
     "keep one of them"),
    (["reward.remote.batch_size=0"], "reward.remote.batch_size: must be >= 1"),
    (["reward.remote.timeout_s=0"], "reward.remote.timeout_s: must be > 0"),
    (["reward.remote.retries=-1"], "reward.remote.retries: must be >= 0"),
])
def test_remote_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(*overrides)
    if overrides[0].startswith("reward.remote.url"):   # the SFT stage's evaluation uses the endpoint too
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("sft_tiny", overrides, stage="sft")


def test_correct_score_must_be_reachable_by_builtin_functions():
    """Held-out accuracy counts rule rewards >= reward.correct_score: a threshold the built-in 0/1
    functions cannot reach (with their weights) would report 0 accuracy forever."""
    assert_rule(["reward.function_weights=[0.5]"],
                "reward.correct_score=1.0 can never be reached: reward.functions ['exact_match'] (each pays 0 or 1) "
                "with weights [0.5] pay at most 0.5")
    assert_rule(["reward.functions=[exact_match, format]", "reward.correct_score=2.5"],
                "set reward.correct_score <= 2")
    load("reward.functions=[exact_match, format]", "reward.correct_score=2")  # both pay: reachable
    load("reward.function_weights=[0.5]", "reward.correct_score=0.5")
    # without functions evaluation scores with exact_match (pays at most 1)
    assert_rule(["reward.functions=[]", "reward.use_model=true", "reward.model_path=x", "reward.correct_score=1.5"],
                "reward.correct_score=1.5 can never be reached")


def test_correct_score_is_not_checked_for_user_functions(tmp_path):
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text("def score(p, r, a, f):\n    return [10.0] * len(r)\n")
    cfg = load(f"reward.functions=[{reward_file}:score]", "reward.correct_score=10")
    assert cfg.reward.correct_score == 10.0


def test_eval_pass_k_is_at_least_one():
    assert load("trainer.eval_pass_k=8").trainer.eval_pass_k == 8
    assert load().trainer.eval_pass_k == 1
    with pytest.raises(ConfigError, match="trainer.eval_pass_k"):
        load("trainer.eval_pass_k=0")


def test_top_k_off_or_positive():
    load("rollout.top_k=-1")
    load("rollout.top_k=20")
    assert_rule(["rollout.top_k=0"], "rollout.top_k must be -1 (off) or >= 1, got 0")


def test_actor_model_path_required_and_capture_sizes_positive():
    assert_rule(["actor.model_path="], "actor.model_path is required")
    assert_rule(["rollout.vllm.cudagraph_capture_sizes=[1, 0]"], "cudagraph_capture_sizes must be >= 1")


def test_deepspeed_launcher_needs_equal_ranks_across_used_roles():
    load("cluster.launcher=deepspeed", recipe="ppo_tiny")
    assert_rule(["cluster.launcher=deepspeed", "actor.num_ranks=2"],
                "cluster.launcher='deepspeed' runs every role on every rank; got actor.num_ranks=2, "
                "critic.num_ranks=1, reference.num_ranks=1", recipe="ppo_tiny")
    load("cluster.launcher=deepspeed", "actor.num_ranks=2")  # grpo_tiny: only the actor is used


@pytest.mark.parametrize("role", ["actor", "critic"])
@pytest.mark.parametrize("betas", [[1.5, 2.0], [0.9, 1.0], [-0.1, 0.999]])
def test_adam_betas_must_be_in_zero_one(role, betas):
    # checked for the critic too, even when this run has none (like every field bound)
    assert_rule([f"{role}.adam_betas={betas}"], f"{role}.adam_betas must each be in [0, 1), got {betas}")


def test_adam_betas_accept_the_closed_lower_end():
    cfg = load("actor.adam_betas=[0, 0.999]", "critic.adam_betas=[0.5, 0]")
    assert cfg.actor.adam_betas == (0.0, 0.999) and cfg.critic.adam_betas == (0.5, 0.0)


@pytest.mark.parametrize("override,shown", [("trainer.output_dir=", "''"), ("trainer.output_dir='  '", "'  '")])
def test_output_dir_must_not_be_empty(override, shown):
    assert_rule([override], f"trainer.output_dir must be a non-empty path (metrics and checkpoints go "
                            f"there), got {shown}")
    assert load("trainer.output_dir=outputs/x").trainer.output_dir == "outputs/x"


def test_vllm_backend_refuses_truncated_sampling():
    assert_rule(["rollout.backend=vllm", "rollout.top_p=0.95"], "needs rollout.top_p=1 and rollout.top_k=-1")
    assert load("rollout.backend=vllm").rollout.backend == "vllm"


def test_inference_roles_ranks_divide_the_step_and_prompt_mean_keeps_groups_whole():
    ref = ["algo.kl_placement=loss", "algo.kl_coef=0.1", "reference.model_path=tiny:llama-arith"]
    assert_rule(ref + ["reference.num_ranks=3"], "reference.num_ranks=3 must divide the 256 sequences")
    assert load(*ref, "reference.num_ranks=4").reference.num_ranks == 4
    assert_rule(["algo.loss_reduction=prompt_mean", "algo.mini_batch_size=4", "actor.micro_batch_size=4",
                 "rollout.n=8"], "algo.mini_batch_size=4 must be a multiple of rollout.n=8")
    assert load("algo.loss_reduction=prompt_mean", "algo.mini_batch_size=64",
                "actor.micro_batch_size=64").algo.mini_batch_size == 64


def test_token_mean_legacy_needs_equal_actor_and_critic_micro_batches():
    legacy = "algo.loss_reduction=token_mean_legacy"
    assert load(legacy, recipe="ppo_tiny").critic.micro_batch_size == 32  # actor 32 too
    load(legacy, "critic.micro_batch_size=16")  # grpo_tiny: no critic
    load("critic.micro_batch_size=16", recipe="ppo_tiny")  # other modes: each role its own micro-batches
    assert_rule([legacy, "critic.micro_batch_size=16"],
                "algo.loss_reduction='token_mean_legacy' averages per micro-batch, and actor and critic "
                "share its token weights: critic.micro_batch_size=16 must equal actor.micro_batch_size=32",
                recipe="ppo_tiny")


def test_training_temperature_must_be_positive():
    with pytest.raises(ConfigError, match="rollout.temperature"):
        load("rollout.temperature=0")


def test_all_failing_rules_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load("rollout.n=1", "algo.dual_clip=0.5", "rollout.top_k=0")
    message = str(err.value)
    assert "rollout.n >= 2" in message and "dual_clip" in message and "top_k" in message


# ----------------------------------------------------------------------------- frozen, derived, printing

def test_frozen_after_load():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.algo.kl_coef = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    with pytest.raises(AttributeError):
        cfg.reward.functions.append("format")  # sequences are tuples


def test_derived_values_are_properties_not_fields():
    cfg = load_config("ppo_tiny")
    assert (cfg.needs_critic, cfg.needs_reference, cfg.uses_reward_model) == (True, True, False)
    assert cfg.loss_norm_len == cfg.rollout.max_response_len == 16
    assert load("algo.loss_norm_len=40").loss_norm_len == 40
    names = {f.path.split(".")[-1] for f in iter_fields(Config)}
    assert not {"needs_critic", "needs_reference", "uses_reward_model", "summary_interval"} & names
    assert "needs_critic" not in cfg.to_dict()


def test_summary_interval_is_about_twenty_lines_per_run_by_default():
    assert Config().trainer.log_interval == 0
    assert load("trainer.max_steps=900").summary_interval == 45
    assert load("trainer.max_steps=41").summary_interval == 2
    assert load("trainer.max_steps=19").summary_interval == 1  # never 0, even for short runs
    cfg = load("trainer.max_steps=900", "trainer.log_interval=7")
    assert cfg.summary_interval == 7 and cfg.trainer.log_interval == 7
    with pytest.raises(ConfigError, match=r"trainer\.log_interval: must be >= 0, got -1"):
        load("trainer.log_interval=-1")


def test_to_yaml_round_trip(tmp_path):
    cfg = load("algo.kl_coef=1e-3", "reward.function_weights=[2]", recipe="ppo_tiny")
    path = tmp_path / "resolved.yaml"
    cfg.save(str(path))
    assert load_config(str(path)) == cfg
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()


def test_every_field_is_documented():
    undocumented = [f.path for f in iter_fields(Config) if len(f.help) < 8]
    assert not undocumented


def test_config_module_imports_no_heavy_framework():
    code = ("import sys, rlhf_ds.config, rlhf_ds.cli; "
            "print(sorted(m for m in ('torch', 'ray', 'deepspeed', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- CLI

def test_cli_config_show_prints_resolved_yaml(capsys):
    assert cli.main(["config", "show", "ppo_tiny", "algo.kl_coef=0.5", "actor.num_ranks=2"]) == 0
    out = capsys.readouterr().out
    expected = load_config("ppo_tiny", ["algo.kl_coef=0.5", "actor.num_ranks=2"])
    assert yaml.safe_load(out) == expected.to_dict()
    assert "# derived: needs_critic=true, needs_reference=true, uses_reward_model=false" in out


def test_cli_config_show_default(capsys):
    assert cli.main(["config", "show"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == load_config(None).to_dict()


@pytest.mark.parametrize("args,fragment", [
    (["algo.kl_cof=1"], "did you mean 'algo.kl_coef'?"),
    (["algo.policy_loss=ppx"], "valid choices: 'ppo', 'gspo'"),
    (["ppo_tiny", "not_an_override"], "expected key=value"),
    (["missing.yaml"], "config file not found"),
])
def test_cli_errors_exit_2_without_traceback(capsys, args, fragment):
    assert cli.main(["config", "show", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and fragment in captured.err
    assert captured.err.startswith("rlhf-ds: error: ") and "Traceback" not in captured.err


def test_cli_subprocess_bad_key_exit_code():
    proc = subprocess.run([sys.executable, "-m", "rlhf_ds.cli", "config", "show", "algoo.x=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'algo'?" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_help_and_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0 and "config" in capsys.readouterr().out
    assert cli.main(["config", "fields"]) == 0
    out = capsys.readouterr().out
    for f in iter_fields(Config):
        assert f"{f.path}: " in out and f.help in out
    assert cli.main(["config", "fields", "algo.kl"]) == 0
    assert "algo.kl_coef: float = 0.0" in capsys.readouterr().out
    assert cli.main(["config", "fields", "nope"]) == 2


def test_cli_registration_adds_a_command(monkeypatch, capsys):
    def run(ns):
        print(cli.config_from_args(ns).rollout.n)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "echo", cli.Command("print rollout.n", cli.add_config_arguments, run))
    assert cli.main(["echo", "ppo_tiny", "rollout.n=3", "data.prompts_per_step=128"]) == 0
    assert capsys.readouterr().out.strip() == "3"


def test_cli_ignores_the_deepspeed_launchers_local_rank(capsys):
    from rlhf_ds.cli import main

    assert main(["config", "show", "algo.kl_coef=0.5", "--local_rank=1"]) == 0
    assert "kl_coef: 0.5" in capsys.readouterr().out
    assert main(["config", "show", "--local_rank", "0", "algo.kl_coef=0.25"]) == 0
    assert "kl_coef: 0.25" in capsys.readouterr().out


def test_cli_overrides_may_follow_options(capsys, monkeypatch):
    from rlhf_ds import cli

    seen = {}
    command = cli.COMMANDS["train"]
    monkeypatch.setitem(cli.COMMANDS, "train", cli.Command(
        command.help, command.add_arguments, lambda ns: seen.update(vars(ns)) or 0))
    assert cli.main(["train", "ppo_tiny", "--no-progress", "algo.kl_coef=0.5", "seed=3"]) == 0
    assert seen["config_args"] == ["ppo_tiny", "algo.kl_coef=0.5", "seed=3"] and seen["no_progress"]
    with pytest.raises(SystemExit):
        cli.main(["train", "ppo_tiny", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_stage_commands_validate_by_their_own_rules():
    """`rlhf-ds sft` / `rlhf-ds rm` train one role on their own batches: the RL batch rules (mini-batches of
    rollouts split over the RL roles' ranks) do not refuse their configs, the stage rules still do."""
    overrides = ["actor.num_ranks=3"]
    with pytest.raises(ConfigError, match=r"algo.mini_batch_size=256 must be divisible by actor.num_ranks"):
        load_config("sft_tiny", overrides)
    assert load_config("sft_tiny", overrides, stage="sft").actor.num_ranks == 3
    cfg = load_config("rm_tiny", ["reward.num_ranks=3", "cluster.launcher=deepspeed"], stage="rm")
    assert cfg.reward.num_ranks == 3
    with pytest.raises(ConfigError, match=r"trainer.rm.batch_size=2 must be at least reward.num_ranks=3"):
        load_config("rm_tiny", ["reward.num_ranks=3", "trainer.rm.batch_size=2"], stage="rm")
    with pytest.raises(ConfigError, match=r"reward.correct_score=2.0 can never be reached"):
        load_config("sft_tiny", ["reward.correct_score=2.0"], stage="sft")
    with pytest.raises(ValueError, match="unknown stage 'ppo'; valid stages: rl, sft, rm"):
        load_config("sft_tiny", stage="ppo")
