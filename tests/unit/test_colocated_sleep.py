"""Colocated sleep mode: the order in which engines sleep and wake and the actor's training states move,
asserted on the real trainer and the real vLLM engine class, with vLLM's ``LLM`` replaced by a recorder
(sleep mode is CUDA-only) and actor / reference workers that record instead of computing.

The order a colocated GPU needs (docs/gpu.md): the engines fall asleep (level 2) as soon as they are
built, before DeepSpeed loads; a sync comes before any generation; after each rollout the engines sleep;
the actor's training states come back before training and leave after it, with every colocated process
returning its cached blocks, before the engines wake their weights for the sync and then their KV cache.
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_ds.algo import Metric, MetricKind
from rlhf_ds.cluster.roles import Roles
from rlhf_ds.cluster.spmd_group import SpmdGroup
from rlhf_ds.config import load_config
from rlhf_ds.data.prompts import load_run_records
from rlhf_ds.engine.gather import size_bounded_buckets
from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.models.tokenizer import load_tokenizer
from rlhf_ds.rollout import vllm_engine
from rlhf_ds.rollout.vllm_engine import VLLMRolloutEngine
from rlhf_ds.rollout.weights import manifest_of
from rlhf_ds.trainer.rl_trainer import RLTrainer

MODEL = "tiny:llama-micro"


class RecordingLLM:
    """What the engine calls of ``vllm.LLM``, recorded; each generation answers two tokens."""

    def __init__(self, log: list, kwargs: dict):
        self.log, self.kwargs, self.version = log, kwargs, "default"
        self.eos = 2
        log.append("rollout: build")

    def sleep(self, level: int) -> None:
        self.log.append(f"rollout: sleep level {level}")

    def wake_up(self, tags=None) -> None:
        self.log.append(f"rollout: wake {'+'.join(tags)}")

    def start_weight_update(self) -> None:
        self.log.append("rollout: start update")

    def update_weights(self, request: dict) -> None:
        self.log.append("rollout: load")

    def finish_weight_update(self, weight_version=None) -> None:
        self.version = weight_version
        self.log.append(f"rollout: live {weight_version}")

    def get_weight_version(self) -> str:
        return self.version

    def reset_prefix_cache(self) -> None:
        self.log.append("rollout: reset prefix cache")

    def generate(self, prompts, params, use_tqdm=False):
        self.log.append("rollout: generate")
        tokens = [7, self.eos]
        return [SimpleNamespace(outputs=[SimpleNamespace(index=j, token_ids=tokens,
                                                         logprobs=[{t: SimpleNamespace(logprob=-0.5)} for t in tokens])
                                         for j in range(p.n)]) for p in params]


def recording_engine(log: list):
    class RecordingEngine(VLLMRolloutEngine):
        @staticmethod
        def _start_llm(kwargs: dict):
            return RecordingLLM(log, kwargs)

    return RecordingEngine


class RecordingActor:
    """The actor's verbs as the trainer calls them, over the tiny model's real parameters."""

    def __init__(self, log: list, role: str = "actor"):
        self.log, self.role = log, role
        self.model = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL))

    def compute_logprobs(self, exp):
        self.log.append(f"{self.role}: log-probs")
        return torch.full(exp.response_ids.shape, -0.5)

    def train_minibatch(self, shard, kl_coef=None):
        self.log.append(f"{self.role}: train")
        return {"loss": Metric(0.0, MetricKind.SUM)}

    def weight_manifest(self):
        return manifest_of(self.model.named_parameters())

    def weight_buckets(self, bucket_bytes=None, on_device=False):
        self.log.append(f"{self.role}: gather")
        for bucket in size_bounded_buckets(list(self.model.named_parameters()), bucket_bytes or 1 << 30):
            yield [(name, p.detach()) for name, p in bucket]

    def reload_states(self):
        self.log.append(f"{self.role}: reload states")

    def offload_states(self):
        self.log.append(f"{self.role}: offload states")
        return {"memory/actor_peak_gib": 1.5}

    def release_memory(self):
        self.log.append(f"{self.role}: release cached memory")

    def save_checkpoint(self, directory, client_state=None):
        os.makedirs(directory)   # where DeepSpeed writes the engine state
        self.log.append(f"{self.role}: save")


@pytest.fixture
def gpu_host(monkeypatch):
    """What the engine reads of the device: a GPU, and its memory in use (2 GiB awake, 0.5 asleep)."""
    monkeypatch.setattr(vllm_engine, "has_gpu", lambda: True)
    used = iter([2 << 30, 1 << 29] * 8)
    monkeypatch.setattr(vllm_engine, "cuda_memory_used_bytes", lambda: next(used))
    for key in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "VLLM_RPC_BASE_PATH",
                "HF_HUB_OFFLINE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_LOGGING_LEVEL", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, "1")   # the engine sets these; monkeypatch restores them after the test


def _config(tmp_path, *extra):
    return load_config("grpo_tiny", [f"actor.model_path={MODEL}", f"reference.model_path={MODEL}", "trainer.sft.steps=0",
                                     "rollout.backend=vllm", "rollout.vllm.enable_sleep_mode=true",
                                     "cluster.colocate=true", "precision=fp32", "algo.kl_placement=loss",
                                     "algo.kl_coef=0.01", "data.prompts_per_step=4", "rollout.n=2",
                                     "algo.mini_batch_size=8", "actor.micro_batch_size=4", "data.num_eval=4",
                                     "trainer.max_steps=2", "trainer.eval_interval=0",
                                     f"trainer.output_dir={tmp_path}", *extra])


def test_a_colocated_step_hands_the_gpu_back_and_forth_in_order(gpu_host, tmp_path):
    log: list = []
    cfg = _config(tmp_path)
    roles = Roles({"actor": SpmdGroup("actor", RecordingActor, worker_args=(log,)),
                   "rollout": SpmdGroup("rollout", recording_engine(log), worker_args=(cfg, True)),
                   "reference": SpmdGroup("reference", RecordingActor, worker_args=(log, "reference"))})
    train, held_out = load_run_records(cfg.data)
    trainer = RLTrainer(cfg, roles, load_tokenizer(MODEL), train, held_out, show_progress=False)
    summary = trainer.fit()
    sync = ["actor: gather", "rollout: wake weights", "rollout: start update", "rollout: load"]
    wake = ["rollout: wake kv_cache", "rollout: reset prefix cache"]
    step = ["rollout: generate", "rollout: sleep level 2",                   # the step's samples, then sleep
            "actor: log-probs", "reference: log-probs",                       # (both concurrent on a GPU run)
            "actor: reload states", "actor: train",
            "actor: offload states", "reference: release cached memory"]
    assert log == ["rollout: build", "rollout: sleep level 2",             # asleep before DeepSpeed loads
                   *sync, "rollout: live step-0", *wake,                      # a sync before any generation
                   "rollout: generate",                                       # the held-out evaluation at step 0
                   *step, *sync, "rollout: live step-1", *wake,
                   *step, *sync, "rollout: live step-2", *wake,
                   "rollout: generate", "actor: save"]                        # the final evaluation, checkpoint
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    step1 = next(r for r in rows if r["step"] == 1)
    assert (step1["memory/gpu_awake_gib"], step1["memory/gpu_asleep_gib"], step1["memory/actor_peak_gib"]) == \
        (2.0, 0.5, 1.5)


def test_an_asleep_engine_refuses_to_generate_and_a_direct_transfer_wakes_it(gpu_host):
    """The NCCL / IPC path: vLLM's trainer engine calls transfer_start / update / finish."""
    log: list = []
    cfg = load_config("grpo_tiny", [f"actor.model_path={MODEL}", "rollout.backend=vllm", "precision=fp32",
                                    "rollout.vllm.enable_sleep_mode=true", "cluster.colocate=true"])
    engine = recording_engine(log)(cfg)
    assert engine.direct_transfer() == ("ipc", 1)
    sampling = vllm_engine.SamplingParams(max_new_tokens=2)
    with pytest.raises(RuntimeError, match="asleep .*a weight sync wakes it"):
        engine.generate([[5, 6]], 1, sampling, seed=0)
    engine.start_weight_update(RecordingActor(log).weight_manifest(), "step-3")
    engine.transfer_start()
    engine.transfer_update({"names": []})
    engine.transfer_finish()
    assert engine.finish_weight_update() == "step-3"
    assert [s.response for s in engine.generate([[5, 6]], 2, sampling, seed=0)] == [[7, 2], [7, 2]]
    assert log == ["rollout: build", "rollout: sleep level 2", "rollout: wake weights", "rollout: start update",
                   "rollout: load", "rollout: live step-3", "rollout: wake kv_cache", "rollout: reset prefix cache",
                   "rollout: generate"]
    assert engine.sleep() == {"memory/gpu_awake_gib": 2.0, "memory/gpu_asleep_gib": 0.5}
    assert engine.sleep() == {}   # asleep already
