"""The runner that evaluates reward functions safely in worker processes and combines them by weight.

:class:`RewardRunner` calls the functions (``rewards.functions``) in spawned worker processes
(``rewards.pool``), never in the caller, and guarantees:

- a function that raises (a ``MemoryError`` past ``memory_limit_mb`` included) scores every sample of
  that call ``failure_value`` (counted in ``failures``), and so does a call whose worker died (killed by
  the memory or ``cpu_time_limit_s`` limit, ``os._exit``, a segfault): the worker is replaced.
- a call that runs past ``timeout_s`` scores ``failure_value`` (counted in ``timeouts``); its worker's
  whole process group is killed, so nothing the function spawned survives, and the worker is replaced.
  This works from any thread, unlike signal-based alarms which only fire on the main thread.
- a file or module is imported once per worker, under its own limit ``import_timeout_s`` (not counted in
  ``timeout_s``); an import that raises or runs past it is a :class:`RewardFunctionError`.
- when more than ``max_failure_fraction`` of a step's samples failed or timed out in one function, that is
  a :class:`RewardFunctionError` with the function's first error: a function that always fails stops the
  run instead of paying ``failure_value`` forever.
- a function that returns the wrong number of values, a non-number, or a non-finite value is a bug, not a
  bad sample: :class:`RewardFunctionError` naming the function.

Workers get a minimal environment (no tokens or keys of the trainer) and resource limits; see
``rewards.pool``. None of this is a security sandbox against hostile code.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import wait as wait_for_connections
from typing import Sequence

from rlhf_ds.rewards.functions import REWARD_FUNCTIONS, RewardFunctionError, check_reward_spec
from rlhf_ds.rewards.pool import WorkerProcess, stop_workers

logger = logging.getLogger(__name__)

def _short_names(functions: Sequence) -> list[str]:
    """Names for stats keys: the registry name or the function name, made unique by an index suffix."""
    names = []
    for fn in functions:
        name = fn if isinstance(fn, str) and fn in REWARD_FUNCTIONS else (
            fn.rpartition(":")[2] if isinstance(fn, str) else getattr(fn, "__name__", "reward"))
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def _chunks(n: int, parts: int) -> list[range]:
    """Split range(n) into ``parts`` contiguous, nearly equal, non-empty ranges (fewer if n < parts)."""
    parts = max(1, min(parts, n))
    bounds = [n * k // parts for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


class RewardRunner:
    """Evaluate reward functions in ``num_workers`` spawned processes and combine them with weights.

    functions: registry names, ``path/file.py:fn`` / ``module:fn`` strings, or picklable callables.
    weights: one per function (default all 1.0); the score of a sample is sum_f weight_f * score_f.
    Each function's batch is cut into up to ``num_workers`` contiguous calls that run in parallel; a
    failure or timeout affects only its own call, unless more than ``max_failure_fraction`` of the batch
    failed in one function (then :class:`RewardFunctionError`). Workers start on the first call, import
    the named functions (``import_timeout_s`` each) and stay warm; ``close()`` (or ``with``) stops them.
    Each worker is capped at ``memory_limit_mb`` of address space and ``cpu_time_limit_s`` of CPU per
    call (0 = no limit). Safe to call from any thread (calls are serialised).
    """

    def __init__(self, functions: Sequence, weights: Sequence[float] | None = None, timeout_s: float = 10.0,
                 failure_value: float = 0.0, num_workers: int = 2, start_timeout_s: float = 120.0, *,
                 max_failure_fraction: float = 0.5, import_timeout_s: float = 60.0,
                 memory_limit_mb: int = 4096, cpu_time_limit_s: int = 600):
        if not functions:
            raise ValueError("RewardRunner needs at least one reward function")
        weights = [1.0] * len(functions) if weights is None or len(weights) == 0 else list(weights)
        if len(weights) != len(functions):
            raise ValueError(f"{len(weights)} reward weights for {len(functions)} functions "
                             f"{list(functions)}")
        if not all(math.isfinite(w) for w in weights) or not math.isfinite(failure_value):
            raise ValueError(f"reward weights and failure_value must be finite: {weights}, {failure_value}")
        if num_workers < 1 or timeout_s <= 0 or import_timeout_s <= 0:
            raise ValueError(f"num_workers must be >= 1, timeout_s and import_timeout_s > 0, got "
                             f"{num_workers}, {timeout_s}, {import_timeout_s}")
        if not 0.0 <= max_failure_fraction <= 1.0 or memory_limit_mb < 0 or cpu_time_limit_s < 0:
            raise ValueError(f"max_failure_fraction must be in [0, 1], memory_limit_mb and cpu_time_limit_s "
                             f">= 0 (0 = no limit), got {max_failure_fraction}, {memory_limit_mb}, "
                             f"{cpu_time_limit_s}")
        self.functions = [check_reward_spec(f) if isinstance(f, str) else f for f in functions]
        self.names = _short_names(functions)
        self.weights = [float(w) for w in weights]
        self.timeout_s, self.failure_value = float(timeout_s), float(failure_value)
        self.num_workers, self.start_timeout_s = num_workers, start_timeout_s
        self.max_failure_fraction = float(max_failure_fraction)
        self.import_timeout_s = float(import_timeout_s)
        self.memory_limit_mb, self.cpu_time_limit_s = int(memory_limit_mb), int(cpu_time_limit_s)
        self._workers: list[WorkerProcess] = []
        self._lock = threading.Lock()
        weakref.finalize(self, stop_workers, self._workers)  # also runs at interpreter exit

    def __call__(self, prompts: list[str], responses: list[str], answers: list[str], finished: list[bool]
                 ) -> tuple[list[float], dict[str, float]]:
        """Scores [B] and stats: ``<name>/mean``, ``<name>/failures``, ``<name>/timeouts``, ``failures``,
        ``timeouts`` (counts of calls, not samples)."""
        n = len(prompts)
        if not len(responses) == len(answers) == len(finished) == n:
            raise ValueError(f"reward inputs differ in length: {n} prompts, {len(responses)} responses, "
                             f"{len(answers)} answers, {len(finished)} finished flags")
        args = (list(prompts), list(responses), list(answers), [bool(f) for f in finished])
        chunks = _chunks(n, self.num_workers) if n else []
        tasks = [(f, rows) for f in range(len(self.functions)) for rows in chunks]
        with self._lock:
            outcomes = self._run(tasks, args)
        return self._combine(n, tasks, outcomes)

    def _combine(self, n: int, tasks: list, outcomes: list) -> tuple[list[float], dict[str, float]]:
        per_fn = [[self.failure_value] * n for _ in self.functions]
        stats: dict[str, float] = {"failures": 0, "timeouts": 0}
        for name in self.names:
            stats[f"{name}/failures"] = stats[f"{name}/timeouts"] = 0
        failed_samples = [0] * len(self.functions)
        first_problem: dict[int, tuple[str, str]] = {}
        for (f, rows), (kind, payload) in zip(tasks, outcomes, strict=True):
            name, spec = self.names[f], self.functions[f]
            if kind == "ok":
                if len(payload) != len(rows):
                    raise RewardFunctionError(f"reward function {spec!r} returned {len(payload)} values "
                                              f"for a batch of {len(rows)}")
                bad = [i for i, v in enumerate(payload) if not math.isfinite(v)]
                if bad:
                    raise RewardFunctionError(f"reward function {spec!r} returned non-finite value "
                                              f"{payload[bad[0]]} for sample {rows[bad[0]]}")
                for i, v in zip(rows, payload, strict=True):
                    per_fn[f][i] = v
            elif kind == "bad_return":
                raise RewardFunctionError(f"reward function {spec!r}: {payload}")
            else:  # raised, crashed or timeout: the call's samples keep failure_value
                counter = "timeouts" if kind == "timeout" else "failures"
                stats[counter] += 1
                stats[f"{name}/{counter}"] += 1
                failed_samples[f] += len(rows)
                first_problem.setdefault(f, (kind, payload))
        for f, (kind, payload) in first_problem.items():
            self._check_failure_fraction(f, failed_samples[f], n, kind, payload)
            logger.warning("reward function %r: %d call(s) failed and %d timed out this batch, scored %s; "
                           "first problem (%s):\n%s", self.functions[f], stats[f"{self.names[f]}/failures"],
                           stats[f"{self.names[f]}/timeouts"], self.failure_value, kind, payload)
        for f, name in enumerate(self.names):
            if n:
                stats[f"{name}/mean"] = sum(per_fn[f]) / n
        scores = [sum(w * per_fn[f][i] for f, w in enumerate(self.weights)) for i in range(n)]
        return scores, stats

    def _check_failure_fraction(self, f: int, failed: int, n: int, kind: str, payload: str) -> None:
        fraction = failed / n
        if fraction > self.max_failure_fraction:
            raise RewardFunctionError(
                f"reward function {self.functions[f]!r}: {failed} of {n} samples ({fraction:.0%}) failed or "
                f"timed out in one step, more than max_failure_fraction={self.max_failure_fraction} "
                f"(reward.max_failure_fraction); first problem ({kind}):\n{payload}")

    def _run(self, tasks: list, args: tuple) -> list:
        """Run every task; returns one (kind, payload) outcome per task. Kills everything on error."""
        outcomes: list = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        if not tasks:
            return outcomes
        try:
            while len(self._workers) < self.num_workers:
                self._workers.append(self._new_worker())
            for k, w in enumerate(self._workers):
                if w.idle and w.process.poll() is not None:  # died between calls (the OOM killer, a person)
                    self._replace(k)
            while pending or any(w.task is not None for w in self._workers):
                for w in self._workers:
                    if w.idle and pending and w.unloaded:
                        w.load_next(self.import_timeout_s)
                    elif w.idle and pending:
                        t = pending.popleft()
                        f, rows = tasks[t]
                        rows_args = tuple([a[i] for i in rows] for a in args)
                        w.call(t, self.functions[f], rows_args, self.timeout_s)
                waiting = [w for w in self._workers if not w.idle]
                delay = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
                ready = wait_for_connections([w.conn for w in waiting], timeout=delay)
                for k, w in enumerate(self._workers):
                    if w.conn in ready:
                        self._receive(k, outcomes)
                    elif not w.idle and time.monotonic() >= w.deadline:
                        self._expire(k, outcomes)
        except BaseException:
            self.close()
            raise
        return outcomes

    def _receive(self, k: int, outcomes: list) -> None:
        w = self._workers[k]
        try:
            message = w.conn.recv()
        except (EOFError, OSError):  # the process died (os._exit, segfault, a limit, killed by the OS)
            code = w.process.wait(timeout=10)
            if w.loading:
                raise RewardFunctionError(f"reward function {w.unloaded[0]!r}: the worker importing it "
                                          f"exited with code {code}") from None
            if w.task is None:
                raise RuntimeError(f"reward worker exited with code {code} while starting") from None
            outcomes[w.task] = ("crashed", f"worker process exited with code {code}")
            self._replace(k)
            return
        if message[0] == "ready":
            w.started = True
        elif message[0] == "loaded":
            w.loaded()
        elif message[0] == "load_error":
            raise RewardFunctionError(f"reward function {w.unloaded[0]!r}: {message[1]}")
        elif w.task is None:
            raise RuntimeError(f"reward worker sent a {message[0]!r} result with no call in flight")
        else:
            outcomes[w.task], w.task = message, None

    def _expire(self, k: int, outcomes: list) -> None:
        w = self._workers[k]
        if not w.started:
            raise RuntimeError(f"reward worker did not start within {self.start_timeout_s} s")
        if w.loading:
            spec = w.unloaded[0]
            raise RewardFunctionError(f"reward function {spec!r}: importing {spec.rpartition(':')[0]} took "
                                      f"longer than import_timeout_s={self.import_timeout_s} s "
                                      "(reward.import_timeout_s)")
        if w.task is None:
            raise RuntimeError("reward worker expired with no call in flight")
        outcomes[w.task] = ("timeout", f"no result after {self.timeout_s} s; worker and its children killed")
        self._replace(k)

    def _new_worker(self) -> WorkerProcess:
        return WorkerProcess(self.start_timeout_s, [f for f in self.functions if isinstance(f, str)],
                             memory_limit_mb=self.memory_limit_mb, cpu_time_limit_s=self.cpu_time_limit_s)

    def _replace(self, k: int) -> None:
        self._workers[k].kill()
        self._workers[k] = self._new_worker()

    def close(self) -> None:
        """Stop the worker processes and whatever they left running (the next call starts fresh ones)."""
        stop_workers(self._workers)

    def __enter__(self) -> "RewardRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

