"""HF rollout engine: seeded sampling, rollout log-probs equal to a teacher-forced forward, eos trimming,
ignore_eos, experience assembly, weight loading, and the weight-sync buckets (size bound, order, SPMD
delivery)."""
import pytest
import torch
from transformers import AutoTokenizer

from rlhf_ds.models.tiny import resolve_model_path
from rlhf_ds.rollout.base import SamplingParams, build_experience
from rlhf_ds.rollout.hf_engine import (HFRolloutEngine, SampledTokenLogprobs, response_logprobs,
                                       trim_at_eos)
from rlhf_ds.cluster.spmd_group import SpmdGroup
from rlhf_ds.engine.gather import size_bounded_buckets
from rlhf_ds.rollout.weights import WeightMismatch, manifest_of

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
    assert trim_at_eos([5, 6, 2, 0, 0], stop_ids=(2,)) == [5, 6, 2]
    assert trim_at_eos([5, 6, 7], stop_ids=(2,)) == [5, 6, 7]
    assert trim_at_eos([5, 9, 6, 2], stop_ids=(2, 9)) == [5, 9]   # the first of any stop id


def test_response_logprobs_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])          # [1, 2, 2]
    tokens = torch.tensor([[1, 0]])
    expected = [torch.log(torch.tensor(0.5)).item(),
                (1.0 - torch.logsumexp(torch.tensor([1.0, 0.0]), 0)).item()]  # temperature 2: logits / 2
    assert response_logprobs(logits, tokens, 2.0)[0].tolist() == pytest.approx(expected)


def test_sampled_token_logprobs_gathers_each_token_from_its_own_step():
    recorder = SampledTokenLogprobs(temperature=2.0)
    step_logits = [torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])]   # [B=1, V=2] per step
    prompt = torch.tensor([[7]])
    for step, tokens in enumerate([prompt, torch.tensor([[7, 1]])]):   # token 1 drawn at step 0
        assert recorder(tokens, step_logits[step]) is step_logits[step]  # logits go on untouched
    logprobs = recorder.logprobs_BT(torch.tensor([[1, 0]]))              # token 0 drawn at step 1
    expected = response_logprobs(torch.stack(step_logits, dim=1), torch.tensor([[1, 0]]), 2.0)
    assert torch.allclose(logprobs, expected)
    assert logprobs[0].tolist() == pytest.approx([torch.log(torch.tensor(0.5)).item(),
                                                  (1.0 - torch.logsumexp(torch.tensor([1.0, 0.0]), 0)).item()])


def test_same_seed_same_samples_other_seed_differs(engine, prompts):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    a = [s.response for s in engine.generate(prompts, 4, sampling, seed=3)]
    b = [s.response for s in engine.generate(prompts, 4, sampling, seed=3)]
    c = [s.response for s in engine.generate(prompts, 4, sampling, seed=4)]
    assert a == b and a != c
    assert len(a) == 12


def test_generation_runs_torchs_own_linear_when_a_zero3_model_replaced_it(engine, prompts, monkeypatch):
    """A ZeRO-3 model in the same process (an engine inside the actor's process) leaves F.linear replaced by
    DeepSpeed's autograd wrapper, process-wide; the engine decodes with torch's kernel, same samples, and
    puts the replacement back."""
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    plain = [s.response for s in engine.generate(prompts, 2, sampling, seed=5)]
    calls = []

    def wrapper(x, weight, bias=None):
        calls.append(1)
        return torch._C._nn.linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", wrapper)
    assert [s.response for s in engine.generate(prompts, 2, sampling, seed=5)] == plain
    assert not calls and torch.nn.functional.linear is wrapper
    engine.model(torch.tensor([prompts[0]]))   # outside generation the replacement is what runs
    assert calls


def _teacher_forced_logprobs(engine, exp, temperature):
    """[B, R] log-probs of exp's responses from one forward over prompt + response."""
    with torch.no_grad():
        logits = engine.model(input_ids=exp.input_ids.to(engine.device),
                              attention_mask=exp.attention_mask.to(engine.device),
                              position_ids=exp.position_ids.to(engine.device)).logits.cpu()
    return response_logprobs(logits[:, exp.prompt_len - 1:-1], exp.response_ids, temperature)


