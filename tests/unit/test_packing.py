"""Packed micro-batches: rows grouped by length and cut to their own padding leave every real token's
log-prob unchanged, results come back in row order, and less padding is computed."""
import torch
from transformers import AutoModelForCausalLM

from rlhf_ds.batch import packed_micro_batches, padded_fraction
from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.rollout.base import RolloutSample, build_experience
from rlhf_ds.workers.common import in_micro_batches, policy_logprobs


def _exp():
    gen = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(4, 20, (int(n),), generator=gen).tolist() for n in (2, 9, 4, 12, 3, 6)]
    samples = [RolloutSample(i, torch.randint(4, 20, (int(n),), generator=gen).tolist(), [0.0] * int(n))
               for i, n in enumerate((1, 8, 3, 2, 7, 5))]
    return build_experience(prompts, samples, pad_id=0, max_prompt_len=16, max_response_len=8)


def test_trimmed_drops_only_all_padding_columns():
    exp = _exp()
    short = exp.select([0, 2])             # prompts of 3 and 5 tokens, responses of 1 and 3
    cut = short.trimmed()
    assert (cut.prompt_len, cut.response_len) == (5, 3)
    assert cut.attention_mask.sum() == short.attention_mask.sum()
    real = short.attention_mask.bool()
    assert torch.equal(cut.input_ids[cut.attention_mask.bool()], short.input_ids[real])
    assert torch.equal(cut.position_ids[cut.attention_mask.bool()], short.position_ids[real])
    assert exp.trimmed().prompt_len == exp.prompt_len   # the longest rows keep the batch's shape


def test_packing_groups_by_length_and_keeps_every_row_once():
    exp = _exp()
    pieces = packed_micro_batches(exp, 2)
    assert sorted(torch.cat([idx for idx, _ in pieces]).tolist()) == list(range(len(exp)))
    lengths = exp.attention_mask.sum(1)
    assert [lengths[idx].tolist() for idx, _ in pieces] == [[18, 15], [12, 11], [8, 4]]
    consecutive = packed_micro_batches(exp, 2, by_length=False)
    assert [idx.tolist() for idx, _ in consecutive] == [[0, 1], [2, 3], [4, 5]]
    assert padded_fraction(exp, 2, 1) < padded_fraction(exp, 2, 1, by_length=False) < 1 - 68 / (6 * (13 + 8))   # vs padding the whole batch


def test_log_probs_in_packed_micro_batches_equal_the_full_batch_in_row_order():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:llama-micro"))
    exp = _exp()
    cpu = torch.device("cpu")
    packed = policy_logprobs(model, exp, micro_batch_size=2, temperature=0.8, device=cpu)
    whole = policy_logprobs(model, exp, micro_batch_size=len(exp), temperature=0.8, device=cpu)
    mask = exp.response_mask.bool()
    assert packed.shape == whole.shape == exp.response_mask.shape
    torch.testing.assert_close(packed[mask], whole[mask], rtol=1e-5, atol=1e-6)
    # 1-D results (one score per row) come back in row order too
    assert torch.equal(in_micro_batches(lambda m: m.attention_mask.sum(1).float(), exp, 4),
                       exp.attention_mask.sum(1).float())
