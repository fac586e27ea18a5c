#!/usr/bin/env python
"""Check the vLLM rollout path end to end on one GPU (what the CPU-only CI cannot run).

    python scripts/check_gpu.py                          # a tiny Qwen2 model built locally
    python scripts/check_gpu.py --model /path/to/hf_dir  # your model (HF save_pretrained directory)

Needs the GPU extra (``make install`` on a machine where nvidia-smi sees a GPU installs vllm==0.32.0).
Each check prints one line; the last line is a JSON summary; the exit status is 1 if a check failed.

1. CUDA graphs: an engine built from the default ``rollout.vllm`` settings (``enforce_eager=False``,
   ``FULL_AND_PIECEWISE``) captured graphs for the configured batch sizes.
2. Throughput: generated tokens per second with CUDA graphs and with ``enforce_eager=True``, on the same
   fixed workload (``ignore_eos``: every response runs to the limit).
3. Weight sync over CUDA IPC (the colocated path): a perturbed copy of the model, sent in buckets by
   vLLM's IPC trainer engine from ``rollout.vllm_transfer``, after the manifest check.
4. Log-prob agreement: the engine's sampling log-probs against the HF model's teacher-forced ones, with
   the new weights (bf16: a few 1e-2 is normal; fp32 ~1e-5).
5. Sleep / wake: GPU memory released by ``sleep``, weights woken for a sync, KV cache woken, generation
   still right.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


class _Actor:
    """What the IPC sender needs of an actor worker, over a plain HF model on the GPU."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def weight_manifest(self):
        from rlhf_ds.rollout.weights import manifest_of

        return manifest_of(self.model.named_parameters())

    def weight_buckets(self, bucket_bytes: int, on_device: bool = True):
        from rlhf_ds.engine.gather import size_bounded_buckets

        for bucket in size_bounded_buckets(list(self.model.named_parameters()), bucket_bytes):
            yield [(name, p.detach()) for name, p in bucket]


class _Client:
    """vLLM's weight-sync client over one engine in this process (the Ray group's client fans out)."""

    def __init__(self, engine):
        self.engine = engine

    def init_weight_transfer_engine(self, init_info):
        self.engine.transfer_init(init_info)

    def start_weight_update(self):
        self.engine.transfer_start()

    def update_weights(self, update_info):
        self.engine.transfer_update(update_info)

    def finish_weight_update(self, weight_version=None):
        self.engine.transfer_finish()

    def shutdown_weight_transfer_engine(self):
        pass


def _config(model: str, *overrides: str):
    from rlhf_ds.config import load_config

    return load_config("grpo_tiny", [f"actor.model_path={model}", "rollout.backend=vllm", "precision=bf16",
                                     "rollout.max_prompt_len=16", "rollout.max_response_len=96",
                                     "rollout.vllm.gpu_memory_utilization=0.25",
                                     "rollout.vllm.cudagraph_capture_sizes=[1,2,4,8,16,32,64,128,256]",
                                     *overrides])


