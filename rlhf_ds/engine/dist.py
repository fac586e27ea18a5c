"""Device and process-group setup: the one place that knows whether we run on a GPU or on CPU.

On a machine without CUDA we follow the CPU recipe: DeepSpeed's CPU accelerator, the gloo backend,
and no shared-memory comm op (DeepSpeed would compile it, ~70 s, for a speed-up gloo does not need).
The data-parallel group of a role is torch.distributed's default group (one group per process).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import re
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as torch_dist


def has_gpu() -> bool:
    return torch.cuda.is_available()


def _prepare_accelerator_env() -> None:
    # DeepSpeed picks its accelerator lazily on first use; the variable must be set before that.
    if not has_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed 0.19's JIT op builder (FusedAdam) cannot parse arch names with a feature suffix such as
    # "9.0a" (set by some CUDA images) and fails the engine build; the plain arch builds the same kernels.
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list:
        os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d+\.\d+)[a-z]\b", r"\1", arch_list)


_prepare_accelerator_env()


def get_device() -> torch.device:
    """The device this process computes on: its local GPU, or the CPU."""
    if has_gpu():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def backend_name() -> str:
    return "nccl" if has_gpu() else "gloo"


def _skip_shm_comm_build() -> None:
    # Patch the module object DeepSpeed calls through: `import deepspeed.comm.torch as m` can bind the
    # `torch` attribute of deepspeed.comm instead, which is a different module.
    import deepspeed.comm  # noqa: F401  (registers deepspeed.comm.torch in sys.modules)
    import deepspeed.comm.torch  # noqa: F401
    module = sys.modules["deepspeed.comm.torch"]
    # a module's attributes are writable; the stub of ModuleType declares none
    module.build_shm_op = lambda: None  # pyright: ignore[reportAttributeAccessIssue]


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 256 * 2 ** 20
TRIM_THRESHOLD_BYTES = 1024 * 2 ** 20


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 256 MiB for reuse instead of returning them to the
    operating system (CPU processes only: on GPU these buffers live in CUDA's caching allocator).

    ZeRO-3 allocates and frees multi-MB buffers every step (gradient buckets, partitions, the
    optimizer's flat tensors); glibc serves each block over its mmap threshold with a fresh mapping
    and unmaps it on free, so every step faults in and zeroes the same pages again: 11,000-14,000 page
    faults per training step of the 6.3 M-parameter bench model, 0-1,000 with this; that step went from
    0.57-0.70 s to 0.51-0.59 s in alternated runs (1.08-1.20x a plain step in the same process before,
    1.04-1.15x after). The cost: the process keeps up to 1 GiB of freed memory at the top of its heap.
    Returns whether glibc took the settings (False on other C libraries)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                    and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join the process group described by the launcher environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK). Idempotent. A process started without that environment becomes a
    single-rank group."""
    import deepspeed  # deepspeed: in the processes that build engines

    if has_gpu():
        torch.cuda.set_device(get_device())
    else:
        _skip_shm_comm_build()
        # DeepSpeed's CPU accelerator counts its devices from LOCAL_SIZE (the deepspeed launcher sets it),
        # else by running `numactl --hardware` in a subprocess at every call: once per training step.
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
        keep_freed_memory()
    # torch deprecates the collective names DeepSpeed still calls, once per call site and rank.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    deepspeed.init_distributed(dist_backend=backend_name(), timeout=timedelta(seconds=timeout_s),
                               verbose=False)
    atexit.register(_leave_at_exit)   # registered once per call; a second call finds no group


def _leave_at_exit() -> None:
    """Destroy the process group when the interpreter exits: a process that exits with its gloo group alive
    can abort in the group's C++ teardown ("terminate called without an active exception") after a run that
    succeeded. No barrier: a rank that failed must not hold the others."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def dp_rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def dp_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over the data-parallel group; a no-op without one. op: sum | max | min."""
    ops = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"all_reduce_: op={op!r}; valid: {sorted(ops)}")
    if dp_size() > 1:
        torch_dist.all_reduce(tensor, op=ops[op])
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=get_device())
    return bool(all_reduce_(t, "max").item() > 0)


def max_over_ranks(value: int) -> int:
    t = torch.tensor([float(value)], device=get_device())
    return int(all_reduce_(t, "max").item())


class SharedCallError(RuntimeError):
    """A call that ``on_rank0_shared`` ran on rank 0 raised; every rank raises this with its message."""


def on_rank0_shared(fn):
    """``fn()`` run on rank 0 alone, its result broadcast to every rank (picklable); without a process
    group, just ``fn()``.

    For work whose result must be identical on every rank and that may differ when repeated (reward
    functions with time limits, sandboxes). An exception on rank 0 reaches every rank as a
    :class:`SharedCallError` (rank 0 re-raises the original), so no rank waits at a broadcast forever.
    """
    if dp_size() == 1:
        return fn()
    payload: list = [None]
    error = None
    if dp_rank() == 0:
        try:
            payload[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised
            error = err
            payload[0] = ("error", f"{type(err).__name__}: {err}")
    device = get_device() if backend_name() == "nccl" else None
    torch_dist.broadcast_object_list(payload, src=0, device=device)
    status, value = payload[0]
    if status == "ok":
        return value
    if error is not None:
        raise error
    raise SharedCallError(f"rank 0 failed in a call whose result every rank shares: {value}")
