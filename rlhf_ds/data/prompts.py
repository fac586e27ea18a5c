"""Prompt datasets: JSONL, parquet, local HF ``datasets`` directories, and synthetic tasks.

Every source becomes a list of :class:`PromptRecord` (prompt text, reference answer, metadata). A row
that cannot become one fails with a :class:`DatasetError` naming the file, the line (JSONL, 1-based)
or row (parquet / datasets, 0-based) and what was wrong. :class:`PromptLoader` serves seeded, shuffled
batches of records and can resume at the same position from its ``state_dict()``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Generic, Iterable, Iterator, Protocol, Sequence, TypeVar

import numpy as np

from rlhf_ds.data.records import PromptRecord
from rlhf_ds.data.tasks import generate_split, train_split_size

SYNTHETIC_PREFIX = "synthetic:"


class DatasetError(ValueError):
    """A dataset file or row that cannot be read as prompt records."""


def _record_from_row(row: Any, where: str, prompt_key: str, answer_key: str, meta: dict) -> PromptRecord:
    """Validate one row (a mapping) and build its record; ``where`` names the file and line for errors."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object with keys {prompt_key!r} and {answer_key!r}, "
                           f"got {type(row).__name__}")
    values = {}
    for key in (prompt_key, answer_key):
        if key not in row:
            raise DatasetError(f"{where}: missing key {key!r}; keys present: {sorted(row)}")
        if not isinstance(row[key], str):
            raise DatasetError(f"{where}: value of {key!r} must be a string, got "
                               f"{type(row[key]).__name__} {row[key]!r}")
        values[key] = row[key]
    return PromptRecord(prompt=values[prompt_key], answer=values[answer_key], meta=meta)


def _load_jsonl(path: Path, prompt_key: str, answer_key: str) -> list[PromptRecord]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            records.append(_record_from_row(row, where, prompt_key, answer_key,
                                            {"source": str(path), "line": line_no}))
    return records


def _records_from_rows(rows: Iterable[object], path: Path, prompt_key: str, answer_key: str
                       ) -> list[PromptRecord]:
    return [_record_from_row(row, f"{path}: row {i}", prompt_key, answer_key, {"source": str(path), "row": i})
            for i, row in enumerate(rows)]


def _load_parquet(path: Path, prompt_key: str, answer_key: str) -> list[PromptRecord]:
    import pyarrow.parquet as pq  # pyarrow: only to read parquet files

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise DatasetError(f"{path}: cannot read as parquet ({err})") from None
    return _records_from_rows(table.to_pylist(), path, prompt_key, answer_key)


def _load_hf_dir(path: Path, prompt_key: str, answer_key: str, split: str) -> list[PromptRecord]:
    import datasets  # datasets: only for a saved HF dataset

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError or its own errors
        raise DatasetError(f"{path}: cannot load as a saved HF dataset ({err})") from None
    if isinstance(data, datasets.DatasetDict):
        if len(data) == 1:
            data = next(iter(data.values()))
        elif split in data:
            data = data[split]
        else:
            raise DatasetError(f"{path}: dataset has splits {sorted(data)}, none is the requested "
                               f"split {split!r}")
    return _records_from_rows(iter(data), path, prompt_key, answer_key)


def load_prompt_dataset(path: str | os.PathLike, prompt_key: str = "prompt", answer_key: str = "answer",
                        *, split: str = "train", num_examples: int | None = None, task_seed: int = 0
                        ) -> list[PromptRecord]:
    """Load prompt records from ``path``.

    path: ``*.jsonl`` / ``*.json`` (one object per line), ``*.parquet``, a directory written by
      ``datasets.Dataset(Dict).save_to_disk``, or ``"synthetic:<task>"`` (see :mod:`rlhf_ds.data.tasks`).
    split: for synthetic tasks "train" or "eval" (the held-out split); for a saved ``DatasetDict``
      the split to read (a single-split dict is read whatever its name); ignored for files.
    num_examples: keep the first ``num_examples`` records (synthetic: generate that many); None = all.
    task_seed: seed of the synthetic problems and of their train / held-out partition.
    """
    path_str = str(path)
    if path_str.startswith(SYNTHETIC_PREFIX):
        return generate_split(path_str[len(SYNTHETIC_PREFIX):], split, num_examples, task_seed)
    file = Path(path_str)
    if not file.exists():
        raise DatasetError(f"{file}: no such file or directory (expected .jsonl, .parquet, a saved HF "
                           f"dataset directory, or '{SYNTHETIC_PREFIX}<task>')")
    if file.is_dir():
        records = _load_hf_dir(file, prompt_key, answer_key, split)
    elif file.suffix in (".jsonl", ".json"):
        records = _load_jsonl(file, prompt_key, answer_key)
    elif file.suffix == ".parquet":
        records = _load_parquet(file, prompt_key, answer_key)
    else:
        raise DatasetError(f"{file}: unsupported file type {file.suffix!r}; valid: .jsonl, .json, .parquet, "
                           "a saved HF dataset directory")
    if not records:
        raise DatasetError(f"{file}: no records")
    return records if num_examples is None else records[:num_examples]


