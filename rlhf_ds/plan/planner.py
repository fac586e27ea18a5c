"""A run's config -> every process it starts -> the devices they share -> totals against capacity.

Placement follows the launcher:
- Ray: each rank of each role on its own GPU, except the colocated roles (``cluster.colocate``: actor,
  reference and rollout engines share GPUs, as ``cluster.placement`` plans them);
- deepspeed launcher: every rank holds one rank of every role and its own rollout engine;
- engines inside the actor's processes (``Config.engines_in_actor``: the hf backend's default under Ray):
  engine ``i`` in actor rank ``i``'s process, on its device, with no process or CUDA context of its own;
- CPU (no GPU in the target): every process in the memory of one host.
A device is judged full at ``USABLE_FRACTION`` of its capacity (allocator caches and fragmentation
take the rest); every process also pays a fixed runtime cost (CUDA context, Python and libraries).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from rlhf_ds.choices import STAGES, TRAINABLE_ROLES, Stage
from rlhf_ds.cluster.placement import gpus_per_rank, plan_placement
from rlhf_ds.cluster.roles import role_ranks
from rlhf_ds.config import Config
from rlhf_ds.engine.ds_config import resolve_precision, role_ds_config
from rlhf_ds.plan import memory
from rlhf_ds.plan.memory import GiB, Usage
from rlhf_ds.plan.shapes import model_shape

USABLE_FRACTION = 0.9
CUDA_CONTEXT_BYTES = GiB * 3 // 4          # per process on its GPU
PROCESS_HOST_BYTES = 450 * 2 ** 20         # per worker process in host memory (measured: ~450 MiB on CPU)


@dataclass(frozen=True)
class Target:
    """What the run is planned for. ``gpu_memory`` 0: a CPU run, every process in host memory."""
    gpu_memory: int
    host_memory: int                         # per node
    gpus_per_node: int = 8

    @property
    def on_gpu(self) -> bool:
        return self.gpu_memory > 0

    def describe(self) -> str:
        if self.on_gpu:
            return (f"GPUs of {memory.describe(self.gpu_memory)}, {self.gpus_per_node} per node, "
                    f"{memory.describe(self.host_memory)} of host memory per node")
        return f"CPU: one host with {memory.describe(self.host_memory)} of memory"


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def local_target() -> Target:
    """This machine: its first GPU's memory (and host memory), or its host memory alone."""
    from rlhf_ds.engine.dist import has_gpu  # torch: loaded when first needed

    if has_gpu():
        import torch  # torch: loaded when first needed

        return Target(torch.cuda.get_device_properties(0).total_memory, host_memory_bytes(),
                      max(1, torch.cuda.device_count()))
    return Target(0, host_memory_bytes())


@dataclass(frozen=True)
class Process:
    label: str            # "actor rank 0", "rollout engine 1"
    role: str
    usage: Usage


@dataclass
class DevicePlan:
    name: str             # "gpu 3", "host 0", "host"
    capacity: int
    parts: list[tuple[str, str, dict[str, int]]] = field(default_factory=list)   # (label, role, bytes by what)

    @property
    def total(self) -> int:
        return sum(sum(what.values()) for _, _, what in self.parts)

    @property
    def usable(self) -> int:
        return int(self.capacity * USABLE_FRACTION)

    @property
    def shortfall(self) -> int:
        return max(0, self.total - self.usable)

    @property
    def fits(self) -> bool:
        return self.shortfall == 0

    def roles(self) -> list[str]:
        return sorted({role for _, role, _ in self.parts})


@dataclass
class Plan:
    target: Target
    devices: list[DevicePlan]

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    @property
    def worst_shortfall(self) -> int:
        return max((d.shortfall for d in self.devices), default=0)

    def failing(self) -> list[DevicePlan]:
        return [d for d in self.devices if not d.fits]


# ----------------------------------------------------------------------------- processes of a run

