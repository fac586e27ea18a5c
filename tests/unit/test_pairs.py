"""`rlhf-ds pairs`: preference pairs from a policy's own samples, labelled by the run's rule rewards."""
import json

import numpy as np
import pytest

from rlhf_ds.config import load_config
from rlhf_ds.data.preferences import load_preference_dataset
from rlhf_ds.data.prompts import PromptRecord
from rlhf_ds.rewards import RewardRunner
from rlhf_ds.models.tokenizer import load_tokenizer
from rlhf_ds.rollout.base import RolloutSample
from rlhf_ds.trainer.pairs import label_samples, run_pairs, sample_pairs, write_pairs

RECORDS = [PromptRecord("12*3=", "36"), PromptRecord("11*4=", "44"), PromptRecord("10*5=", "50")]


def test_pairs_prefer_a_correct_sample_over_each_distinct_finished_wrong_one():
    # prompt 0: one right, two distinct wrong (one repeated); prompt 1: none right; prompt 2: all right
    texts = ["36", "35", "35", "38",  "43", "42", "41", "44x",  "50", "50", "50", "50"]
    finished = [True, True, True, False, True, True, True, True, True, True, True, True]
    correct = [t == r.answer for t, r in zip(texts, [RECORDS[i // 4] for i in range(12)], strict=True)]
    pairs = label_samples(RECORDS, texts, finished, correct, n=4, pairs_per_prompt=2, rng=np.random.default_rng(0))
    by_prompt = {}
    for p in pairs:
        by_prompt.setdefault(p.prompt, []).append((p.chosen, p.rejected))
    assert by_prompt["12*3="] == [("36", "35")]            # "35" once; "38" never finished
    assert {c for c, _ in by_prompt["11*4="]} == {"44"}      # no right sample: the reference answer
    assert len(by_prompt["11*4="]) == 2 and {r for _, r in by_prompt["11*4="]} <= {"43", "42", "41", "44x"}
    assert "10*5=" not in by_prompt                          # nothing wrong to prefer against
    one = label_samples(RECORDS, texts, finished, correct, n=4, pairs_per_prompt=1, rng=np.random.default_rng(0))
    assert len(one) == 2


class ScriptedEngine:
    """Per prompt: the answer, a wrong answer, and the answer cut off before eos."""

    def __init__(self, tokenizer, records):
        self.tok, self.records = tokenizer, records

    def generate(self, prompts, n, sampling, seed):
        out = []
        for i, _ in enumerate(prompts):
            answer = self.records[i].answer
            ids = lambda text: self.tok(text, add_special_tokens=False)["input_ids"]   # noqa: E731
            for response in (ids(answer) + [self.tok.eos_token_id], ids(answer[:-1] + "9") + [self.tok.eos_token_id],
                             ids(answer)):
                out.append(RolloutSample(i, response, [0.0] * len(response)))
        return out


def test_sampled_pairs_are_labelled_by_the_rule_reward_and_read_back_as_preference_data(tmp_path):
    cfg = load_config("ppo_tiny", ["actor.model_path=tiny:llama-micro", "rollout.n=3", "rollout.max_response_len=8",
                                   "algo.mini_batch_size=64"])
    tokenizer = load_tokenizer(cfg.actor.model_path)
    records = [PromptRecord("123*4=", "492"), PromptRecord("201*3=", "603")]
    with RewardRunner(["exact_match"]) as runner:
        pairs, stats = sample_pairs(ScriptedEngine(tokenizer, records), tokenizer, records, cfg, runner, seed=0,
                                    pairs_per_prompt=2, log=lambda *_: None)
    # the cut-off answer is wrong by exact match (no eos) but not a finished answer: never a rejected one
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("123*4=", "492", "499"), ("201*3=", "603", "609")]
    assert stats == {"samples": 6, "correct": pytest.approx(1 / 3), "pairs": 2}
    write_pairs(pairs, tmp_path / "train.jsonl")
    rows = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    assert rows[0] == {"prompt": "123*4=", "chosen": "492", "rejected": "499"}
    assert [r.rejected for r in load_preference_dataset(str(tmp_path / "train.jsonl"))] == ["499", "609"]


def test_a_policy_that_never_finishes_a_wrong_answer_gives_no_pairs_and_says_so(tmp_path):
    """An untrained micro model rarely stops on eos within 2 tokens: nothing to prefer, a clear error."""
    cfg = load_config("ppo_tiny", ["actor.model_path=tiny:llama-micro", "trainer.sft.steps=0", "rollout.n=2",
                                   "rollout.max_response_len=1", "data.num_eval=4"])
    with pytest.raises(ValueError, match=r"pairs: no train prompt got a wrong sample from .*llama-micro"):
        run_pairs(cfg, str(tmp_path), num_train=4, log=lambda *_: None)