def load_run_records(data: Any) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train records, held-out records) of a run's ``data`` config section. A synthetic task supplies
    its own disjoint held-out split."""
    synthetic = data.train_path.startswith(SYNTHETIC_PREFIX)
    num_train = None
    if synthetic:
        num_train = train_split_size(data.train_path[len(SYNTHETIC_PREFIX):], data.num_train)
    train = load_prompt_dataset(data.train_path, data.prompt_key, data.answer_key, split="train",
                                num_examples=num_train, task_seed=data.task_seed)
    if data.eval_path:
        held_out = load_prompt_dataset(data.eval_path, data.prompt_key, data.answer_key, split="eval",
                                       num_examples=data.num_eval, task_seed=data.task_seed)
    elif synthetic:
        held_out = load_prompt_dataset(data.train_path, split="eval", num_examples=data.num_eval,
                                       task_seed=data.task_seed)
    else:
        raise DatasetError(f"data.eval_path is empty and data.train_path={data.train_path!r} is not synthetic: "
                           f"set data.eval_path to a held-out prompt file")
    return train, held_out


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool = False) -> list[int]:
    """Token ids of one prompt: ``tokenizer(prompt)`` (special tokens such as bos included), or with
    ``chat_template`` the prompt as one user turn in the tokenizer's chat template, ending with the
    assistant's generation prompt (``data.apply_chat_template``)."""
    if chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return tokenizer(prompt)["input_ids"]


class HasPrompt(Protocol):
    """A record with a prompt: a :class:`PromptRecord` or a ``PreferenceRecord``."""

    @property
    def prompt(self) -> str: ...


def encode_prompts(tokenizer: Any, records: Sequence[HasPrompt], max_prompt_len: int, *,
                   chat_template: bool = False) -> list[list[int]]:
    """Token ids of each prompt (:func:`encode_prompt`); prompts longer than ``max_prompt_len`` tokens are
    refused."""
    ids = [encode_prompt(tokenizer, r.prompt, chat_template) for r in records]
    too_long = [(r.prompt, len(i)) for r, i in zip(records, ids, strict=True) if len(i) > max_prompt_len]
    if too_long:
        raise ValueError(f"{len(too_long)} prompts exceed rollout.max_prompt_len={max_prompt_len} tokens, "
                         f"e.g. {too_long[0][0]!r} ({too_long[0][1]} tokens); raise rollout.max_prompt_len")
    return ids


RecordT = TypeVar("RecordT")


class PromptLoader(Generic[RecordT]):
    """Endless batches of ``batch_size`` records (prompt or preference records), reshuffled every epoch
    from ``seed``.

    An epoch's order depends only on (seed, epoch), so ``state_dict()`` = (epoch, position) is enough to
    resume at the same data position. A tail shorter than ``batch_size`` is skipped (every step sees a
    full batch); ``shuffle=False`` keeps the file order.
    """

    def __init__(self, records: list[RecordT], batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1 or batch_size > len(records):
            raise ValueError(f"batch_size (data.prompts_per_step) must be in [1, {len(records)}] (the number "
                             f"of records), got {batch_size}")
        self.records = records
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next record to serve
        self._cached_order: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.records) // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached_order is None or self._cached_order[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.records)) if self.shuffle
                     else np.arange(len(self.records)))
            self._cached_order = (epoch, order)
        return self._cached_order[1]

    def next_batch(self) -> list[RecordT]:
        if self.position + self.batch_size > len(self.records):
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order(self.epoch)[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return [self.records[i] for i in order]

    def __iter__(self) -> Iterator[list[RecordT]]:
        return self

    def __next__(self) -> list[RecordT]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_records": len(self.records)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``'s position; refuses a state saved for a different dataset size or seed."""
        if state["num_records"] != len(self.records) or state["seed"] != self.seed:
            raise ValueError(f"loader state is for {state['num_records']} records with seed {state['seed']}, "
                             f"this loader has {len(self.records)} records with seed {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
