"""Every YAML config shipped in the repository loads, validates and round-trips."""
from pathlib import Path

import pytest

from rlhf_ds.config import DEFAULT_RECIPE, list_recipes, load_config

REPO = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO / "rlhf_ds" / "recipes"
SHIPPED = sorted(
    [*RECIPE_DIR.glob("*.yaml"), *(REPO / "scripts").rglob("*.yaml"), *(REPO / "scripts").rglob("*.yml")])


def test_expected_recipes_are_shipped_as_package_data():
    names = {p.stem for p in RECIPE_DIR.glob("*.yaml")}
    assert {"grpo_tiny", "ppo_tiny", "grpo_qwen2.5_1.5b_gsm8k", "ppo_qwen2.5_0.5b"} <= names
    assert DEFAULT_RECIPE in names
    assert set(list_recipes()) == names  # what importlib.resources sees is what the repo ships
    assert not list(RECIPE_DIR.glob("*.yml")), "recipes must end in .yaml (package_data pattern)"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_yaml_loads_validates_and_round_trips(path, tmp_path):
    cfg = load_config(str(path))
    resolved = tmp_path / "resolved.yaml"
    cfg.save(str(resolved))
    assert load_config(str(resolved)) == cfg


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_yaml_points_at_shipped_ds_configs(path):
    cfg = load_config(str(path))
    for role in ("actor", "critic", "reference", "reward"):
        ds_config = getattr(cfg, role).ds_config
        assert Path(ds_config).is_absolute() or (REPO / ds_config).is_file(), f"{role}: {ds_config}"


def test_recipe_names_load_like_paths():
    for name in list_recipes():
        assert load_config(name) == load_config(str(RECIPE_DIR / f"{name}.yaml"))
        assert load_config(f"{name}.yaml") == load_config(name)


def test_recipes_describe_what_they_promise():
    grpo, ppo = load_config("grpo_tiny"), load_config("ppo_tiny")
    assert (grpo.algo.advantage_estimator, grpo.rollout.backend) == ("grpo", "hf")
    assert not grpo.needs_reference and not grpo.needs_critic
    assert (ppo.algo.advantage_estimator, ppo.algo.kl_placement) == ("gae", "loss")
    assert not ppo.uses_reward_model
    assert ppo.needs_critic and ppo.needs_reference
    for name in ("grpo_qwen2.5_1.5b_gsm8k", "ppo_qwen2.5_0.5b"):
        gpu = load_config(name)
        assert gpu.rollout.backend == "vllm" and gpu.data.train_path.endswith(".jsonl")
        assert not gpu.rollout.vllm.enforce_eager   # CUDA graphs on
        assert gpu.actor.model_path.startswith("/path/to/")  # placeholders users replace
    assert load_config("ppo_qwen2.5_0.5b").uses_reward_model