def _role_processes(cfg: Config, role: str, ranks: int, on_gpu: bool, trainable: bool) -> list[Process]:
    from rlhf_ds.engine.build import CAUSAL_ROLES  # torch: loaded when first needed

    role_cfg = getattr(cfg, role)
    ds = role_ds_config(cfg, role, ranks, on_gpu)
    dtype = memory.dtype_bytes_of(resolve_precision(cfg.precision, on_gpu))
    causal = role in CAUSAL_ROLES
    shape = model_shape(role_cfg.model_path, value_head=not causal, leaf_modules=role_cfg.zero3_leaf_modules,
                        field=f"{role}.zero3_leaf_modules")
    micro_batch = int(ds["train_micro_batch_size_per_gpu"])
    if trainable and role == "reward":   # reward-model training: one forward scores chosen and rejected
        micro_batch *= 2
    usage = memory.engine_rank_usage(
        shape, dp=ranks, dtype_bytes=dtype, zero=memory.ZeroSettings.from_ds_config(ds), trainable=trainable,
        micro_batch=micro_batch, seq_len=cfg.rollout.max_prompt_len + cfg.rollout.max_response_len,
        response_len=cfg.rollout.max_response_len, causal_lm=causal,
        checkpointing=trainable and getattr(role_cfg, "gradient_checkpointing", False))
    return [Process(f"{role} rank {r}", role, usage) for r in range(ranks)]


