"""Engine-level checks of the vLLM rollout engine, run in a process of their own (an in-process vLLM
engine pins torch to one thread and replaces ``torch.set_num_threads`` for the whole process).

Prints one JSON object; ``test_vllm_rollout.py`` asserts on it. Usage: python _vllm_engine_checks.py MODEL
"""
import json
import sys

import torch


def teacher_forced_gap(model, prompts, samples, temperature):
    """max |engine log-prob - log_softmax(HF logits / T)| over the sampled tokens."""
    worst = 0.0
    for s in samples:
        ids = torch.tensor([list(prompts[s.prompt_index]) + s.response])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float() / temperature, -1)
        start = len(prompts[s.prompt_index]) - 1
        ref = [logp[start + t, tok].item() for t, tok in enumerate(s.response)]
        worst = max([worst] + [abs(a - b) for a, b in zip(ref, s.logprobs, strict=True)])
    return worst


def main(model_spec: str) -> None:
    from transformers import AutoTokenizer

    from rlhf_ds.config import load_config
    from rlhf_ds.models.tiny import resolve_model_path
    from rlhf_ds.rollout.base import SamplingParams
    from rlhf_ds.rollout.hf_engine import HFRolloutEngine
    from rlhf_ds.rollout.vllm_engine import VLLMRolloutEngine
    from rlhf_ds.rollout.weights import ParamSpec, WeightMismatch, manifest_of

    cfg = load_config("grpo_tiny", [f"actor.model_path={model_spec}", "rollout.backend=vllm",
                                    "rollout.vllm.kv_cache_memory_bytes=134217728", "rollout.vllm.enforce_eager=true",
                                    "rollout.max_prompt_len=16", "rollout.max_response_len=16"])
    path = resolve_model_path(model_spec)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok(p)["input_ids"] for p in ("123*4=", "56*7=", "9*9=", "871*3=")]
    engine = VLLMRolloutEngine(cfg, local_updates=True)   # buckets from this process (the launcher's path)
    hf = HFRolloutEngine(model_spec)
    out: dict = {}
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    sampled = SamplingParams(temperature=0.8, max_new_tokens=12)

    out["greedy_equal_hf"] = ([s.response for s in engine.generate(prompts, 1, greedy, 0)]
                              == [s.response for s in hf.generate(prompts, 1, greedy, 0)])
    a = engine.generate(prompts, 3, sampled, seed=11)
    out["same_seed_same"] = [s.response for s in a] == [s.response for s in engine.generate(prompts, 3, sampled, 11)]
    out["other_seed_differs"] = [s.response for s in a] != [s.response for s in engine.generate(prompts, 3, sampled, 12)]
    out["prompt_major"] = [s.prompt_index for s in a] == [i for i in range(len(prompts)) for _ in range(3)]
    out["logprob_gap_initial"] = teacher_forced_gap(hf.model, prompts, a, 0.8)
    fixed = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True)
    long = engine.generate(prompts, 4, fixed, seed=5)
    out["ignore_eos_lengths"] = sorted({len(s.response) for s in long})
    out["ignore_eos_has_inner_eos"] = any(tok.eos_token_id in s.response[:-1] for s in long)

    # new weights: the HF model perturbed; the engine must serve exactly them after the update
    torch.manual_seed(1)
    new = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in hf.model.named_parameters()}
    before = [s.response for s in engine.generate(prompts, 1, greedy, 0)]
    refusals = {}
    manifest = manifest_of(new.items())
    bad_manifests = {
        "name": [ParamSpec("model.not_a_layer", s.dtype, s.shape) if i == 0 else s for i, s in enumerate(manifest)],
        "shape": [ParamSpec(s.name, s.dtype, (s.shape[0] + 1,) + s.shape[1:]) if i == 1 else s
                  for i, s in enumerate(manifest)],
        "dtype": [ParamSpec(s.name, "bfloat16", s.shape) if i == 2 else s for i, s in enumerate(manifest)],
    }
    for kind, bad in bad_manifests.items():
        try:
            engine.start_weight_update(bad, "bad")
            refusals[kind] = "accepted"
        except WeightMismatch as err:
            refusals[kind] = str(err)
    # a manifest that is right, then a bucket that is not what it announced
    engine.start_weight_update(manifest, "bad-bucket")
    try:
        engine.update_weights([(n, t.to(torch.float64)) for n, t in new.items()])
        refusals["bucket"] = "accepted"
    except WeightMismatch as err:
        refusals["bucket"] = str(err)
    out["refusals"] = refusals
    out["unchanged_after_refusals"] = [s.response for s in engine.generate(prompts, 1, greedy, 0)] == before
    out["version_after_refusals"] = engine.weight_version()

    items = list(new.items())
    engine.start_weight_update(manifest, "step-1")
    engine.update_weights(items[: len(items) // 2])
    engine.update_weights(items[len(items) // 2:])
    out["version"] = engine.finish_weight_update()
    hf.update_weights(items) if not hasattr(hf, "start_weight_update") else _hf_update(hf, manifest, items)
    out["greedy_equal_hf_after_update"] = ([s.response for s in engine.generate(prompts, 1, greedy, 0)]
                                           == [s.response for s in hf.generate(prompts, 1, greedy, 0)])
    out["logprob_gap_after_update"] = teacher_forced_gap(hf.model, prompts, engine.generate(prompts, 3, sampled, 7), 0.8)
    engine.shutdown()
    print("RESULT " + json.dumps(out))


def _hf_update(hf, manifest, items):
    hf.start_weight_update(manifest, "step-1")
    hf.update_weights(items)
    hf.finish_weight_update()


if __name__ == "__main__":
    main(sys.argv[1])
