"""Synthetic verifiable tasks, generated locally: integer arithmetic and GSM8K-shaped word problems.

An arithmetic problem is ``"<a><op><b>="`` with answer ``str(a op b)``, e.g. ``"123*4="`` -> ``"492"``.
Operands have a fixed number of digits (no leading zeros). ``word_problems`` (:mod:`rlhf_ds.data.word_problems`)
are short stories whose answers are worked solutions ending in ``#### N`` (score them with ``final_number``).

A task is anything with a ``name``, a ``size`` and a ``record(index)`` (:class:`SyntheticTask`). Every task's
problem space is split once, by a hash of the problem index and the seed, into a held-out part
(``HELDOUT_FRACTION`` of it) and a train part, so the two splits are disjoint whatever sizes are requested
and the held-out set of a seed never changes.

Per docs/benchmarks.md#how-the-demo-task-was-chosen, ``multiplication`` (3-digit x 1-digit) is the one
on which a short SFT warm start + GRPO reliably shows a gain; ``addition`` (3-digit) is learnable but
often plateaus; ``addition_2d`` is too easy for RL and serves smoke tests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from rlhf_ds.data.records import PromptRecord
from rlhf_ds.data.word_problems import WORD_PROBLEMS

HELDOUT_FRACTION = 0.1
SPLITS = ("train", "eval")
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


class SyntheticTask(Protocol):
    """What the split and the loaders need of a task: its problems are indexed 0 .. size - 1."""

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int:
        """Number of distinct problems."""
        ...

    def record(self, index: int) -> PromptRecord:
        """The problem with index ``index`` in [0, size)."""
        ...


@dataclass(frozen=True)
class ArithmeticTask:
    """``digits_a``-digit ``op`` ``digits_b``-digit integer problems."""

    name: str
    op: str  # "+" | "*"
    digits_a: int
    digits_b: int

    def operand_range(self, digits: int) -> tuple[int, int]:
        """Inclusive bounds of a ``digits``-digit operand (1-digit operands start at 1, not 0)."""
        return 10 ** (digits - 1), 10**digits - 1

    @property
    def size(self) -> int:
        """Number of distinct problems."""
        (lo_a, hi_a), (lo_b, hi_b) = self.operand_range(self.digits_a), self.operand_range(self.digits_b)
        return (hi_a - lo_a + 1) * (hi_b - lo_b + 1)

    def operands(self, index: int) -> tuple[int, int]:
        """The problem with index ``index`` in [0, size)."""
        lo_a, _ = self.operand_range(self.digits_a)
        lo_b, hi_b = self.operand_range(self.digits_b)
        a_offset, b_offset = divmod(index, hi_b - lo_b + 1)
        return lo_a + a_offset, lo_b + b_offset

    def solve(self, a: int, b: int) -> int:
        return a + b if self.op == "+" else a * b

    def record(self, index: int) -> PromptRecord:
        a, b = self.operands(index)
        return PromptRecord(prompt=f"{a}{self.op}{b}=", answer=str(self.solve(a, b)),
                            meta={"task": self.name, "index": index})

    @property
    def alphabet(self) -> str:
        """Every character a prompt or an answer of this task can contain."""
        return "0123456789" + self.op + "="


TASKS: dict[str, SyntheticTask] = {
    task.name: task
    for task in (
        ArithmeticTask("addition", "+", 3, 3),
        ArithmeticTask("addition_2d", "+", 2, 2),
        ArithmeticTask("addition_4d", "+", 4, 4),
        ArithmeticTask("multiplication", "*", 3, 1),
        ArithmeticTask("multiplication_2x2", "*", 2, 2),
        WORD_PROBLEMS,
    )
}


def get_task(name: str) -> SyntheticTask:
    """The task called ``name``; the error lists every valid name."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; valid tasks: {sorted(TASKS)}")
    return TASKS[name]


def is_heldout(indices: np.ndarray, seed: int) -> np.ndarray:
    """Boolean mask: which problem indices belong to the held-out split of ``seed``.

    A splitmix64 hash of (index, seed), so membership depends on nothing else.
    """
    offset = np.uint64((seed * _GOLDEN + _GOLDEN) & _MASK64)
    z = np.asarray(indices, dtype=np.uint64) + offset  # uint64 arrays wrap silently, as intended
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(1_000_000)) < np.uint64(int(HELDOUT_FRACTION * 1_000_000))


def _split_indices(task: SyntheticTask, split: str, num: int | None, seed: int) -> np.ndarray:
    """``num`` distinct problem indices of ``split`` in a seeded random order (all of them if None)."""
    want_heldout = split == "eval"
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    fraction = HELDOUT_FRACTION if want_heldout else 1.0 - HELDOUT_FRACTION
    if num is None:
        candidates = rng.permutation(task.size)
    else:
        # Draw a few more candidates than needed (the split keeps ~fraction of them); fall back to
        # the whole space when that was not enough. choice() without replacement is O(k) for k << size.
        k = min(task.size, int(num / fraction * 1.2) + 64)
        candidates = rng.choice(task.size, size=k, replace=False)
        if int((is_heldout(candidates, seed) == want_heldout).sum()) < num and k < task.size:
            candidates = rng.permutation(task.size)
    chosen = candidates[is_heldout(candidates, seed) == want_heldout]
    if num is not None:
        if len(chosen) < num:
            raise ValueError(f"task {task.name!r} has only {len(chosen)} {split} problems for seed {seed}, "
                             f"{num} were requested")
        chosen = chosen[:num]
    return chosen


def generate_split(task_name: str, split: str = "train", num_examples: int | None = None,
                   seed: int = 0) -> list[PromptRecord]:
    """``num_examples`` distinct problems of ``split`` ("train" | "eval"); None -> the whole split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
    if num_examples is not None and num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    task = get_task(task_name)
    return [task.record(int(i)) for i in _split_indices(task, split, num_examples, seed)]


def train_split_size(task_name: str, requested: int) -> int | None:
    """How many train problems a run of ``data.num_train=requested`` draws: ``requested``, or None (the whole
    train split) when the task is too small for that (3-digit x 1-digit: 8100 problems, ~7300 for training)."""
    return requested if requested < 0.8 * get_task(task_name).size else None


def write_split_jsonl(task_name: str, path: str | os.PathLike, split: str = "train", num_examples: int | None = None,
                      seed: int = 0) -> Path:
    """Write :func:`generate_split`'s records to ``path`` as JSONL (keys ``prompt`` and ``answer``), the
    form a user's dataset takes (``data.train_path`` / ``data.eval_path``). Returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for record in generate_split(task_name, split, num_examples, seed):
            f.write(json.dumps({"prompt": record.prompt, "answer": record.answer}) + "\n")
    return out
