"""The SFT and reward-model stages without engines: their losses (hand-derived values, a loop against the
vectorised form, pieces of any layout summing to the whole), their batches, preference data and its
errors, the config views their engines are built from, and the recipes."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from rlhf_ds.algo import token_weights
from rlhf_ds.algo.supervised import (bradley_terry_loss, pair_weights, pairwise_correct, pairwise_loss_sum,
                                     sft_nll_sum)
from rlhf_ds.config import ConfigError, load_config
from rlhf_ds.data.preferences import (PreferenceRecord, build_preference_batch, load_preference_dataset,
                                      load_preference_records, wrong_answer)
from rlhf_ds.data.prompts import DatasetError
from rlhf_ds.models.tiny import build_char_tokenizer


# ----------------------------------------------------------------------------- losses

def test_sft_loss_is_the_token_mean_nll_by_hand():
    # two rows: 2 and 1 response tokens (N = 3); the padded position has log-prob -inf and must not leak
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)], [math.log(0.125), -math.inf]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    weights = token_weights(mask, "token_mean")
    assert torch.equal(weights, torch.tensor([[1 / 3, 1 / 3], [1 / 3, 0.0]]))
    loss = sft_nll_sum(logprobs, weights)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4) + math.log(8)) / 3)   # = 2 ln 2
    assert loss.item() == pytest.approx(2 * math.log(2))


def test_sft_loss_pieces_of_any_layout_sum_to_the_mini_batch_token_mean():
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(8, 5, generator=g) * 3
    mask = (torch.rand(8, 5, generator=g) > 0.3).float()
    mask[4] = 0.0   # an empty response
    weights = token_weights(mask, "token_mean")
    whole = sft_nll_sum(logprobs, weights)
    loop = sum(-logprobs[i, t].item() for i in range(8) for t in range(5) if mask[i, t]) / mask.sum().item()
    assert whole.item() == pytest.approx(loop, rel=1e-6)
    for dp in (1, 2, 4):
        for micro in (1, 2, 4):
            shards = [(rank * 8 // dp, (rank + 1) * 8 // dp) for rank in range(dp)]
            pieces = [sft_nll_sum(logprobs[s:min(s + micro, end)], weights[s:min(s + micro, end)])
                      for start, end in shards for s in range(start, end, micro)]
            assert sum(pieces).item() == pytest.approx(whole.item(), rel=1e-6)
    # a mean of per-micro-batch means is a different objective (the bug the weights avoid)
    per_micro = [sft_nll_sum(logprobs[s:s + 2], token_weights(mask[s:s + 2], "token_mean")) for s in range(0, 8, 2)]
    assert (sum(per_micro) / 4).item() != pytest.approx(whole.item(), rel=1e-3)


def test_bradley_terry_loss_by_hand_and_at_extreme_margins():
    chosen = torch.tensor([0.0, 2.0, 1000.0, -1000.0])
    rejected = torch.tensor([0.0, 0.0, 0.0, 0.0])
    loss = bradley_terry_loss(chosen, rejected)
    assert loss[0].item() == pytest.approx(math.log(2))                      # -log sigmoid(0)
    assert loss[1].item() == pytest.approx(math.log(1 + math.exp(-2)))       # -log sigmoid(2)
    assert loss[2].item() == 0.0 and loss[3].item() == pytest.approx(1000.0)  # no overflow, no precision loss
    assert torch.isfinite(loss).all()


def test_pairwise_loss_is_the_mean_over_the_mini_batch_pairs_whatever_the_layout():
    g = torch.Generator().manual_seed(1)
    chosen, rejected = torch.randn(8, generator=g), torch.randn(8, generator=g)
    weights = pair_weights(8)
    assert torch.equal(weights, torch.full((8,), 0.125))
    whole = pairwise_loss_sum(chosen, rejected, weights)
    loop = sum(-math.log(1 / (1 + math.exp(-(c - r))))
               for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)) / 8
    assert whole.item() == pytest.approx(loop, rel=1e-6)
    for micro in (1, 2, 4):
        pieces = [pairwise_loss_sum(chosen[s:s + micro], rejected[s:s + micro], weights[s:s + micro])
                  for s in range(0, 8, micro)]
        assert sum(pieces).item() == pytest.approx(whole.item(), rel=1e-6)
    with pytest.raises(ValueError, match="at least one pair"):
        pair_weights(0)


def test_pairwise_correct_counts_ties_as_half():
    correct = pairwise_correct(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 2.0, 0.0]))
    assert correct.tolist() == [1.0, 0.0, 0.5]


# ----------------------------------------------------------------------------- batches

def test_sft_minibatch_carries_token_mean_weights_of_the_whole_mini_batch():
    from rlhf_ds.data.prompts import PromptRecord
    from rlhf_ds.trainer.sft_stage import sft_minibatch

    tok = build_char_tokenizer()
    batch = sft_minibatch(tok, [PromptRecord("12*3=", "36"), PromptRecord("5*7=", "35"), PromptRecord("9*9=", "81")])
    assert batch.token_weights.sum().item() == pytest.approx(1.0)
    assert torch.equal(batch.token_weights != 0, batch.response_mask != 0)
    assert batch.response_ids[0, 2].item() == tok.eos_token_id   # answer then eos


def test_preference_batch_pairs_share_prompts_and_lengths_and_slice_together():
    tok = build_char_tokenizer()
    records = [PreferenceRecord("123*4=", "492", "482"), PreferenceRecord("2*3=", "6", "16"),
               PreferenceRecord("10*9=", "90", "91")]
    batch = build_preference_batch(tok, records, max_prompt_len=32)
    assert len(batch) == 3
    assert batch.chosen.prompt_ids.equal(batch.rejected.prompt_ids)
    assert batch.chosen.response_len == batch.rejected.response_len == 4   # "492" + eos is the longest
    last = batch.chosen.response_mask.sum(1).long() - 1
    assert (batch.chosen.response_ids[torch.arange(3), last] == tok.eos_token_id).all()
    piece = batch.replace(pair_weights=pair_weights(3))[1:3]
    assert len(piece) == 2 and piece.pair_weights.tolist() == pytest.approx([1 / 3, 1 / 3])
    assert tok.decode(piece.rejected.response_ids[0], skip_special_tokens=True) == "16"
    assert len(piece.both()) == 4 and [len(c) for c in batch.chunk(2)] == [2, 1]


def test_wrong_answers_differ_in_one_digit_without_a_leading_zero():
    rng = np.random.default_rng(0)
    for answer in ["492", "7", "8991", "100"] * 25:
        wrong = wrong_answer(answer, rng)
        assert len(wrong) == len(answer) and wrong != answer
        assert sum(a != b for a, b in zip(answer, wrong, strict=True)) == 1
        assert len(wrong) == 1 or wrong[0] != "0"


def test_synthetic_preferences_are_correct_against_wrong_and_seeded():
    cfg = load_config(None, ["data.num_eval=20"])
    train, held_out = load_preference_records(cfg.data)
    assert len(held_out) == 20 and len(train) > 1000
    for pair in held_out:
        a, b = pair.prompt[:-1].split("*")
        assert pair.chosen == str(int(a) * int(b)) and pair.rejected != pair.chosen
    assert load_preference_records(cfg.data)[1] == held_out
    assert not {p.prompt for p in held_out} & {p.prompt for p in train}


# ----------------------------------------------------------------------------- data errors

def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_preference_row_without_chosen_names_file_line_and_key(tmp_path):
    path = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1*2=", "chosen": "2", "rejected": "3"},
                                                    {"prompt": "2*2=", "rejected": "5"}])
    with pytest.raises(DatasetError) as err:
        load_preference_dataset(path)
    assert f"{path}:2" in str(err.value) and "'chosen'" in str(err.value)


def test_preference_keys_are_configurable_and_parquet_errors_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _write_jsonl(tmp_path / "pairs.jsonl", [{"q": "1*2=", "good": "2", "bad": "3"}])
    assert load_preference_dataset(path, "q", "good", "bad") == [PreferenceRecord("1*2=", "2", "3")]
    parquet = str(tmp_path / "pairs.parquet")
    pq.write_table(pa.table({"prompt": ["1*2=", "2*2="], "chosen": ["2", "4"]}), parquet)
    with pytest.raises(DatasetError, match=r"row 0: missing key 'rejected'"):
        load_preference_dataset(parquet)


def test_rm_stage_refuses_bad_data_before_any_engine_starts(tmp_path, monkeypatch):
    from rlhf_ds.trainer import rm_stage
    from rlhf_ds.trainer.rm_stage import run_rm_stage

    monkeypatch.setattr(rm_stage, "build_stage_roles", lambda *a, **k: pytest.fail("an engine was started"))
    bad = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1*2=", "rejected": "3"}])
    good = _write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "1*2=", "chosen": "2", "rejected": "3"}])
    cfg = load_config("rm_tiny", [f"data.train_path={bad}", f"data.eval_path={good}",
                                  "reward.model_path=tiny:llama-micro-value", f"trainer.output_dir={tmp_path / 'out'}"])
    with pytest.raises(DatasetError, match=rf"{bad}:1: missing key 'chosen'"):
        run_rm_stage(cfg, log=lambda *_: None)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- config

def test_stage_rules_give_every_rank_a_share():
    with pytest.raises(ConfigError, match=r"trainer.sft.batch_size=2 must be at least actor.num_ranks=4"):
        load_config("sft_tiny", ["trainer.sft.batch_size=2", "actor.num_ranks=4", "actor.micro_batch_size=1"])
    with pytest.raises(ConfigError, match=r"trainer.rm.batch_size=1 must be at least reward.num_ranks=2"):
        load_config("rm_tiny", ["trainer.rm.batch_size=1", "reward.num_ranks=2"])
    with pytest.raises(ConfigError, match=r"trainer.rm.steps > 0 .* reward.model_path"):
        load_config("rm_tiny", ["reward.model_path="])
    load_config("sft_tiny", ["trainer.sft.batch_size=10", "actor.num_ranks=4", "actor.micro_batch_size=1"])   # uneven shards


def test_engine_views_put_the_stage_settings_where_the_engine_builder_reads_them():
    from rlhf_ds.workers.rm import ENGINE_SLOT, reward_model_engine_config
    from rlhf_ds.workers.sft import sft_engine_config

    sft = load_config("sft_tiny", ["actor.lr=1e-5", "actor.weight_decay=0.1"])
    view = sft_engine_config(sft)
    assert view.actor.lr == sft.trainer.sft.lr and view.actor.weight_decay == 0.1
    assert view.algo.mini_batch_size == sft.trainer.sft.batch_size and view.actor.model_path == sft.actor.model_path
    rm = load_config("rm_tiny", ["trainer.rm.lr=2e-4", "reward.micro_batch_size=8"])
    view = reward_model_engine_config(rm)
    slot = getattr(view, ENGINE_SLOT)
    assert (slot.model_path, slot.lr, slot.micro_batch_size, slot.ds_config) == (
        rm.reward.model_path, 2e-4, 8, rm.trainer.rm.ds_config)
    assert view.algo.mini_batch_size == rm.trainer.rm.batch_size
    assert rm.critic == load_config("rm_tiny").critic   # the run's own config is unchanged


# ----------------------------------------------------------------------------- recipes

def test_stage_recipes_describe_what_they_promise():
    sft, rm, ppo = load_config("sft_tiny"), load_config("rm_tiny"), load_config("ppo_tiny_rm")
    assert sft.trainer.sft.steps > 0 and sft.data.train_path == "synthetic:multiplication"
    assert sft.trainer.sft.batch_size % (sft.actor.num_ranks * sft.actor.micro_batch_size) == 0
    assert rm.trainer.rm.steps > 0 and rm.reward.model_path.startswith("tiny:") and rm.reward.model_path.endswith("-value")
    # the PPO recipe reads the reward model where `make train-rm` writes it, trained on pairs where
    # `rlhf-ds pairs` writes them, starting from the model `make train-sft` writes
    sampled = load_config("rm_tiny_sampled", stage="rm")
    assert ppo.uses_reward_model and ppo.needs_critic and not ppo.reward.functions
    assert ppo.reward.model_path == f"{sampled.trainer.output_dir}/reward_hf"
    assert sampled.data.train_path == f"{sampled.trainer.output_dir}/pairs/train.jsonl"
    assert sampled.reward.model_path == f"{sft.trainer.output_dir}/actor_hf"
    makefile = open(os.path.join(os.path.dirname(__file__), "..", "..", "Makefile")).read()
    assert f"rlhf-ds pairs ppo_tiny_rm --out {sampled.trainer.output_dir}/pairs" in makefile
