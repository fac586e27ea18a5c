"""The static-cache decoder draws what HF ``generate`` draws: same tokens, same log-probs, same seed.

Each case runs the HF engine twice over one model, once with ``rollout.hf_decoder=static`` and once with
``generate``, on prompts of different lengths (left padding), and compares token for token.
"""
import types

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from rlhf_ds.rollout.base import SamplingParams
from rlhf_ds.rollout.hf_engine import HFRolloutEngine
from rlhf_ds.rollout.static_decode import unsupported, warp

PAD, EOS = 0, 2
PROMPTS = [[1, 5, 9, 7], [1, 4], [1, 8, 8, 3, 6, 10, 4], [1, 11, 3]]


def llama(vocab: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)).float()


def qwen2(vocab: int = 16) -> torch.nn.Module:
    """Grouped-query attention (4 query heads, 2 key / value heads) and Q / K / V biases."""
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)).float()
    with torch.no_grad():   # the built biases are zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def engines(model):
    tokenizer = types.SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    return (HFRolloutEngine.from_model(model, tokenizer, decoder="static"),
            HFRolloutEngine.from_model(model, tokenizer, decoder="generate"))


def both(model, n: int, sampling: SamplingParams, seed: int = 3, prompts=PROMPTS):
    static, reference = engines(model)
    assert static.decoder is not None and reference.decoder is None
    return static.generate(prompts, n, sampling, seed), reference.generate(prompts, n, sampling, seed)


def assert_same(ours, theirs):
    assert [(s.prompt_index, s.response) for s in ours] == [(s.prompt_index, s.response) for s in theirs]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


SAMPLINGS = [
    SamplingParams(temperature=0.0, max_new_tokens=12),                                # greedy, eos stops rows
    SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True),               # the bench's workload
    SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=12),            # every warper
]


@pytest.mark.parametrize("build", [llama, qwen2], ids=["llama", "qwen2-gqa-bias"])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sample-ignore-eos", "sample-warped"])
def test_static_decoder_draws_what_generate_draws(build, sampling):
    ours, theirs = both(build(), 3, sampling)
    assert len(ours) == 3 * len(PROMPTS)
    assert_same(ours, theirs)
    if sampling.temperature > 0:   # the samples of one prompt differ: the draws are not shared by rows
        assert len({tuple(s.response) for s in ours if s.prompt_index == 0}) > 1


def test_rows_stop_at_eos_and_the_loop_ends_when_all_have_stopped():
    """A 4-token vocabulary makes eos likely: rows end at different steps, well before the limit."""
    sampling = SamplingParams(temperature=1.0, max_new_tokens=40)
    ours, theirs = both(llama(vocab=4), 4, sampling, prompts=[[1, 3], [1, 3, 3, 1, 3]])
    assert_same(ours, theirs)
    lengths = {len(s.response) for s in ours}
    assert all(s.response[-1] == EOS for s in ours) and len(lengths) > 1 and max(lengths) < 40


def test_rows_stop_at_every_eos_id_of_the_generation_config():
    """Instruct models list several eos ids in their generation config (Qwen: <|endoftext|>, <|im_end|>); vLLM
    stops on each, and so do both HF decoders (the tokenizer's eos alone would run past <|im_end|>)."""
    model = llama(vocab=4)
    model.generation_config.eos_token_id = [EOS, 3]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=40)
    ours, theirs = both(model, 4, sampling, prompts=[[1, 3], [1, 3, 3, 1, 3]])
    assert_same(ours, theirs)
    assert {s.response[-1] for s in ours} == {EOS, 3}
    assert all(EOS not in s.response[:-1] and 3 not in s.response[:-1] for s in ours)


def test_the_decoder_follows_weights_changed_in_place():
    """A weight update (``copy_`` into the parameters) is what the next call generates with."""
    model = llama()
    static, reference = engines(model)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    before = static.generate(PROMPTS, 1, greedy, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    after = static.generate(PROMPTS, 1, greedy, seed=0)
    assert [s.response for s in after] != [s.response for s in before]
    assert_same(after, reference.generate(PROMPTS, 1, greedy, seed=0))


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.7, top_k=3), SamplingParams(top_p=0.6),
                                      SamplingParams(temperature=1.3, top_p=0.8, top_k=5)])
def test_warp_applies_generates_warpers_in_their_order(sampling):
    torch.manual_seed(0)
    scores = torch.randn(6, 20)
    expected = scores.clone()
    for warper in [TemperatureLogitsWarper(sampling.temperature) if sampling.temperature != 1.0 else None,
                   TopKLogitsWarper(sampling.top_k) if sampling.top_k > 0 else None,
                   TopPLogitsWarper(sampling.top_p) if sampling.top_p < 1.0 else None]:
        if warper is not None:
            expected = warper(None, expected)
    torch.testing.assert_close(warp(scores, sampling), expected, atol=0, rtol=0)
    kept = torch.isfinite(warp(scores, sampling)).sum(-1)
    assert bool((kept >= 1).all()) and bool((kept < 20).all())


def test_what_the_decoder_does_not_cover_falls_back_to_generate():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                      bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD))
    assert "model_type 'gpt2'" in unsupported(gpt2)
    penalised = llama()
    penalised.generation_config.repetition_penalty = 1.2
    assert "repetition_penalty=1.2" in unsupported(penalised)
    assert unsupported(llama()) is None and unsupported(qwen2()) is None
    tokenizer = types.SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    for model, reason in [(gpt2, "model_type"), (penalised, "repetition_penalty"), (llama(), "hf_decoder=generate")]:
        engine = HFRolloutEngine.from_model(model, tokenizer,
                                            decoder="generate" if reason == "hf_decoder=generate" else "static")
        assert engine.decoder is None and reason in engine.fallback
        samples = engine.generate(PROMPTS, 2, SamplingParams(temperature=1.0, max_new_tokens=6), seed=0)
        assert len(samples) == 2 * len(PROMPTS)


@pytest.mark.parametrize("build", [llama, qwen2], ids=["llama", "qwen2-gqa-bias"])
def test_bf16_models_draw_the_same_tokens(build):
    """The engines generate in bf16 on GPU: the decoder's cache and products keep the model's dtype."""
    ours, theirs = both(build().to(torch.bfloat16), 3, SamplingParams(temperature=1.0, max_new_tokens=12))
    assert_same(ours, theirs)
