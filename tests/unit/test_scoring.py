"""Driver-side scoring: what a NaN / inf reward-model score does (reward.nonfinite_model_score), and
held-out evaluation scored by the run's own rule rewards (accuracy, pass@k)."""
import math

import pytest
import torch

from rlhf_ds.choices import NONFINITE_SCORE_POLICIES
from rlhf_ds.data.prompts import PromptRecord
from rlhf_ds.models.tiny import build_char_tokenizer
from rlhf_ds.rewards import RewardRunner, runner_from_config
from rlhf_ds.rewards.functions import final_number_match
from rlhf_ds.rollout.base import RolloutSample
from rlhf_ds.trainer.scoring import clean_model_scores, evaluate, is_correct


def test_finite_scores_pass_through_under_every_policy():
    scores = torch.tensor([0.5, -1.0, 2.0])
    for policy in NONFINITE_SCORE_POLICIES:
        cleaned, metrics = clean_model_scores(scores, policy, failure_value=-9.0)
        assert torch.equal(cleaned, scores) and cleaned.dtype == scores.dtype
        assert metrics == {"reward/model_nonfinite": 0.0}


def test_failure_value_replaces_each_nonfinite_score_and_counts_them():
    scores = torch.tensor([0.5, math.nan, 2.0, math.inf, -math.inf], dtype=torch.bfloat16)
    cleaned, metrics = clean_model_scores(scores, "failure_value", failure_value=-1.0)
    assert cleaned.dtype == torch.bfloat16
    assert cleaned.tolist() == [0.5, -1.0, 2.0, -1.0, -1.0]
    assert metrics == {"reward/model_nonfinite": 3.0}
    assert math.isnan(scores[1].item())  # the input is not modified in place


def test_fail_policy_raises_on_one_nonfinite_score_naming_the_key():
    with pytest.raises(ValueError, match=r"reward\.nonfinite_model_score='fail'") as err:
        clean_model_scores(torch.tensor([0.5, math.nan, 2.0]), "fail", failure_value=0.0)
    assert "1 non-finite" in str(err.value) and "of 3" in str(err.value)


@pytest.mark.parametrize("policy", NONFINITE_SCORE_POLICIES)
@pytest.mark.parametrize("bad", [[math.nan], [math.nan, math.inf, -math.inf]])
def test_no_finite_score_in_a_step_always_raises(policy, bad):
    with pytest.raises(ValueError, match="the reward model produced no finite score in this step"):
        clean_model_scores(torch.tensor(bad), policy, failure_value=0.0)


def test_empty_step_and_unknown_policy():
    cleaned, metrics = clean_model_scores(torch.zeros(0), "fail", failure_value=0.0)
    assert cleaned.numel() == 0 and metrics == {"reward/model_nonfinite": 0.0}
    with pytest.raises(ValueError) as err:
        clean_model_scores(torch.ones(2), "skip", failure_value=0.0)
    assert "reward.nonfinite_model_score" in str(err.value)
    assert all(repr(policy) in str(err.value) for policy in NONFINITE_SCORE_POLICIES)


# ----------------------------------------------------------------------------- held-out evaluation

TOKENIZER = build_char_tokenizer("0123456789 #")
RECORDS = [PromptRecord("1", "#### 12"), PromptRecord("2", "#### 7"), PromptRecord("3", "#### 3")]
# one sample each: a worked answer, a bare number, the right number cut at the length limit (no eos)
GREEDY = ["1 #### 12", "7", "3"]
GREEDY_EOS = [True, True, False]


def ids(text: str, eos: bool = True) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"] + ([TOKENIZER.eos_token_id] if eos else [])


class FakeEngine:
    """Greedy (n = 1): GREEDY. n = k: prompt 0 right only in its last sample, prompt 1 never, prompt 2
    always. Records every request's (n, temperature)."""

    def __init__(self):
        self.requests = []

    def generate(self, prompts, n, sampling, seed):
        self.requests.append((n, sampling.temperature))
        if n == 1:
            return [RolloutSample(i, ids(GREEDY[i], GREEDY_EOS[i]), [0.0]) for i in range(len(prompts))]
        right = {0: lambda j: j == n - 1, 1: lambda j: False, 2: lambda j: True}
        return [RolloutSample(i, ids(RECORDS[i].answer if right[i](j) else "5"), [0.0])
                for i in range(len(prompts)) for j in range(n)]


def run_eval(engine, **kwargs):
    prompts = [TOKENIZER(r.prompt)["input_ids"] for r in RECORDS]
    return evaluate(engine.generate, TOKENIZER, RECORDS, prompts, 0.0, 16, TOKENIZER.pad_token_id, 8,
                    stop_ids=(TOKENIZER.eos_token_id,), **kwargs)


