"""Ray role groups: one Ray actor per rank, the ranks of a role forming their own torch.distributed world
(the group interface of ``cluster.group``), and Ray start-up and placement.

The workers are plain classes (``rlhf_ds.workers``, ``rlhf_ds.rollout``); Ray is applied here, once, by
hosting each worker object inside a generic :class:`RankHost` actor. Rank 0 publishes its node address
and a free port; every rank gets ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE`` in its
environment before the worker is built, so the worker's own ``init_distributed`` forms the role's group.

Results are collected with ``ray.wait`` rather than ``ray.get`` in rank order: when one rank fails, the
others are usually blocked in a collective with it, and waiting on them first would hang the driver.
The first failure is raised at once as :class:`WorkerFailure` naming the role, the rank and the error;
ranks that do not answer within ``cluster.call_timeout_s`` (a stopped process, a hung collective) raise
:class:`WorkerTimeout` naming them.
"""
from __future__ import annotations

import os
import re
import socket
import time
from typing import Any, Callable, Sequence

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ds.cluster.dispatch import concat_results, split_by_rank
from rlhf_ds.cluster.group import Group
from rlhf_ds.cluster.placement import PlacementPlan
from rlhf_ds.cluster.reaper import start_reaper
from rlhf_ds.rollout.vllm_settings import RENDEZVOUS_BACKENDS
from rlhf_ds.rollout.weights import load_in_process


def _hosted(host: str) -> str:
    return f" (in the processes of role {host!r})" if host else ""


class WorkerFailure(RuntimeError):
    """A rank of a role group raised or died; carries the role, the rank and the worker's own error.
    ``host``: the role whose processes the worker lives in, when not its own (``RoleGroup.attach``)."""

    def __init__(self, role: str, rank: int, cause: BaseException, host: str = ""):
        self.role, self.rank, self.cause = role, rank, cause
        super().__init__(f"role {role!r} rank {rank}{_hosted(host)} failed: {_describe(cause)}")


class WorkerTimeout(RuntimeError):
    """Ranks of a role group that did not answer within ``cluster.call_timeout_s``."""

    def __init__(self, role: str, ranks: list[int], timeout_s: float, host: str = ""):
        self.role, self.ranks = role, ranks
        super().__init__(f"role {role!r} rank(s) {ranks}{_hosted(host)} did not answer within "
                         f"cluster.call_timeout_s={timeout_s:g} s (stopped, hung in a collective, or too slow: "
                         f"raise the deadline)")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _describe(err: BaseException) -> str:
    if isinstance(err, RayTaskError):
        # str() of a RayTaskError holds the remote traceback, which ends with the worker's own error.
        return _ANSI.sub("", str(err)).strip()
    if isinstance(err, RayActorError):
        return f"the worker process died ({err})"
    return f"{type(err).__name__}: {err}"


