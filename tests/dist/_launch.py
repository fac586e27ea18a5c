"""Run a function on N fresh processes forming a gloo group (the CPU recipe), and collect results.

One spawned job runs many cases and returns their results, so the ~10 s of process start-up (imports,
process group, engine build) is paid once per job rather than once per case.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    try:
        import torch
        torch.set_num_threads(1)
        from rlhf_ds.engine import dist
        dist.init_distributed(timeout_s=120)
        # Plain pickle (tensors by value): torch's queue would share storages that die with this process.
        queue.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:  # report any failure to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as torch_dist
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout_s: float = 180.0) -> list[Any]:
    """fn(*args) on ranks 0..world_size-1 (fn must be importable: a module-level function).
    Returns the per-rank results in rank order; raises with the rank's traceback on failure."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout_s)
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()
    return [results[r] for r in range(world_size)]
