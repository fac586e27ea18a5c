"""HF rollout engine: seeded sampling, rollout log-probs equal to a teacher-forced forward, eos trimming,
experience assembly, weight loading, and the weight-sync buckets (size bound, order, SPMD delivery)."""
import pytest
import torch
from transformers import AutoTokenizer

from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.rollout.base import SamplingParams, build_experience
from rlhf_ds.rollout.hf_engine import HFRolloutEngine, response_logprobs, trim_at_eos
from rlhf_ds.cluster.spmd_group import SpmdGroup
from rlhf_ds.engine.gather import size_bounded_buckets

MODEL = "tiny:llama-micro"


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return HFRolloutEngine(MODEL)


@pytest.fixture(scope="module")
def prompts():
    tok = AutoTokenizer.from_pretrained(resolve_model_path(MODEL))
    return [tok(p)["input_ids"] for p in ("123*4=", "56*7=", "9*9=")]


def test_trim_at_eos_keeps_the_eos_and_drops_the_rest():
    assert trim_at_eos([5, 6, 2, 0, 0], eos_id=2) == [5, 6, 2]
    assert trim_at_eos([5, 6, 7], eos_id=2) == [5, 6, 7]


def test_response_logprobs_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])          # [1, 2, 2]
    tokens = torch.tensor([[1, 0]])
    expected = [torch.log(torch.tensor(0.5)).item(),
                (1.0 - torch.logsumexp(torch.tensor([1.0, 0.0]), 0)).item()]  # temperature 2: logits / 2
    assert response_logprobs(logits, tokens, 2.0)[0].tolist() == pytest.approx(expected)


def test_same_seed_same_samples_other_seed_differs(engine, prompts):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    a = [s.response for s in engine.generate(prompts, 4, sampling, seed=3)]
    b = [s.response for s in engine.generate(prompts, 4, sampling, seed=3)]
    c = [s.response for s in engine.generate(prompts, 4, sampling, seed=4)]
    assert a == b and a != c
    assert len(a) == 12


def test_rollout_logprobs_match_a_teacher_forced_forward(engine, prompts):
    temperature = 0.7
    samples = engine.generate(prompts, 3, SamplingParams(temperature=temperature, max_new_tokens=8), seed=0)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]   # prompt-major
    exp = build_experience(prompts, samples, engine.pad_id, max_prompt_len=16, max_response_len=8)
    with torch.no_grad():
        logits = engine.model(input_ids=exp.input_ids.to(engine.device),
                              attention_mask=exp.attention_mask.to(engine.device),
                              position_ids=exp.position_ids.to(engine.device)).logits.cpu()
    forward = response_logprobs(logits[:, exp.prompt_len - 1:-1], exp.response_ids, temperature)
    mask = exp.response_mask.bool()
    assert torch.allclose(forward[mask], exp.rollout_logprobs[mask], atol=1e-5)
    assert exp.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_update_weights_changes_greedy_output_and_rejects_unknown_names(engine, prompts):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = [s.response for s in engine.generate(prompts, 1, greedy, seed=0)]
    original = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    try:
        head = "lm_head.weight"
        zeroed = torch.zeros_like(original[head])   # all logits 0: greedy takes the first id every time
        assert engine.update_weights([(head, zeroed)]) == 1
        after = [s.response for s in engine.generate(prompts, 1, greedy, seed=0)]
        assert after != before and after == [[0] * 6] * 3
        with pytest.raises(KeyError, match="no parameter 'nope'"):
            engine.update_weights([("nope", zeroed)])
    finally:
        engine.update_weights(original.items())


def test_buckets_respect_the_size_bound_and_order():
    pairs = [(f"p{i}", torch.zeros(256)) for i in range(10)]        # 1 KiB each
    groups = list(size_bounded_buckets(pairs, bucket_bytes=3 * 1024))  # 3 KiB buckets
    assert [len(g) for g in groups] == [3, 3, 3, 1]
    assert [n for g in groups for n, _ in g] == [n for n, _ in pairs]


class _BucketActor:
    def __init__(self, pairs):
        self.pairs = pairs

    def weight_buckets(self, bucket_bytes):
        return size_bounded_buckets(self.pairs, bucket_bytes)


class _RecordingEngine:
    def __init__(self):
        self.received = []

    def update_weights(self, bucket):
        self.received.append([name for name, _ in bucket])
        return len(bucket)


def test_spmd_weight_sync_delivers_every_bucket_in_order():
    pairs = [(f"p{i}", torch.zeros(256)) for i in range(10)]        # 1 KiB each
    engine = _RecordingEngine()
    actor = SpmdGroup("actor", _BucketActor, worker_args=(pairs,))
    rollout = SpmdGroup("rollout", lambda: engine)
    assert actor.sync_weights(rollout, bucket_mb=3 / 1024) == 10
    assert engine.received == [
        ["p0", "p1", "p2"], ["p3", "p4", "p5"], ["p6", "p7", "p8"], ["p9"]]
