"""HF rollout engine memory: log-probs cost one step's [B, V], not every step's [B, T, V].

The generation runs in a fresh interpreter so that its peak resident memory (``ru_maxrss``) measures this
engine alone; tracemalloc does not see torch's allocations. Decoding is greedy: log-probs are collected the
same way as when sampling, and torch.multinomial over 151,936 tokens would cost ~0.2 s a step on one thread
(sampling instead took 98 s here, for a peak of 0.27 GiB).
"""
import json
import os
import subprocess
import sys

VOCAB = 151_936                         # Qwen2's vocabulary
SEQUENCES, NEW_TOKENS = 64, 96
ALL_STEPS_LOGITS_BYTES = SEQUENCES * NEW_TOKENS * VOCAB * 4   # ~3.7 GB: what output_logits=True keeps

_GENERATE = f"""
import json, resource, time, types
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from rlhf_ds.rollout.base import SamplingParams
from rlhf_ds.rollout.hf_engine import HFRolloutEngine

torch.set_num_threads(1)
torch.manual_seed(0)
config = LlamaConfig(vocab_size={VOCAB}, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
model = LlamaForCausalLM(config).float()
engine = HFRolloutEngine.from_model(model, types.SimpleNamespace(pad_token_id=0, eos_token_id=2))
prompts = [[1, 5 + i, 9, 7] for i in range({SEQUENCES})]
baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
samples = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens={NEW_TOKENS},
                                                     ignore_eos=True), seed=0)
print(json.dumps({{"seconds": time.perf_counter() - start,
                  "peak_growth_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) * 1024,
                  "lengths": sorted({{len(s.response) for s in samples}}),
                  "sequences": len(samples)}}))
"""


def test_peak_memory_of_a_large_vocabulary_rollout_is_far_below_all_steps_logits():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _GENERATE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"peak memory growth {result['peak_growth_bytes'] / 2**30:.2f} GiB over "
          f"{SEQUENCES} x {NEW_TOKENS} tokens of a {VOCAB}-token vocabulary in {result['seconds']:.1f} s "
          f"(all steps' logits: {ALL_STEPS_LOGITS_BYTES / 2**30:.2f} GiB)")
    assert result["sequences"] == SEQUENCES and result["lengths"] == [NEW_TOKENS]
    assert result["peak_growth_bytes"] < ALL_STEPS_LOGITS_BYTES / 4   # one step's [B, V] is 39 MB
