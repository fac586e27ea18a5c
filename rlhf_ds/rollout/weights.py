"""The weight-update protocol between the actor and the rollout engines, transport aside.

One update, whatever carries the tensors (Ray's object store, a shared-memory file, NCCL, CUDA IPC):

    engine.start_weight_update(manifest, version)   # every (name, dtype, shape) the actor will send,
                                                    # checked against the engine's own model: refused
                                                    # before anything is loaded
    engine.update_weights(bucket) ...               # buckets in manifest order, each checked on arrival
    engine.finish_weight_update()                   # the new weights go live, all at once

An engine serves its previous weights until ``finish_weight_update``: a refused manifest or a bucket
that does not match leaves it generating exactly what it generated before, never half-loaded.
Names are the HF parameter names of the actor's model (tied parameters once); dtypes are the engine's
(the actor casts before sending, so bf16 engines receive half the bytes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch


@dataclass(frozen=True)
class ParamSpec:
    name: str
    dtype: str                    # torch dtype name without the "torch." prefix: "float32", "bfloat16"
    shape: tuple[int, ...]


Manifest = list[ParamSpec]


class WeightMismatch(ValueError):
    """An update whose names, shapes or dtypes do not match the engine's model."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def manifest_of(named: Iterable[tuple[str, torch.Tensor]]) -> Manifest:
    return [ParamSpec(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in named]


def expected_manifest(model_path: str, dtype: torch.dtype) -> Manifest:
    """What an engine serving the HF model at ``model_path`` in ``dtype`` must receive, read from its
    ``config.json`` with a model built on the meta device (no weights loaded, no memory used)."""
    # transformers: loaded when first needed
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return manifest_of(model.named_parameters())


def check_manifest(expected: Sequence[ParamSpec], announced: Sequence[ParamSpec], engine: str) -> None:
    """Raise :class:`WeightMismatch` naming every missing, unexpected or differently shaped / typed
    parameter (at most 8 of each kind), or return when ``announced`` covers ``expected`` exactly."""
    want = {p.name: p for p in expected}
    got = {p.name: p for p in announced}
    problems = []
    missing = [n for n in want if n not in got]
    unexpected = [n for n in got if n not in want]
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"not in the engine's model {_few(unexpected)}")
    if len(got) != len(announced):
        problems.append("names sent twice")
    wrong = [f"{n}: sent {got[n].dtype}{list(got[n].shape)}, engine has {want[n].dtype}{list(want[n].shape)}"
             for n in want if n in got and (got[n].shape != want[n].shape or got[n].dtype != want[n].dtype)]
    if wrong:
        problems.append(f"shape / dtype differs for {_few(wrong)}")
    if problems:
        raise WeightMismatch(f"weight update refused by {engine} (it keeps its current weights): "
                             + "; ".join(problems))


def _few(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def active_session(session: Optional["UpdateSession"], engine: str) -> "UpdateSession":
    """The update in progress on ``engine``, or an error saying there is none (never started, or refused)."""
    if session is None:
        raise RuntimeError(f"{engine}: no weight update in progress (start_weight_update first, or the update "
                           f"was refused)")
    return session


class UpdateSession:
    """One update in progress on the engine side: checks each bucket against the manifest, in order,
    and keeps the tensors until :meth:`complete` hands them over."""

    def __init__(self, expected: Sequence[ParamSpec], manifest: Sequence[ParamSpec], version: str, engine: str):
        check_manifest(expected, manifest, engine)
        self.manifest, self.version, self.engine = list(manifest), version, engine
        self.position = 0

    def accept(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Check the next bucket; raise :class:`WeightMismatch` if it is not what the manifest said."""
        for name, tensor in bucket:
            if self.position >= len(self.manifest):
                raise WeightMismatch(f"{self.engine}: {name!r} arrived after the {len(self.manifest)} announced "
                                     f"parameters; the update is dropped")
            spec = self.manifest[self.position]
            if (name, dtype_name(tensor.dtype), tuple(tensor.shape)) != (spec.name, spec.dtype, spec.shape):
                raise WeightMismatch(f"{self.engine}: parameter {self.position} arrived as {name!r} "
                                     f"{dtype_name(tensor.dtype)}{list(tensor.shape)}, announced as {spec.name!r} "
                                     f"{spec.dtype}{list(spec.shape)}; the update is dropped")
            self.position += 1

    def complete(self) -> None:
        if self.position != len(self.manifest):
            raise WeightMismatch(f"{self.engine}: {self.position} of {len(self.manifest)} announced parameters "
                                 f"arrived; the update is dropped and the engine keeps its weights")


def load_in_process(actor_worker, engine, bucket_bytes: int, version: str) -> int:
    """One update of an engine living in the actor rank's own process (the deepspeed launcher's ranks,
    ``rollout.hf_in_actor`` under Ray): the manifest checked first, every bucket gathered (collective: every
    actor rank walks them all) and handed over in memory, the new weights live at the end. Returns the
    tensors loaded."""
    engine.start_weight_update(actor_worker.weight_manifest(), version)
    count = 0
    for bucket in actor_worker.weight_buckets(bucket_bytes):
        engine.update_weights(bucket)
        count += len(bucket)
    engine.finish_weight_update()
    return count
