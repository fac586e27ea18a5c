"""Every choice list is declared once, in rlhf_ds/choices.py, and every user reads it from there.

The scan below looks at every list, tuple and set display in rlhf_ds/ (a ``Literal[...]`` subscript is a
tuple display too). One that holds two or more values of a choice list is a second copy of that list,
which could drift from the first; single values (``mode == "k1"``) and dict keys (a registry of
functions by name) are not lists of choices and are allowed.
"""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

from rlhf_ds import choices
from rlhf_ds.config import Config
from rlhf_ds.config_loader import iter_fields

PACKAGE = Path(choices.__file__).parent
CHOICES_FILE = Path(choices.__file__)
CHOICE_LISTS = {name: get_args(alias) for name, alias in vars(choices).items() if get_origin(alias) is Literal}


def choice_list_copies(source: str, where: str) -> list[str]:
    """'where:line: Alias' for each list / tuple / set display in ``source`` holding 2+ values of one list."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            continue
        strings = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        found += [f"{where}:{node.lineno}: {name}" for name, values in CHOICE_LISTS.items()
                  if len(strings & set(values)) >= 2]
    return found


def test_every_config_choice_list_is_found():
    assert {"Precision", "LrSchedule", "AdvantageEstimator", "LossReduction", "PolicyLoss", "KlEstimator",
            "KlPlacement"} <= set(CHOICE_LISTS)


@pytest.mark.parametrize("snippet", [
    'KL_ESTIMATORS = ("k1", "k2", "k3")',
    'Schedule = Literal["constant", "cosine"]',
    'if mode in {"token_mean_legacy", "prompt_mean"}: pass',
    'GROUP = ["grpo", "rloo", "other"]',
    'POLICY_LOSSES = ("ppo", "gspo")',
])
def test_the_scan_finds_a_copy(snippet):
    """The negative control: a copy of (part of) a list, in any display form, is reported."""
    assert choice_list_copies(snippet, "snippet")


@pytest.mark.parametrize("snippet", [
    'if estimator == "k3": pass',
    'MODES = ("grpo_no_std", "mean")',
    'REGISTRY = {"ppo": ppo_loss, "gspo": gspo_loss}',
])
def test_the_scan_allows_single_values_and_registries(snippet):
    assert not choice_list_copies(snippet, "snippet")


def test_no_choice_list_is_declared_outside_choices_py():
    copies = [copy for path in sorted(PACKAGE.rglob("*.py")) if path != CHOICES_FILE
              for copy in choice_list_copies(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))]
    assert not copies, f"choice lists belong in rlhf_ds/choices.py only; copies: {copies}"


def test_config_fields_use_the_aliases_of_choices_py():
    aliases = set(CHOICE_LISTS.values())
    for info in iter_fields(Config):
        if info.choices:
            assert info.choices in aliases, f"{info.path}: its Literal is not declared in rlhf_ds/choices.py"


def test_subsets_are_cut_from_their_list():
    estimators = set(choices.ADVANTAGE_ESTIMATORS)
    assert set(choices.GROUP_ESTIMATORS) < estimators
    assert set(choices.TOKEN_REWARD_ESTIMATORS) < estimators
    assert set(choices.PRESCALED_REDUCTIONS) <= set(choices.LOSS_REDUCTIONS)
    assert choices.ROLES == choices.TRAINABLE_ROLES + choices.INFERENCE_ROLES


def test_users_reexport_the_one_declaration():
    from rlhf_ds import algo
    from rlhf_ds.engine import build, ds_config

    assert algo.LOSS_REDUCTIONS is choices.LOSS_REDUCTIONS
    assert algo.ADVANTAGE_ESTIMATORS is choices.ADVANTAGE_ESTIMATORS
    assert algo.KL_ESTIMATORS is choices.KL_ESTIMATORS
    assert algo.TOKEN_REWARD_ESTIMATORS is choices.TOKEN_REWARD_ESTIMATORS
    assert ds_config.PRECISIONS is choices.PRECISIONS and build.LR_SCHEDULES is choices.LR_SCHEDULES


def test_choices_imports_only_the_standard_library():
    tree = ast.parse(CHOICES_FILE.read_text(encoding="utf-8"))
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {m.split(".")[0] for m in modules} <= set(sys.stdlib_module_names), modules
    code = "import sys, rlhf_ds.choices; print(sorted(m for m in sys.modules if m.startswith('rlhf_ds')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['rlhf_ds', 'rlhf_ds.choices']"
