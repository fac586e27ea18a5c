"""Memory of one process of a run, by what holds it: pure arithmetic over a :class:`ModelShape`.

Model states under ZeRO-3 (exact; ``tests/dist/test_plan_engines.py`` checks them against built engines):
every parameter is cut into ``ceil(numel / dp)`` elements per rank, so a rank holds

    parameters  sum ceil(n / dp) x bytes of the compute dtype (2 in bf16, 4 in fp32)
    gradients   the same partition, in the compute dtype (trainable roles)
    optimizer   the same partition x 12: an fp32 master copy and Adam's two moments

``offload_optimizer`` moves the optimizer states (and fp32 gradients) to host memory,
``offload_param`` the parameter partitions.

Estimates (labelled as such in the report; they depend on kernels and the allocator):
- gathered parameters: parameters under ``stage3_param_persistence_threshold`` stay whole on every
  rank; the others are gathered module by module (a ``zero3_leaf_modules`` unit, a transformer block by
  default, as one), at most ``largest unit + stage3_prefetch_bucket_size`` elements at a time (never more
  than ``stage3_max_live_parameters``);
- activations of one micro-batch of ``seq_len`` tokens, per transformer layer and token, saved for the
  backward pass: ``7h + 4 kv_heads * head_dim + 4 intermediate`` values (attention inputs, q/k/v,
  attention output, MLP inputs, gate, up, their product); with gradient checkpointing, one ``h`` per
  layer plus one layer recomputed; a forward without gradients keeps one layer's ``3h + 2 intermediate``;
- logits: the whole sequence in the compute dtype plus fp32 copies of the response positions (two when
  training: log-softmax and its gradient);
- the gradient reduce bucket (``reduce_bucket_size``) while gradients are reduce-scattered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from rlhf_ds.plan.shapes import ModelShape

GiB = 2 ** 30
OPTIMIZER_BYTES_PER_PARAM = 12   # fp32 master + exp_avg + exp_avg_sq


@dataclass
class Usage:
    """Bytes one process needs on its device and in host memory, by what holds them."""
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    def add(self, place: str, what: str, nbytes: int) -> None:
        target = self.device if place == "device" else self.host
        target[what] = target.get(what, 0) + int(nbytes)


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO-3 settings of a merged DeepSpeed config that move memory."""
    offload_optimizer: bool = False
    offload_param: bool = False
    persistence_threshold: int = 100_000
    prefetch_bucket: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    reduce_bucket: int = 500_000_000

    @classmethod
    def from_ds_config(cls, ds: dict) -> "ZeroSettings":
        zero = ds.get("zero_optimization", {})

        def offloaded(key: str) -> bool:
            return (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")

        defaults = cls()
        return cls(offload_optimizer=offloaded("offload_optimizer"), offload_param=offloaded("offload_param"),
                   persistence_threshold=int(zero.get("stage3_param_persistence_threshold",
                                                      defaults.persistence_threshold)),
                   prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", defaults.prefetch_bucket)),
                   max_live_parameters=int(zero.get("stage3_max_live_parameters", defaults.max_live_parameters)),
                   reduce_bucket=int(zero.get("reduce_bucket_size", defaults.reduce_bucket)))


def partition_numel(shape: ModelShape, dp: int) -> int:
    """Elements of every parameter one of ``dp`` ranks holds (each parameter padded to a multiple of dp)."""
    return sum(math.ceil(n / dp) for n in shape.param_numels)


def model_state_bytes(shape: ModelShape, dp: int, dtype_bytes: int, trainable: bool) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes of one rank (before offload decides where)."""
    part = partition_numel(shape, dp)
    out = {"parameters": part * dtype_bytes}
    if trainable:
        out["gradients"] = part * dtype_bytes
        out["optimizer states"] = part * OPTIMIZER_BYTES_PER_PARAM
    return out


def gathered_parameter_bytes(shape: ModelShape, dtype_bytes: int, zero: ZeroSettings) -> int:
    """Whole parameters a rank holds at once: the persistent small ones plus the gather window."""
    persistent = sum(n for n in shape.param_numels if n <= zero.persistence_threshold)
    window = min(zero.max_live_parameters, shape.largest_module_numel + zero.prefetch_bucket,
                 shape.num_params - persistent)
    return (persistent + max(window, 0)) * dtype_bytes


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, dtype_bytes: int, *, training: bool,
                     checkpointing: bool = False) -> int:
    """Activations of one micro-batch in one forward (and its backward when ``training``)."""
    tokens = micro_batch * seq_len
    h, i = shape.hidden_size, shape.intermediate_size
    per_layer = 7 * h + 4 * shape.num_kv_heads * shape.head_dim + 4 * i
    if not training:
        return tokens * (3 * h + 2 * i) * dtype_bytes
    if checkpointing:
        return tokens * (shape.num_layers * h + per_layer) * dtype_bytes
    return tokens * shape.num_layers * per_layer * dtype_bytes


def logits_bytes(shape: ModelShape, micro_batch: int, seq_len: int, response_len: int, dtype_bytes: int, *,
                 training: bool) -> int:
    fp32_copies = 2 if training else 1
    return micro_batch * shape.vocab_size * (seq_len * dtype_bytes + response_len * 4 * fp32_copies)


def engine_rank_usage(shape: ModelShape, *, dp: int, dtype_bytes: int, zero: ZeroSettings, trainable: bool,
                      micro_batch: int, seq_len: int, response_len: int, causal_lm: bool,
                      checkpointing: bool = False) -> Usage:
    """One rank of a ZeRO-3 role engine (actor, critic, reference or reward)."""
    usage = Usage()
    states = model_state_bytes(shape, dp, dtype_bytes, trainable)
    usage.add("host" if zero.offload_param else "device", "parameters (partition)", states["parameters"])
    if trainable:
        if zero.offload_optimizer:
            usage.add("host", "gradients (fp32 partition)", partition_numel(shape, dp) * 4)
        else:
            usage.add("device", "gradients (partition)", states["gradients"])
        usage.add("host" if zero.offload_optimizer else "device", "optimizer states (partition)",
                  states["optimizer states"])
        usage.add("device", "gradient reduce bucket", zero.reduce_bucket * dtype_bytes)
    usage.add("device", "gathered parameters", gathered_parameter_bytes(shape, dtype_bytes, zero))
    usage.add("device", "activations (one micro-batch)",
              activation_bytes(shape, micro_batch, seq_len, dtype_bytes, training=trainable,
                               checkpointing=checkpointing))
    if causal_lm:
        usage.add("device", "logits (one micro-batch)",
                  logits_bytes(shape, micro_batch, seq_len, response_len, dtype_bytes, training=trainable))
    return usage


def kv_cache_bytes(shape: ModelShape, sequences: int, seq_len: int, dtype_bytes: int) -> int:
    return sequences * seq_len * shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * dtype_bytes


def hf_rollout_usage(shape: ModelShape, *, dtype_bytes: int, sequences: int, prompt_len: int,
                     response_len: int) -> Usage:
    """The HF ``generate`` engine: whole weights, the KV cache of a chunk of ``sequences``, and the step
    being decoded: its logits ([sequences, vocab] in the model dtype, an fp32 copy, the sampler's
    probabilities and the log-probs kept until the token is drawn), plus one fp32 log-prob per token."""
    usage = Usage()
    usage.add("device", "weights (whole model)", shape.num_params * dtype_bytes)
    usage.add("device", "KV cache", kv_cache_bytes(shape, sequences, prompt_len + response_len, dtype_bytes))
    usage.add("device", "logits of the step decoded", sequences * shape.vocab_size * (dtype_bytes + 12))
    usage.add("device", "sampled-token log-probs", sequences * response_len * 4)
    return usage


def vllm_rollout_usage(shape: ModelShape, *, dtype_bytes: int, tensor_parallel: int,
                       kv_cache: Optional[int], device_memory: int, gpu_memory_utilization: float) -> Usage:
    """One GPU of a vLLM engine: its share of the weights plus the KV-cache budget (the configured
    ``kv_cache_memory_bytes``, else what ``gpu_memory_utilization`` leaves after the weights)."""
    usage = Usage()
    weights = shape.num_params * dtype_bytes // tensor_parallel
    usage.add("device", "weights (tensor-parallel share)", weights)
    budget = kv_cache if kv_cache else max(0, int(gpu_memory_utilization * device_memory) - weights)
    usage.add("device", "KV cache budget", budget)
    return usage


def describe(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 100 else f"{nbytes / 2 ** 20:.2f} MiB"


def dtype_bytes_of(precision: str) -> int:
    return 2 if precision == "bf16" else 4