class RankHost:
    """Hosts the plain worker object of one rank inside a Ray actor process, and the workers of other
    roles living in the same process (``RoleGroup.attach``: the HF engines inside the actor's processes,
    ``rollout.hf_in_actor``), each reached by its role's name."""

    def __init__(self, role: str, rank: int, world_size: int, env: dict[str, str]):
        os.environ.update(env)
        # torch read OMP_NUM_THREADS when this process imported it, before this environment: set it again
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        self.role, self.rank, self.world_size = role, rank, world_size
        self.workers: dict[str, Any] = {}

    def address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port, for the rendezvous of the role's process group."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_worker(self, worker_cls: type, master_addr: str, master_port: int,
                    args: tuple, kwargs: dict) -> None:
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        # Ray gives each actor only its own GPU (CUDA_VISIBLE_DEVICES), so the local device is always 0.
        self.workers[self.role] = worker_cls(*args, **kwargs)

    def attach_worker(self, role: str, worker_cls: type, args: tuple, kwargs: dict) -> None:
        """Build ``role``'s worker in this process, next to the rank's own (after ``init_worker``)."""
        self.workers[role] = worker_cls(*args, **kwargs)

    def call(self, role: str, method: str, args: tuple, kwargs: dict) -> Any:
        # Large arguments (weight buckets) travel as object refs: fetched here, from shared memory.
        args = tuple(ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args)
        return getattr(self.workers[role], method)(*args, **kwargs)

    def apply(self, role: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """Run ``fn(worker, rank, *args, **kwargs)`` here with ``role``'s worker (for work that must stay in
        the rank's process)."""
        return fn(self.workers[role], self.rank, *args, **kwargs)

    def load_attached_engine(self, role: str, bucket_bytes: int, version: str) -> int:
        """Weight sync into the engine ``role`` hosted here: gathered and loaded in memory, no transfer."""
        return load_in_process(self.workers[self.role], self.workers[role], bucket_bytes, version)


RemoteRankHost = ray.remote(RankHost)

# How long a rank asked to exit may take before it is killed.
_EXIT_GRACE_S = 5.0

# At most this many weight buckets are in flight from actor rank 0 to the engines: bounded memory on
# both sides, while the gather of the next bucket overlaps the load of the previous one.
_BUCKETS_IN_FLIGHT = 2


def _push_through_object_store(actor_worker: Any, rank: int, engine_handles: list, engine_role: str,
                               bucket_bytes: int) -> int:
    """Runs in each actor rank's process (``RoleGroup.apply_all``): every rank takes part in the gathers;
    rank 0 puts each bucket in Ray's shared-memory object store once, and every engine reads it from there
    (zero-copy on the same node) and loads it. Returns the tensors sent (0 off rank 0)."""
    in_flight: list = []
    count = 0
    for bucket in actor_worker.weight_buckets(bucket_bytes):
        count += len(bucket)
        if rank != 0:
            continue
        ref = ray.put(bucket)
        if len(in_flight) >= _BUCKETS_IN_FLIGHT:
            ray.get(in_flight.pop(0))
        in_flight.append([h.call.remote(engine_role, "update_weights", (ref,), {}) for h in engine_handles])
    for futures in in_flight:
        ray.get(futures)
    return count if rank == 0 else 0


class _EngineClient:
    """vLLM's weight-sync client protocol over the rollout group's engines (the control plane of the
    NCCL / IPC transfers in ``rollout.vllm_transfer``): each call fans out to every engine and waits."""

    def __init__(self, handles: list, role: str, tensor_parallel_size: int):
        self.handles, self.role, self.tensor_parallel_size = handles, role, tensor_parallel_size

    def _all(self, method: str, per_engine_args: list[tuple]) -> None:
        ray.get([h.call.remote(self.role, method, args, {}) for h, args in zip(self.handles, per_engine_args, strict=True)])

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        from rlhf_ds.rollout.vllm_transfer import engine_init_info  # vllm: only with rollout.backend=vllm

        self._all("transfer_init", [(engine_init_info(init_info, i, self.tensor_parallel_size),)
                                    for i in range(len(self.handles))])

    def start_weight_update(self) -> None:
        self._all("transfer_start", [()] * len(self.handles))

    def update_weights(self, update_info: dict) -> None:
        self._all("transfer_update", [(update_info,)] * len(self.handles))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("transfer_finish", [()] * len(self.handles))

    def shutdown_weight_transfer_engine(self) -> None:
        pass


# Per actor process: vLLM's trainer-side transfer engine, opened at the first sync (the NCCL rendezvous
# happens once) and kept for the run.
_OPEN_TRANSFERS: dict[str, Any] = {}


def _push_through_vllm_transfer(actor_worker: Any, rank: int, engine_handles: list, engine_role: str,
                                backend: str, tensor_parallel_size: int, bucket_bytes: int) -> int:
    """Runs in each actor rank's process: vLLM's NCCL / IPC trainer engine sends the gathered buckets
    straight to the engines' GPUs (rank 0 sends; every rank takes part in the gathers)."""
    from rlhf_ds.rollout.vllm_transfer import nccl_world_size, open_transfer  # vllm: only with rollout.backend=vllm

    key = backend + ":" + ",".join(h._actor_id.hex() for h in engine_handles)
    if key not in _OPEN_TRANSFERS:
        rendezvous = {}
        if backend in RENDEZVOUS_BACKENDS and rank == 0:
            with socket.socket() as sock:
                sock.bind(("", 0))
                port = sock.getsockname()[1]
            rendezvous = {"master_address": ray.util.get_node_ip_address(), "master_port": port,
                          "world_size": nccl_world_size(len(engine_handles), tensor_parallel_size)}
        client = _EngineClient(engine_handles, engine_role, tensor_parallel_size)
        _OPEN_TRANSFERS[key] = open_transfer(backend, client, actor_worker, rank, bucket_bytes, **rendezvous)
    _OPEN_TRANSFERS[key].send_weights()
    return len(actor_worker.weight_manifest()) if rank == 0 else 0


class Pending:
    """Futures of one fan-out call; ``get()`` returns the per-rank results (or their concatenation)."""

    def __init__(self, group: "RoleGroup", futures: list, concat: bool):
        self.group, self.futures, self.concat = group, futures, concat

    def get(self) -> Any:
        results = self.group._wait(self.futures)
        return concat_results(results) if self.concat else results


class RoleGroup:
    """The ranks of one role as Ray actors, with two fan-out verbs.

    - ``run_all(method, *args)``: the same arguments to every rank; returns the list of rank results.
    - ``dispatch(method, batch, *args)``: rows split into equal contiguous shards by rank; the rank
      results are concatenated back in order.
    Both have ``*_async`` forms returning a :class:`Pending`, so the driver can overlap roles.
    ``attach`` puts another role's workers into this group's processes and returns that role's group.
    """

    def __init__(self, role: str, worker_cls: type, plan: PlacementPlan, pools: dict[str, PlacementGroup],
                 *, use_gpu: bool, cpus_per_worker: float, worker_args: Sequence = (),
                 worker_kwargs: dict | None = None, env: dict[str, str] | None = None,
                 call_timeout_s: float = 1800.0):
        placement = plan.roles[role]
        resources = plan.rank_resources(role, use_gpu, cpus_per_worker)
        num_ranks = len(placement.bundle_indices)
        env = dict(env or {})
        handles = [
            RemoteRankHost.options(
                **resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pools[placement.pool], placement_group_bundle_index=bundle),
            ).remote(role, rank, num_ranks, env)
            for rank, bundle in enumerate(placement.bundle_indices)
        ]
        self._bind(role, handles, call_timeout_s, host=None)
        master_addr, master_port = self._wait([self.handles[0].address.remote()])[0]
        self._wait([h.init_worker.remote(worker_cls, master_addr, master_port, tuple(worker_args),
                                         dict(worker_kwargs or {})) for h in self.handles])

    def attach(self, role: str, worker_cls: type, worker_args: Sequence = ()) -> "RoleGroup":
        """Build one ``role`` worker inside each of this group's rank processes (rank i next to rank i)
        and return ``role``'s group over them; it is shut down with this one."""
        self._wait([h.attach_worker.remote(role, worker_cls, tuple(worker_args), {}) for h in self.handles])
        group = RoleGroup.__new__(RoleGroup)
        group._bind(role, self.handles, self.call_timeout_s, host=self)
        return group

    def _bind(self, role: str, handles: list, call_timeout_s: float, host: "RoleGroup | None") -> None:
        """The state of a group over ``handles`` (its own Ray actors, or ``host``'s when attached)."""
        self.role, self.handles, self.num_ranks, self.call_timeout_s = role, handles, len(handles), call_timeout_s
        self._sync_plan = None   # (the actor's weight manifest, the engines' direct transfer) once known
        self.host = host         # the group whose processes host this one's workers (attach), or None

    # -- fan-out verbs -------------------------------------------------------------------------------
    def run_all_async(self, method: str, *args, **kwargs) -> Pending:
        return Pending(self, [h.call.remote(self.role, method, args, kwargs) for h in self.handles], concat=False)

    def run_all(self, method: str, *args, **kwargs) -> list:
        return self.run_all_async(method, *args, **kwargs).get()

    def dispatch_async(self, method: str, batch: Any, *args, even: bool = True, concat: bool = True,
                       **kwargs) -> Pending:
        """``concat=False`` returns the list of rank results (e.g. metrics already combined by the ranks)."""
        shards = split_by_rank(batch, self.num_ranks, even=even)
        futures = [h.call.remote(self.role, method, (shard,) + args, kwargs)
                   for h, shard in zip(self.handles, shards, strict=True)]
        return Pending(self, futures, concat=concat)

    def dispatch(self, method: str, batch: Any, *args, even: bool = True, concat: bool = True, **kwargs) -> Any:
        return self.dispatch_async(method, batch, *args, even=even, concat=concat, **kwargs).get()

    def apply_all(self, fn: Callable, *args, **kwargs) -> list:
        """``fn(worker, rank, *args, **kwargs)`` on every rank, in the rank's own process."""
        return self._wait([h.apply.remote(self.role, fn, args, kwargs) for h in self.handles])

    def sync_weights(self, rollout: Group, bucket_mb: float, version: str) -> int:
        """The update protocol of ``rollout.weights``: the engines check the actor's manifest, every actor
        rank gathers each bucket and rank 0 sends it (Ray's object store, or vLLM's NCCL / IPC / gloo
        transfer), then the engines put the new weights live at once. Engines hosted in this group's
        processes (``attach``) are loaded there, in memory, in one call per rank."""
        if not isinstance(rollout, RoleGroup):
            raise TypeError(f"a Ray actor group syncs into Ray engine groups, got {type(rollout).__name__}")
        bucket_bytes = int(bucket_mb * 2 ** 20)
        if rollout.host is self:
            return self._wait([h.load_attached_engine.remote(rollout.role, bucket_bytes, version)
                               for h in self.handles])[0]
        if self._sync_plan is None:   # fixed for the run: asked once (two round trips fewer per sync)
            self._sync_plan = (self.run_all("weight_manifest")[0], rollout.run_all("direct_transfer")[0])
        manifest, direct = self._sync_plan
        rollout.run_all("start_weight_update", manifest, version)
        if direct is None:
            counts = self.apply_all(_push_through_object_store, rollout.handles, rollout.role, bucket_bytes)
        else:
            backend, tensor_parallel_size = direct
            counts = self.apply_all(_push_through_vllm_transfer, rollout.handles, rollout.role, backend,
                                    tensor_parallel_size, bucket_bytes)
        rollout.run_all("finish_weight_update")
        return counts[0]

    # -- failure handling ----------------------------------------------------------------------------
    def _wait(self, futures: list) -> list:
        rank_of = {ref: rank for rank, ref in enumerate(futures)}
        results: list = [None] * len(futures)
        pending = list(futures)
        deadline = time.monotonic() + self.call_timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            host = self.host.role if self.host is not None else ""
            if not ready:
                raise WorkerTimeout(self.role, sorted(rank_of[ref] for ref in pending), self.call_timeout_s, host)
            for ref in ready:
                try:
                    results[rank_of[ref]] = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - re-raised with the role and rank
                    raise WorkerFailure(self.role, rank_of[ref], err, host) from None
        return results

    def shutdown(self) -> None:
        """End the ranks' processes: each is asked to exit once its current call returns (its exit
        handlers run: process-group teardown, flushed output); ranks still there after
        ``_EXIT_GRACE_S`` (hung in a collective, say) are killed."""
        if self.host is not None:   # the hosting group's processes: ended with it
            return
        exits = [handle.__ray_terminate__.remote() for handle in self.handles]
        ray.wait(exits, num_returns=len(exits), timeout=_EXIT_GRACE_S)
        for handle in self.handles:
            ray.kill(handle, no_restart=True)


