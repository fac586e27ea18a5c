"""Experience: padding conventions, positions and row operations."""
import pytest
import torch

from rlhf_ds.batch import Experience, pad_prompts, pad_responses


def make_batch():
    prompt_ids, prompt_mask = pad_prompts([[5, 6, 7], [8]], pad_id=0)
    response_ids, response_mask = pad_responses([[1, 2], [3, 4, 9], []], pad_id=0)
    return prompt_ids, prompt_mask, response_ids, response_mask


def test_padding_sides():
    prompt_ids, prompt_mask, response_ids, response_mask = make_batch()
    # prompts are left-padded, responses right-padded
    assert prompt_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert response_ids.tolist() == [[1, 2, 0], [3, 4, 9], [0, 0, 0]]
    assert response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0]]


def test_positions_start_at_first_real_token():
    exp = Experience(
        prompt_ids=torch.tensor([[5, 6], [0, 8]]), prompt_mask=torch.tensor([[1, 1], [0, 1]]),
        response_ids=torch.tensor([[1, 2], [3, 0]]), response_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
        group_ids=torch.tensor([0, 0]))
    assert exp.input_ids.tolist() == [[5, 6, 1, 2], [0, 8, 3, 0]]
    assert exp.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 0]]
    # row 1: the pad gets 0, the prompt token 0, the response token 1; trailing padding repeats the last
    assert exp.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 1, 1]]


def test_select_split_cat_round_trip():
    n = 5
    exp = Experience(
        prompt_ids=torch.arange(2 * n).view(n, 2), prompt_mask=torch.ones(n, 2, dtype=torch.long),
        response_ids=torch.arange(3 * n).view(n, 3), response_mask=torch.ones(n, 3),
        group_ids=torch.tensor([0, 0, 1, 1, 2]), rewards=torch.arange(n, dtype=torch.float32))
    pieces = exp.chunk(2)
    assert [len(p) for p in pieces] == [2, 2, 1]
    back = Experience.cat(pieces)
    for name, value in exp.tensors().items():
        assert torch.equal(value, back.tensors()[name])
    picked = exp.select([4, 0])
    assert picked.rewards.tolist() == [4.0, 0.0]
    assert picked.old_logprobs is None
    with pytest.raises(ValueError, match="do not add up"):
        exp.split([2, 2])
    with pytest.raises(ValueError, match="fields"):
        Experience.cat([pieces[0], pieces[1].replace(rewards=None)])