def final_number_runner(prompts, responses, answers, finished):
    return final_number_match(prompts, responses, answers, finished), {}


def test_evaluation_scores_with_the_runs_reward_not_exact_match():
    # exact_match (no runner: the old behaviour) pays none of GREEDY; final_number pays the two that stop
    assert run_eval(FakeEngine())["eval/accuracy"] == 0.0
    out = run_eval(FakeEngine(), runner=final_number_runner)
    assert out["eval/accuracy"] == pytest.approx(2 / 3)
    assert out["eval/finished"] == pytest.approx(2 / 3) and out["eval/reward_mean"] == pytest.approx(2 / 3)
    assert not any(key.startswith("eval/pass@") for key in out)


def test_evaluation_with_a_real_reward_runner():
    with RewardRunner(["final_number"], num_workers=1) as runner:
        assert run_eval(FakeEngine(), runner=runner)["eval/accuracy"] == pytest.approx(2 / 3)


def test_correct_means_reaching_correct_score_up_to_round_off():
    scores = torch.tensor([1.0 - 1e-12, 0.999, 1.5, 0.0, 0.1 + 0.2 + 0.7], dtype=torch.float64)
    assert is_correct(scores, 1.0).tolist() == [True, False, True, False, True]
    assert is_correct(torch.tensor([2.0, 1.0]), 2.0).tolist() == [True, False]
    # the threshold reaches evaluate: with weights 0.5 a right answer scores 0.5
    half = lambda *args: ([0.5 * s for s in final_number_runner(*args)[0]], {})  # noqa: E731
    assert run_eval(FakeEngine(), runner=half)["eval/accuracy"] == 0.0
    assert run_eval(FakeEngine(), runner=half, correct_score=0.5)["eval/accuracy"] == pytest.approx(2 / 3)


def test_pass_at_k_is_the_fraction_of_prompts_with_a_correct_sample_among_k():
    engine = FakeEngine()
    out = run_eval(engine, runner=final_number_runner, pass_k=4, pass_k_temperature=0.7)
    assert out["eval/pass@4"] == pytest.approx(2 / 3)           # prompt 0 (last sample) and prompt 2
    assert out["eval/accuracy"] == pytest.approx(2 / 3)         # still the one greedy sample per prompt
    assert engine.requests == [(1, 0.0), (4, 0.7)]
    assert "eval/pass@2" in run_eval(FakeEngine(), runner=final_number_runner, pass_k=2)


def test_runner_from_config():
    from rlhf_ds.config import load_config

    assert runner_from_config(load_config(None, ["reward.functions=[]", "reward.use_model=true",
                                                 "reward.model_path=x"]).reward) is None
    reward = load_config(None, ["reward.functions=[exact_match, format]", "reward.function_weights=[1, 0.1]",
                                "reward.timeout_s=3", "reward.max_failure_fraction=0.25"]).reward
    runner = runner_from_config(reward)
    assert runner.names == ["exact_match", "format"] and runner.weights == [1.0, 0.1]
    assert runner.timeout_s == 3.0 and runner.max_failure_fraction == 0.25
    runner.close()


def test_sft_cache_key_follows_what_scores_its_stop():
    import dataclasses
    import hashlib
    import json

    from rlhf_ds.config import load_config
    from rlhf_ds.trainer.warm_start import sft_dir

    cfg = load_config(None)
    # the key of every warm start cached before the stop was scored by the run's rewards: still valid
    old_key = {"model": cfg.actor.model_path, "sft": dataclasses.asdict(cfg.trainer.sft), "seed": cfg.seed,
               "data": [cfg.data.train_path, cfg.data.eval_path, cfg.data.num_train, cfg.data.num_eval,
                        cfg.data.task_seed, cfg.data.prompt_key, cfg.data.answer_key],
               "max_response_len": cfg.rollout.max_response_len, "version": 1}
    assert sft_dir(cfg).name.endswith(hashlib.sha256(json.dumps(old_key, sort_keys=True).encode()).hexdigest()[:12])
    changed = [["reward.functions=[final_number]"], ["reward.function_weights=[0.5]", "reward.correct_score=0.5"],
               ["actor.tokenizer_path=/some/tokenizer"], ["data.apply_chat_template=true"],
               ["reward.remote.url=http://127.0.0.1:8000/score"]]
    dirs = {sft_dir(load_config(None, overrides)) for overrides in changed}
    assert len(dirs) == 5 and sft_dir(cfg) not in dirs