def _rollout_processes(cfg: Config, engines: int, target: Target) -> list[Process]:
    # transformers: loaded when first needed
    from rlhf_ds.rollout.hf_engine import MAX_BATCH_SEQUENCES

    rollout = cfg.rollout
    dtype = memory.dtype_bytes_of(resolve_precision(cfg.precision, target.on_gpu))
    shape = model_shape(cfg.actor.model_path)
    if rollout.backend == "vllm":
        vllm = rollout.vllm
        device_memory = target.gpu_memory or target.host_memory
        usage = memory.vllm_rollout_usage(shape, dtype_bytes=dtype, tensor_parallel=vllm.tensor_parallel_size,
                                          kv_cache=vllm.kv_cache_memory_bytes or None, device_memory=device_memory,
                                          gpu_memory_utilization=vllm.gpu_memory_utilization)
    else:
        prompts = math.ceil(cfg.data.prompts_per_step / engines)
        train_chunk = min(prompts, max(1, MAX_BATCH_SEQUENCES // rollout.n)) * rollout.n
        eval_chunk = min(math.ceil(cfg.data.num_eval / engines), MAX_BATCH_SEQUENCES)
        usage = memory.hf_rollout_usage(shape, dtype_bytes=dtype, sequences=max(train_chunk, eval_chunk),
                                        prompt_len=rollout.max_prompt_len, response_len=rollout.max_response_len)
    where = " (in actor rank {})" if _inside_actor(cfg, "rollout") else ""
    return [Process(f"rollout engine {e}" + where.format(e), "rollout", usage) for e in range(engines)]


def stage_ranks(cfg: Config, stage: Stage) -> tuple[dict[str, int], frozenset[str]]:
    """(ranks per role, the roles that train) of what ``stage`` starts: `rlhf-ds train` (RL), `rlhf-ds sft`
    (the actor and the engines that evaluate it), `rlhf-ds rm` (the reward model alone); the rollout
    engines are the role ``rollout``."""
    if stage == "rl":
        ranks, trainable = role_ranks(cfg), frozenset(TRAINABLE_ROLES)
    elif stage == "sft":
        ranks, trainable = {"actor": cfg.actor.num_ranks, "rollout": cfg.rollout.num_engines}, frozenset({"actor"})
    elif stage == "rm":
        ranks, trainable = {"reward": cfg.reward.num_ranks, "rollout": 0}, frozenset({"reward"})
    else:
        raise ValueError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    if cfg.engines_in_actor and ranks["rollout"]:
        ranks["rollout"] = cfg.actor.num_ranks     # one engine per launcher rank, or inside each actor rank
    return ranks, trainable


def run_processes(cfg: Config, target: Target, stage: Stage = "rl") -> dict[str, list[Process]]:
    """Every process ``stage`` starts, by role (rank order); the rollout engines are the role ``rollout``."""
    ranks, trainable = stage_ranks(cfg, stage)
    out = {role: _role_processes(cfg, role, n, target.on_gpu, role in trainable) for role, n in ranks.items()
           if n and role != "rollout"}
    if ranks["rollout"]:
        out["rollout"] = _rollout_processes(cfg, ranks["rollout"], target)
    return out


def role_lines(cfg: Config, target: Target, stage: Stage = "rl") -> list[str]:
    """What each role of ``stage`` runs with: ranks, ds_config, precision, micro-batch, sequence lengths."""
    precision = resolve_precision(cfg.precision, target.on_gpu)
    seq = f"{cfg.rollout.max_prompt_len} prompt + {cfg.rollout.max_response_len} response tokens"
    ranks, trainable = stage_ranks(cfg, stage)
    lines = []
    for role, n in ranks.items():
        if not n or role == "rollout":
            continue
        ds = role_ds_config(cfg, role, n, target.on_gpu)
        zero = memory.ZeroSettings.from_ds_config(ds)
        offload = [name for name, on in (("optimizer", zero.offload_optimizer), ("parameters", zero.offload_param))
                   if on]
        lines.append(f"{role}: {n} rank(s){', trained' if role in trainable else ''}, {getattr(cfg, role).ds_config} "
                     f"(offload: {', '.join(offload) or 'none'}), {precision}, micro-batch "
                     f"{ds['train_micro_batch_size_per_gpu']}, {seq}, model {getattr(cfg, role).model_path}")
    engines = f"rollout: {ranks['rollout']} {cfg.rollout.backend} engine(s)" + (
        " inside the actor's processes" if cfg.engines_in_actor else "")
    if ranks["rollout"] and stage == "rl":
        lines.append(f"{engines}, {cfg.rollout.n} samples x {cfg.data.prompts_per_step} prompts per step, {seq}")
    elif ranks["rollout"]:
        lines.append(f"{engines} for held-out evaluation, {seq}")
    return lines


# ----------------------------------------------------------------------------- devices

def _gpu_of_each_process(cfg: Config, processes: dict[str, list[Process]]) -> dict[str, list[int]]:
    """GPU index of every rank of every role."""
    if cfg.cluster.launcher == "deepspeed":
        return {role: list(range(len(procs))) for role, procs in processes.items()}

    placed = {role: len(procs) for role, procs in processes.items() if not _inside_actor(cfg, role)}
    placement = plan_placement(placed, cfg.cluster.colocate, gpus_per_rank(cfg))
    first_gpu, next_gpu = {}, 0
    for pool, size in placement.pool_sizes.items():
        first_gpu[pool], next_gpu = next_gpu, next_gpu + size * placement.pool_gpus.get(pool, 1)
    # a rank's first GPU (a tensor-parallel engine holds the next ones of its bundle too)
    gpus = {role: [first_gpu[p.pool] + b * placement.pool_gpus.get(p.pool, 1) for b in p.bundle_indices]
            for role, p in placement.roles.items()}
    if "rollout" in processes and "rollout" not in gpus:
        gpus["rollout"] = gpus["actor"]
    return gpus


def _inside_actor(cfg: Config, role: str) -> bool:
    """Rollout engines living in the actor's processes (under Ray: ``rollout.hf_in_actor``)."""
    return role == "rollout" and cfg.engines_in_actor and cfg.cluster.launcher == "ray"


def plan_run(cfg: Config, target: Target, stage: Stage = "rl") -> Plan:
    """Where every process of ``cfg``'s ``stage`` (:data:`STAGES`) keeps its bytes, and whether each device
    holds them."""
    processes = run_processes(cfg, target, stage)
    if not target.on_gpu:
        host = DevicePlan("host", target.host_memory)
        for procs in processes.values():
            for p in procs:
                merged = {**p.usage.device}
                for what, nbytes in p.usage.host.items():
                    merged[what] = merged.get(what, 0) + nbytes
                if not _inside_actor(cfg, p.role):
                    merged["process runtime"] = PROCESS_HOST_BYTES
                host.parts.append((p.label, p.role, merged))
        return Plan(target, [host])
    gpu_of = _gpu_of_each_process(cfg, processes)
    num_gpus = 1 + max(g for gpus in gpu_of.values() for g in gpus)
    gpus = [DevicePlan(f"gpu {g}", target.gpu_memory) for g in range(num_gpus)]
    nodes = [DevicePlan(f"host {n}", target.host_memory) for n in range(math.ceil(num_gpus / target.gpus_per_node))]
    for role, procs in processes.items():
        own_process = {} if _inside_actor(cfg, role) else {"CUDA context": CUDA_CONTEXT_BYTES}
        for p, g in zip(procs, gpu_of[role], strict=True):
            gpus[g].parts.append((p.label, role, {**p.usage.device, **own_process}))
            runtime = {"process runtime": PROCESS_HOST_BYTES} if own_process else {}
            nodes[g // target.gpus_per_node].parts.append((p.label, role, {**p.usage.host, **runtime}))
    return Plan(target, gpus + nodes)
