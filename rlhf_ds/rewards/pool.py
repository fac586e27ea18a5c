"""Worker processes of the RewardRunner: one fresh interpreter per worker, one message at a time.

The parent talks to each worker over a socket pair with ``multiprocessing.connection`` messages:
parent -> worker ``("load", spec)`` (import one reward function, once per worker, before the calls),
``("call", function or spec, (prompts, responses, answers, finished))`` or ``None`` (exit);
worker -> parent ``("ready",)`` once, ``("loaded",)`` or ``("load_error", tb)`` per load, then one outcome
per call: ``("ok", floats)``, ``("raised", tb)`` or ``("bad_return", why)``.

What a worker cannot do to the run:

- leave processes behind: each worker leads its own session and process group, and the parent kills
  the whole group (``killpg``) when a call times out, after a worker crashed, and on ``close``, so the
  children a reward function spawned die with it. A worker whose parent died kills its own group.
- exhaust the machine: ``RLIMIT_AS`` caps its address space (an allocation past it is a ``MemoryError``
  in the call, or a dead worker), ``RLIMIT_CPU`` the CPU time of each message (SIGXCPU kills the
  worker). Children inherit both; no core files. The CPU budget is renewed before each message: a fixed
  total would kill a warm worker that serves a long run.
- read the trainer's secrets from its environment: a worker gets PATH, HOME, LANG, LC_ALL, TMPDIR,
  PYTHONPATH and OMP_NUM_THREADS=1 only, not the trainer's tokens and cloud keys.

This confines accidents, not an attacker: a worker runs as the trainer's user, can read its files and
use the network, and a child that starts a session of its own escapes the group kill.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from rlhf_ds.rewards.functions import load_reward_function
from rlhf_ds.rewards.processes import kill_process_group, minimal_env


def _lower_limit(kind: int, soft: int, hard: int) -> None:
    """setrlimit that never asks for more than the current hard limit (only root may raise it)."""
    ceiling = resource.getrlimit(kind)[1]
    if ceiling != resource.RLIM_INFINITY:
        soft, hard = min(soft, ceiling), (ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling))
    resource.setrlimit(kind, (soft, hard))


def _renew_cpu_budget(cpu_time_limit_s: int) -> None:
    """Allow ``cpu_time_limit_s`` more CPU seconds from now (RLIMIT_CPU counts the process's lifetime)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + cpu_time_limit_s
    _lower_limit(resource.RLIMIT_CPU, soft, resource.getrlimit(resource.RLIMIT_CPU)[1])


def _load(spec: str, functions: dict) -> tuple:
    try:
        functions[spec] = load_reward_function(spec)
        return ("loaded",)
    except BaseException as err:
        traceback.clear_frames(err.__traceback__)  # after a MemoryError the frames' locals hold the memory
        return ("load_error", traceback.format_exc(limit=-3))


def _call_reward(fn, args: tuple) -> tuple:
    """Run one call inside a worker; the outcome tuple tells the parent what happened."""
    try:
        raw = fn(*args)
    except BaseException as err:  # SystemExit from user code is a failure too, not a dead worker
        traceback.clear_frames(err.__traceback__)
        return ("raised", traceback.format_exc(limit=-3))
    try:
        if isinstance(raw, (str, bytes)):
            raise TypeError("a string is not a list of scores")
        values = list(raw)
        if any(isinstance(v, (str, bytes)) for v in values):
            raise TypeError("strings are not scores")
        return ("ok", [float(v) for v in values])
    except Exception as err:
        return ("bad_return", f"returned {type(raw).__name__} that is not a sequence of numbers ({err})")


def _worker_main(conn, cpu_time_limit_s: int) -> None:
    """Worker process loop: announce readiness, then answer one message at a time until told to stop."""
    conn.send(("ready",))
    functions: dict = {}  # spec -> loaded function
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        if cpu_time_limit_s:
            _renew_cpu_budget(cpu_time_limit_s)
        if message[0] == "load":
            conn.send(_load(message[1], functions))
        else:
            _, fn_or_spec, args = message
            fn = functions[fn_or_spec] if isinstance(fn_or_spec, str) else fn_or_spec
            conn.send(_call_reward(fn, args))


def _exit_when_orphaned(parent_pid: int) -> None:
    """Watchdog thread of a worker: a call stuck in user code must not outlive the parent, nor its spawn."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os.killpg(0, signal.SIGKILL)  # the worker leads its group: this kills it and what it spawned


def worker_entry(fd: int, memory_limit_mb: int, cpu_time_limit_s: int) -> None:
    """Entry point of a worker process: its socket to the parent and its limits (0 = none)."""
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    _lower_limit(resource.RLIMIT_CORE, 0, 0)  # a worker killed by SIGXCPU or SIGSEGV writes no core file
    if memory_limit_mb:
        _lower_limit(resource.RLIMIT_AS, memory_limit_mb * 2**20, memory_limit_mb * 2**20)
    _worker_main(Connection(fd), cpu_time_limit_s)


# A fresh interpreter that imports only rlhf_ds.data. multiprocessing's spawn would also re-run the
# parent's __main__ (a training script importing torch, deepspeed, ray...) in every worker, and fail
# outright for a script without an ``if __name__ == "__main__"`` guard.
_BOOTSTRAP = ("import sys; from rlhf_ds.rewards.pool import worker_entry; "
              "worker_entry(*map(int, sys.argv[1:4]))")


class WorkerProcess:
    """One worker process, the parent's end of the socket to it, and what it is busy with.

    specs: the reward function specs it imports, one ``load`` message each, before its first call.
    """

    def __init__(self, start_timeout_s: float, specs: list[str], *, memory_limit_mb: int,
                 cpu_time_limit_s: int):
        parent_sock, child_sock = socket.socketpair()
        env = minimal_env(PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        argv = [sys.executable, "-c", _BOOTSTRAP, str(child_sock.fileno()), str(memory_limit_mb),
                str(cpu_time_limit_s)]
        with child_sock:
            self.process = subprocess.Popen(argv, pass_fds=(child_sock.fileno(),), env=env,
                                            start_new_session=True)
        self.conn = Connection(parent_sock.detach())
        self.started = False
        self.unloaded = list(specs)  # the first one is in flight while ``loading``
        self.loading = False
        self.task: int | None = None  # index of the call in flight
        self.deadline = time.monotonic() + start_timeout_s  # start-up deadline until started

    @property
    def idle(self) -> bool:
        return self.started and not self.loading and self.task is None

    def load_next(self, timeout_s: float) -> None:
        self.conn.send(("load", self.unloaded[0]))
        self.loading, self.deadline = True, time.monotonic() + timeout_s

    def loaded(self) -> None:
        self.unloaded.pop(0)
        self.loading = False

    def call(self, task: int, fn_or_spec, args: tuple, timeout_s: float) -> None:
        self.conn.send(("call", fn_or_spec, args))
        self.task, self.deadline = task, time.monotonic() + timeout_s

    def kill(self) -> None:
        kill_process_group(self.process)
        self.conn.close()


def stop_workers(workers: list[WorkerProcess]) -> None:
    """Ask idle workers to exit, kill the rest and whatever any of them left running; empties ``workers``."""
    stopping = list(workers)
    workers.clear()
    for w in stopping:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in stopping:
        try:
            w.process.wait(timeout=0.5 if w.idle else 0.001)
        except subprocess.TimeoutExpired:
            pass
        w.kill()
