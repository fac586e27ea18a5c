"""The instruct-model path end to end, as a user starts it: `rlhf-ds train` on the tiny Qwen2 with a
byte-level BPE tokenizer, a chat template and no pad token, word problems from JSONL files, prompts in the
chat template, final_number rewards; two GRPO steps without the warm start (it would start a second
Ray session: +30 s; its chat-template encoding is covered by tests/unit/test_chat_template.py)."""
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from rlhf_ds.data.tasks import write_split_jsonl

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_grpo_on_word_problems_with_the_chat_template(tmp_path):
    train = write_split_jsonl("word_problems", tmp_path / "train.jsonl", "train", 64, seed=0)
    held_out = write_split_jsonl("word_problems", tmp_path / "eval.jsonl", "eval", 16, seed=0)
    out = tmp_path / "run"
    overrides = [f"data.train_path={train}", f"data.eval_path={held_out}", "data.num_eval=16",
                 "data.prompts_per_step=8", "rollout.n=4", "algo.mini_batch_size=32", "actor.micro_batch_size=16",
                 "trainer.max_steps=2", "trainer.eval_interval=0", "trainer.sft.steps=0", f"trainer.output_dir={out}"]
    # the model and its tokenizer are built into a cache of this test's own
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLHF_DS_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "rlhf_ds.cli", "train", "grpo_tiny_gsm8k", *overrides, "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "has no pad token: padding with its eos '<|im_end|>'" in done.stdout + done.stderr
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1] and "eval/finished" in rows[-1]
    for key in ("reward/mean", "reward/final_number/mean", "response/length", "actor/policy_loss"):
        assert key in rows[1], key
    assert 0 < rows[1]["response/length"] <= 32
    with open(out / "config.yaml") as f:
        assert "apply_chat_template: true" in f.read()
    # the exported actor keeps the tokenizer as it was: chat template, eos <|im_end|>, no pad token
    exported = AutoTokenizer.from_pretrained(out / "actor_hf")
    assert exported.chat_template and exported.eos_token == "<|im_end|>" and exported.pad_token is None