def create_pools(plan: PlacementPlan, *, use_gpu: bool, cpus_per_worker: float, strategy: str = "PACK",
                 timeout_s: float = 120.0) -> dict[str, PlacementGroup]:
    """Create (and wait for) one placement group per pool; a pool that cannot fit fails with its needs.
    strategy: Ray's placement strategy (cluster.placement_strategy)."""
    bundles = {name: plan.bundle(use_gpu, cpus_per_worker, name) for name in plan.pool_sizes}
    pools = {name: placement_group([dict(bundles[name]) for _ in range(size)], strategy=strategy)
             for name, size in plan.pool_sizes.items()}
    for name, pg in pools.items():
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            raise RuntimeError(
                f"placement group {name!r} ({plan.pool_sizes[name]} x {bundles[name]}) could not be placed within "
                f"{timeout_s:.0f} s; the cluster offers {ray.cluster_resources()}. Lower the roles' "
                f"num_ranks / rollout.num_engines, set cluster.colocate=true, or lower cluster.cpus_per_worker")
    return pools


def remove_pools(pools: dict[str, PlacementGroup]) -> None:
    for pg in pools.values():
        remove_placement_group(pg)


def start_ray(address: str, num_cpus_needed: float) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start a local Ray; returns True when started here.

    A local Ray is given at least as many logical CPUs as the placement needs: a Ray CPU is a scheduling
    token, not a thread; each worker runs one OpenMP thread whatever its fractional share.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    num_cpus = max(os.cpu_count() or 1, int(-(-num_cpus_needed // 1)))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": worker_env()})
    start_reaper()   # a driver killed with SIGKILL leaves none of this Ray's processes behind
    return True


def worker_env() -> dict[str, str]:
    """Environment every worker process starts with (one thread each: 2 cores are shared by all)."""
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning"}
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):   # OpenMP's idle-thread policy, when the user sets one
        if name in os.environ:
            env[name] = os.environ[name]
    if "DS_ACCELERATOR" in os.environ:
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    return env
