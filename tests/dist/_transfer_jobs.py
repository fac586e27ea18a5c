"""The GPU weight transfer's path on 2 gloo ranks: real ZeRO-3 actor engines (every parameter partitioned)
feed vLLM's NCCL trainer engine through ``ZeroWeightSource``; vLLM's NCCL worker engines receive. The
NCCL communicator and CUDA streams are the gloo stand-ins of ``rollout.vllm_gloo``; the receivers'
model records what vLLM's packed consumer hands it (vLLM's layerwise reload into a real model is the e2e
test's)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch

import _jobs
from rlhf_ds.engine import dist
from rlhf_ds.rollout.vllm_settings import GLOO_BACKEND
from rlhf_ds.rollout.vllm_transfer import engine_init_info, nccl_world_size, open_transfer

NUM_ENGINES = 2


class RecordingModel:
    """The receiving model's ``load_weights``: keeps a copy of every tensor and the chunk it came in."""

    def __init__(self):
        self.received: list[tuple[str, torch.Tensor]] = []
        self.chunks: list[int] = []

    def load_weights(self, weights):
        weights = list(weights)
        self.chunks.append(sum(t.numel() * t.element_size() for _, t in weights))
        self.received += [(name, t.clone()) for name, t in weights]


def receiver():
    """vLLM's NCCL worker engine over gloo, as a vLLM worker builds it (its rank in the transfer group
    comes with the init info: ``engine_init_info``)."""
    from vllm.config.weight_transfer import WeightTransferConfig

    from rlhf_ds.rollout.vllm_gloo import GlooWeightTransferEngine

    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_index=0, world_size=1, rank=0),
                                  model_config=None)
    return GlooWeightTransferEngine(WeightTransferConfig(backend=GLOO_BACKEND), vllm_config, torch.device("cpu"),
                                    RecordingModel())


class ThreadedClient:
    """vLLM's weight-sync client over receivers in this process: each call reaches every engine at once,
    as the Ray group's client does with remote calls (the NCCL rendezvous and broadcasts need them all)."""

    def __init__(self, receivers: list):
        self.receivers, self.calls = receivers, []

    def _all(self, call) -> None:
        if not self.receivers:
            return
        with ThreadPoolExecutor(len(self.receivers)) as pool:
            for future in [pool.submit(call, i, r) for i, r in enumerate(self.receivers)]:
                future.result()

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.calls.append("init")
        self._all(lambda i, r: r.init_transfer_engine(r.parse_init_info(engine_init_info(init_info, i, 1))))

    def start_weight_update(self) -> None:
        self.calls.append("start")

    def update_weights(self, update_info: dict) -> None:
        self.calls.append("update")
        self._all(lambda i, r: r.update_weights(update_info))

    def finish_weight_update(self, weight_version=None) -> None:
        self.calls.append("finish")


def transfer_job(model_dir: str, out_dir: str, ds_config: str, port: int, bucket_bytes: int, exp) -> dict:
    from rlhf_ds.workers.actor import ActorWorker

    cfg = _jobs.make_config(model_dir, out_dir, extra=[f"actor.ds_config={ds_config}"])
    worker = ActorWorker(cfg)
    worker.init_model()
    rank = dist.dp_rank()
    receivers = [receiver() for _ in range(NUM_ENGINES)] if rank == 0 else []
    client = ThreadedClient(receivers)
    rendezvous = (dict(master_address="127.0.0.1", master_port=port, world_size=nccl_world_size(NUM_ENGINES, 1))
                  if rank == 0 else {})
    sender = open_transfer(GLOO_BACKEND, client, worker, rank, bucket_bytes, **rendezvous)
    out: dict = {"partitioned": _jobs.zero3_layout(worker.role_engine.module), "manifest":
                 [(s.name, s.dtype, s.shape) for s in worker.weight_manifest()], "rounds": []}
    for round_index in range(2):   # the weights as loaded, then after one optimizer step
        if round_index:
            worker.train_minibatch(_jobs.my_shard(_jobs.with_mode(exp, "token_mean", 2)))
        sender.send_weights()
        full = _jobs.params_of(worker)   # collective: every rank
        if rank == 0:
            out["rounds"].append({"actor": full, "engines": [r.model.received for r in receivers],
                                  "chunks": [r.model.chunks for r in receivers]})
            for r in receivers:
                r.model.received, r.model.chunks = [], []
    out["client_calls"] = client.calls
    sender.shutdown()
    for r in receivers:
        r.shutdown()
    return out if rank == 0 else {}


def gather_all_template(tmp_dir: str) -> str:
    """The training template with every parameter partitioned (persistence threshold 0)."""
    with open("ds_configs/zero3_train.json") as f:
        template = json.load(f)
    template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = f"{tmp_dir}/zero3_gather_all.json"
    with open(path, "w") as f:
        json.dump(template, f)
    return path
