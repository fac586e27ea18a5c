"""The reward functions: the built-in rules, their registry, and the loader of user functions.

Contract of a reward function::

    fn(prompts: list[str], responses: list[str], answers: list[str], finished: list[bool]) -> list[float]

one float per sample, batch in, batch out. ``responses`` are the generated texts decoded *without*
special tokens (the eos token is not in the text); ``finished[i]`` is True when sample i stopped on an
eos token rather than on the length limit. ``answers`` are the dataset's reference answers.

Functions are named in the config by registry name (``exact_match``, ``format``, ``final_number``,
``code_tests``; ``rlhf_ds.choices.BUILTIN_REWARDS``), by ``path/to/file.py:fn`` (loaded from that file)
or by ``package.module:fn``. They run in the isolated worker processes of ``rewards.runner``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Callable, Sequence, cast, get_args

from rlhf_ds.choices import BuiltinReward
from rlhf_ds.rewards.sandbox import code_tests

RewardFn = Callable[[list, list, list, list], Sequence[float]]


class RewardFunctionError(RuntimeError):
    """A reward function that is misconfigured or broke the contract (wrong length, non-finite...)."""


def exact_match(prompts: list[str], responses: list[str], answers: list[str], finished: list[bool]
                ) -> list[float]:
    """1.0 when the response (surrounding whitespace ignored) equals the answer AND ended on eos.

    Checking eos matters: without it an answer followed by endless text is paid (docs/benchmarks.md#how-the-demo-task-was-chosen).
    """
    return [1.0 if done and resp.strip() == ans.strip() else 0.0
            for resp, ans, done in zip(responses, answers, finished, strict=True)]


_INTEGER = re.compile(r"\s*-?\d+\s*")


def format_reward(prompts: list[str], responses: list[str], answers: list[str], finished: list[bool]
                  ) -> list[float]:
    """1.0 when the response is only an integer (digits, optional minus sign) then eos, whatever its value."""
    return [1.0 if done and _INTEGER.fullmatch(resp) else 0.0
            for resp, done in zip(responses, finished, strict=True)]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The number a worked solution ends on: the one after the last ``####`` (GSM8K's answer marker)
    when there is one, else the last number in the text; commas dropped, ``72.0`` read as ``72``."""
    tail = text.rsplit("####", 1)[-1]
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def final_number_match(prompts: list[str], responses: list[str], answers: list[str], finished: list[bool]
                       ) -> list[float]:
    """1.0 when the response's final number equals the answer's final number AND the response ended on
    eos: for worked solutions (math datasets such as GSM8K, whose answers end with ``#### N``)."""
    return [1.0 if done and (got := final_number(resp)) is not None and got == final_number(ans) else 0.0
            for resp, ans, done in zip(responses, answers, finished, strict=True)]


REWARD_FUNCTIONS: dict[BuiltinReward, RewardFn] = {"exact_match": exact_match, "format": format_reward,
                                         "final_number": final_number_match, "code_tests": code_tests}
if set(REWARD_FUNCTIONS) != set(get_args(BuiltinReward)):
    raise RuntimeError("every built-in reward name in rlhf_ds.choices needs a function here, and only those")


def _spec_error(spec: str, why: str) -> RewardFunctionError:
    return RewardFunctionError(
        f"reward function {spec!r}: {why}. Valid: a registry name {sorted(REWARD_FUNCTIONS)}, "
        "'path/to/file.py:function' or 'package.module:function'")


def _split_spec(spec: str) -> tuple[str, str]:
    """``"dir/f.py:fn"`` -> ``("dir/f.py", "fn")``; rejects strings that are no valid spec."""
    target, sep, fn_name = spec.rpartition(":")
    if not sep or not target or not fn_name.isidentifier():
        raise _spec_error(spec, "unknown name")
    return target, fn_name


def check_reward_spec(spec: str) -> str:
    """Validate ``spec`` without running user code; a file path is made absolute (workers may chdir)."""
    if spec in REWARD_FUNCTIONS:
        return spec
    target, fn_name = _split_spec(spec)
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise _spec_error(spec, f"file {target} does not exist")
        return f"{path}:{fn_name}"
    return spec


def load_reward_function(spec: str) -> RewardFn:
    """The callable named by ``spec`` (imports or executes the user's file)."""
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[spec]
    target, fn_name = _split_spec(spec)
    if target.endswith(".py"):
        path = Path(target).resolve()
        module_name = "rlhf_ds_user_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        module = sys.modules.get(module_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            if module_spec is None or module_spec.loader is None:
                raise _spec_error(spec, f"cannot import {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # so that pickling and dataclasses inside the file work
            module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        functions = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise _spec_error(spec, f"{target} defines no function {fn_name!r}; callables there: {functions}")
    return cast(RewardFn, fn)  # the runner checks what it returns against the contract