def test_rollout_logprobs_match_a_teacher_forced_forward(engine, prompts):
    temperature = 0.7
    samples = engine.generate(prompts, 3, SamplingParams(temperature=temperature, max_new_tokens=8), seed=0)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]   # prompt-major
    exp = build_experience(prompts, samples, engine.pad_id, max_prompt_len=16, max_response_len=8)
    forward = _teacher_forced_logprobs(engine, exp, temperature)
    mask = exp.response_mask.bool()
    assert torch.allclose(forward[mask], exp.rollout_logprobs[mask], atol=1e-5)
    assert exp.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_ignore_eos_generates_past_eos_with_untouched_logprobs(engine, prompts):
    temperature, length = 0.7, 12
    sampling = SamplingParams(temperature=temperature, top_k=8, max_new_tokens=length, ignore_eos=True)
    samples = engine.generate(prompts, 4, sampling, seed=0)
    assert all(len(s.response) == length == len(s.logprobs) for s in samples)
    # some response must go on past an eos (llama-micro emits eos often), with sampled tokens: generate
    # fills a stopped row with pad, whose log-probs would still match the forward below
    eos = engine.stop_ids[0]
    tails = [s.response[s.response.index(eos) + 1:] for s in samples if eos in s.response[:-1]]
    assert any(token != engine.pad_id for tail in tails for token in tail)
    exp = build_experience(prompts, samples, engine.pad_id, max_prompt_len=16, max_response_len=length)
    forward = _teacher_forced_logprobs(engine, exp, temperature)   # untruncated: top_k does not apply
    assert torch.allclose(forward, exp.rollout_logprobs, atol=1e-5)


def _update(engine, named, version="v"):
    named = list(named)
    engine.start_weight_update(manifest_of(named), version)
    engine.update_weights(named)
    return engine.finish_weight_update()


def test_update_changes_greedy_output_and_bad_updates_change_nothing(engine, prompts):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = [s.response for s in engine.generate(prompts, 1, greedy, seed=0)]
    original = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]
    head = "lm_head.weight"
    zeroed = [(n, torch.zeros_like(t) if n == head else t) for n, t in original]  # all logits 0: greedy takes id 0
    try:
        renamed = [("nope" if n == head else n, t) for n, t in zeroed]
        with pytest.raises(WeightMismatch, match=r"missing \[lm_head.weight\].*not in the engine's model \[nope\]"):
            engine.start_weight_update(manifest_of(renamed), "bad")
        engine.start_weight_update(manifest_of(zeroed), "bad")
        with pytest.raises(WeightMismatch, match="announced as"):
            engine.update_weights([(n, t.double()) for n, t in zeroed])   # not what the manifest said
        engine.start_weight_update(manifest_of(zeroed), "half")
        engine.update_weights(zeroed[:-1])                                 # the transfer stopped half-way
        with pytest.raises(WeightMismatch, match=f"{len(zeroed) - 1} of {len(zeroed)} announced"):
            engine.finish_weight_update()
        assert [s.response for s in engine.generate(prompts, 1, greedy, seed=0)] == before
        assert engine.weight_version() == "default"
        assert _update(engine, zeroed, "step-1") == "step-1"
        after = [s.response for s in engine.generate(prompts, 1, greedy, seed=0)]
        assert after != before and after == [[0] * 6] * 3
    finally:
        _update(engine, original)


def test_greedy_with_several_samples_repeats_the_prompt(engine, prompts):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    one = [s.response for s in engine.generate(prompts, 1, greedy, seed=0)]
    three = engine.generate(prompts, 3, greedy, seed=0)
    assert [s.prompt_index for s in three] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [s.response for s in three] == [r for r in one for _ in range(3)]


def test_buckets_respect_the_size_bound_and_order():
    pairs = [(f"p{i}", torch.zeros(256)) for i in range(10)]        # 1 KiB each
    groups = list(size_bounded_buckets(pairs, bucket_bytes=3 * 1024))  # 3 KiB buckets
    assert [len(g) for g in groups] == [3, 3, 3, 1]
    assert [n for g in groups for n, _ in g] == [n for n, _ in pairs]


class _BucketActor:
    def __init__(self, pairs):
        self.pairs = pairs

    def weight_manifest(self):
        return manifest_of(self.pairs)

    def weight_buckets(self, bucket_bytes):
        return size_bounded_buckets(self.pairs, bucket_bytes)


class _RecordingEngine:
    def __init__(self):
        self.received, self.calls = [], []

    def start_weight_update(self, manifest, version):
        self.calls.append(("start", len(manifest), version))

    def update_weights(self, bucket):
        self.received.append([name for name, _ in bucket])
        return len(bucket)

    def finish_weight_update(self):
        self.calls.append(("finish",))


def test_spmd_weight_sync_delivers_every_bucket_in_order():
    pairs = [(f"p{i}", torch.zeros(256)) for i in range(10)]        # 1 KiB each
    engine = _RecordingEngine()
    actor = SpmdGroup("actor", _BucketActor, worker_args=(pairs,))
    rollout = SpmdGroup("rollout", lambda: engine)
    assert actor.sync_weights(rollout, bucket_mb=3 / 1024, version="step-4") == 10
    assert engine.received == [
        ["p0", "p1", "p2"], ["p3", "p4", "p5"], ["p6", "p7", "p8"], ["p9"]]
    assert engine.calls == [("start", 10, "step-4"), ("finish",)]   # manifest first, live at the end