def _prompts(path: str, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    texts = [f"{a}*{b}=" for a, b in zip(range(101, 101 + count), range(3, 3 + count))]
    return [tok(t)["input_ids"] for t in texts]


def _tokens_per_s(engine, prompts, repeats: int = 3) -> float:
    from rlhf_ds.rollout.base import SamplingParams

    sampling = SamplingParams(temperature=1.0, max_new_tokens=96, ignore_eos=True)
    engine.generate(prompts, 4, sampling, seed=0)   # warm-up
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        samples = engine.generate(prompts, 4, sampling, seed=r + 1)
        rates.append(sum(len(s.response) for s in samples) / (time.perf_counter() - t0))
    return sorted(rates)[len(rates) // 2]


def _logprob_gap(model, prompts, samples) -> tuple[float, float]:
    gaps = []
    for s in samples:
        ids = torch.tensor([list(prompts[s.prompt_index]) + s.response], device="cuda")
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        start = len(prompts[s.prompt_index]) - 1
        gaps += [abs(logp[start + t, tok].item() - lp) for t, (tok, lp) in enumerate(zip(s.response, s.logprobs))]
    return max(gaps), sum(gaps) / len(gaps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:qwen2-arith", help="HF model directory (default: tiny Qwen2)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_gpu: no CUDA device visible; this script checks the GPU path only", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM

    from rlhf_ds.models.tiny import resolve_model_path
    from rlhf_ds.rollout.base import SamplingParams
    from rlhf_ds.rollout.vllm_engine import VLLMRolloutEngine
    from rlhf_ds.rollout.vllm_transfer import open_transfer

    path = resolve_model_path(args.model)
    prompts = _prompts(path, 64)
    results: dict = {}
    failed: list[str] = []

    def report(name: str, ok: bool, **figures) -> None:
        results[name] = dict(ok=ok, **figures)
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {json.dumps(figures)}", flush=True)
        if not ok:
            failed.append(name)

    # 1-2: CUDA graphs and throughput (colocated: the IPC backend, engine core in its own process)
    engine = VLLMRolloutEngine(_config(args.model, "cluster.colocate=true"), in_process=False)
    compilation = engine.llm.llm_engine.vllm_config.compilation_config
    mode, sizes = str(compilation.cudagraph_mode), list(compilation.cudagraph_capture_sizes or [])
    report("cuda_graphs", "NONE" not in mode and bool(sizes), cudagraph_mode=mode, capture_sizes=sizes)
    graphs_rate = _tokens_per_s(engine, prompts)
    eager = VLLMRolloutEngine(_config(args.model, "rollout.vllm.enforce_eager=true"), in_process=False)
    eager_rate = _tokens_per_s(eager, prompts)
    eager.shutdown()
    del eager
    report("throughput", graphs_rate > 0, tokens_per_s_cuda_graphs=round(graphs_rate),
           tokens_per_s_eager=round(eager_rate), speedup=round(graphs_rate / eager_rate, 2))

    # 3-4: a sync over CUDA IPC, then log-prob agreement with the HF model holding the same weights
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    actor = _Actor(model)
    t0 = time.perf_counter()
    engine.start_weight_update(actor.weight_manifest(), "step-1")
    sender = open_transfer("ipc", _Client(engine), actor, rank=0, bucket_bytes=64 << 20)
    sender.send_weights()
    version = engine.finish_weight_update()
    report("ipc_sync", version == "step-1" and engine.weight_version() == "step-1",
           seconds=round(time.perf_counter() - t0, 3), version=version)
    samples = engine.generate(prompts[:16], 2, SamplingParams(temperature=1.0, max_new_tokens=32), seed=3)
    worst, mean = _logprob_gap(model, prompts[:16], samples)
    report("logprob_agreement", mean < 0.05, max_abs_diff=round(worst, 5), mean_abs_diff=round(mean, 6))
    engine.shutdown()
    del engine
    torch.cuda.empty_cache()

    # 5: sleep / wake (colocated runs free the GPU for training between rollouts)
    sleepy = VLLMRolloutEngine(_config(args.model, "cluster.colocate=true", "rollout.vllm.enable_sleep_mode=true"),
                               in_process=False)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)

    def sync(version: str) -> None:
        sleepy.start_weight_update(actor.weight_manifest(), version)
        open_transfer("ipc", _Client(sleepy), actor, rank=0, bucket_bytes=64 << 20).send_weights()
        sleepy.finish_weight_update()

    sync("step-2")
    free_awake = torch.cuda.mem_get_info()[0]
    first = [s.response for s in sleepy.generate(prompts[:8], 1, greedy, 0)]   # ends asleep
    free_asleep = torch.cuda.mem_get_info()[0]
    sync("step-3")   # wakes the weights, loads, wakes the KV cache
    again = [s.response for s in sleepy.generate(prompts[:8], 1, greedy, 0)]
    report("sleep_wake", free_asleep > free_awake and again == first,
           freed_gib=round((free_asleep - free_awake) / 2 ** 30, 2), same_greedy_after_wake=again == first)
    sleepy.shutdown()
    print(json.dumps({"failed": failed, **results}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
