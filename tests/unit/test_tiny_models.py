"""Char tokenizer, tiny causal LMs, the value model and the on-disk cache."""

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ds.data.tasks import TASKS, ArithmeticTask
from rlhf_ds.models import tiny
from rlhf_ds.models.tiny import (DEFAULT_ALPHABET, MARKER_FILE, PRESETS, build_char_tokenizer, build_tiny_lm,
                                 create_tiny_lm, resolve_model_path)
from rlhf_ds.models.value_model import ValueModel, make_value_model_from_lm


def is_value_model_dir(path) -> bool:
    """Whether ``path/config.json`` declares a ValueModel (what save_pretrained records)."""
    config_file = Path(path) / "config.json"
    return config_file.exists() and "ValueModel" in (json.loads(config_file.read_text()).get("architectures") or [])


PROMPTS = ["12+34=", "123*4=", "7+8="]


def _batch(tokenizer):
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return enc["input_ids"], enc["attention_mask"], position_ids


# --- tokenizer ---------------------------------------------------------------------------------------

def test_tokenizer_ids_special_tokens_and_bos():
    tok = build_char_tokenizer("0123+=")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + 6
    # "<bos>" then one id per character, in alphabet order after the 4 special tokens.
    assert tok("12+3=")["input_ids"] == [1, 5, 6, 8, 7, 9]
    assert tok("9")["input_ids"] == [1, 3]  # outside the alphabet -> <unk>


def test_tokenizer_round_trip_every_character():
    tok = build_char_tokenizer()
    text = DEFAULT_ALPHABET + DEFAULT_ALPHABET[::-1]
    ids = tok(text)["input_ids"]
    assert len(ids) == 1 + len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == "<bos>" + text


def test_eos_string_is_one_special_token():
    tok = build_char_tokenizer()
    ids = tok("1+1=2<eos>")["input_ids"]
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert tok.decode(ids[-2:], skip_special_tokens=True) == "2"


def test_left_padding():
    tok = build_char_tokenizer()
    assert tok.padding_side == "left"
    enc = tok(["1+1=", "123+45="], padding=True)
    short, long = enc["input_ids"]
    assert len(short) == len(long) == 8
    assert short[:3] == [tok.pad_token_id] * 3 and short[3] == tok.bos_token_id
    assert enc["attention_mask"][0] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert tok.decode(short, skip_special_tokens=True) == "1+1="


def test_tokenizer_save_load_keeps_everything(tmp_path):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.padding_side == "left"
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded(PROMPTS, padding=True)["input_ids"] == tok(PROMPTS, padding=True)["input_ids"]
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<bos>", "<eos>")


def test_alphabet_with_repeats_is_refused():
    with pytest.raises(ValueError, match="repeats"):
        build_char_tokenizer("0123a1")


def test_default_alphabet_covers_every_arithmetic_task():
    # (word problems need a tokenizer with words: the "bpe" preset, tested in test_chat_template.py)
    for task in TASKS.values():
        if isinstance(task, ArithmeticTask):
            assert set(task.alphabet) <= set(DEFAULT_ALPHABET), task.name


# --- causal LM -----------------------------------------------------------------------------------------

def test_presets_are_vllm_compatible_and_sized():
    for name, preset in PRESETS.items():
        assert preset.hidden_size // preset.num_heads >= 32, name  # vLLM CPU attention minimum
        assert preset.num_heads % preset.num_kv_heads == 0, name
    model, _ = create_tiny_lm("llama-arith")
    assert 120_000 < sum(p.numel() for p in model.parameters()) < 150_000  # the measured ~135 K model
    model, _ = create_tiny_lm("llama-1m")
    assert 0.9e6 < sum(p.numel() for p in model.parameters()) < 1.3e6


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        create_tiny_lm("llama-huge")
    for name in PRESETS:
        assert name in str(err.value)


@pytest.mark.parametrize("preset,family", [("llama-arith", "llama"), ("qwen2-arith", "qwen2")])
def test_save_load_gives_identical_logits(tmp_path, preset, family):
    model, tok = create_tiny_lm(preset, seed=3)
    build_tiny_lm(preset, tmp_path, seed=3)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.model_type == family
    ids, mask, pos = _batch(AutoTokenizer.from_pretrained(tmp_path))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = loaded(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert expected.shape == (3, ids.shape[1], len(tok))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_same_seed_same_weights_other_seed_differs():
    rng_before = torch.random.get_rng_state()
    a, _ = create_tiny_lm("llama-micro", seed=5)
    b, _ = create_tiny_lm("llama-micro", seed=5)
    c, _ = create_tiny_lm("llama-micro", seed=6)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sa[q_proj], sc[q_proj])


# --- value model -------------------------------------------------------------------------------------

def test_value_model_from_lm_copies_backbone_and_zero_head(tmp_path):
    build_tiny_lm("llama-arith", tmp_path / "lm", seed=1)
    make_value_model_from_lm(tmp_path / "lm", tmp_path / "vm")
    assert is_value_model_dir(tmp_path / "vm") and not is_value_model_dir(tmp_path / "lm")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    vm = ValueModel.from_pretrained(tmp_path / "vm")
    lm_backbone = lm.model.state_dict()
    for name, tensor in vm.model.state_dict().items():
        torch.testing.assert_close(tensor, lm_backbone[name], rtol=0, atol=0)
    assert torch.count_nonzero(vm.value_head.weight) == 0 and torch.count_nonzero(vm.value_head.bias) == 0
    ids, mask, pos = _batch(AutoTokenizer.from_pretrained(tmp_path / "vm"))
    values = vm(ids, mask, pos)
    assert values.shape == ids.shape and torch.count_nonzero(values) == 0


def test_value_model_loads_a_causal_lm_dir_directly(tmp_path):
    build_tiny_lm("qwen2-arith", tmp_path, seed=4)
    vm = ValueModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    lm_backbone = lm.model.state_dict()
    assert all(torch.equal(t, lm_backbone[k]) for k, t in vm.model.state_dict().items())
    assert vm.value_head.weight.dtype == torch.bfloat16
    assert torch.count_nonzero(vm.value_head.weight) == 0 and torch.count_nonzero(vm.value_head.bias) == 0


def test_value_model_save_load_identical_values_and_head_is_last_hidden_projection(tmp_path):
    build_tiny_lm("qwen2-arith", tmp_path / "lm", seed=2)
    make_value_model_from_lm(tmp_path / "lm", tmp_path / "vm")
    vm = ValueModel.from_pretrained(tmp_path / "vm")
    with torch.no_grad():
        vm.value_head.weight.normal_(generator=torch.Generator().manual_seed(0))
        vm.value_head.bias.fill_(0.25)
    vm.save_pretrained(tmp_path / "vm2")
    loaded = ValueModel.from_pretrained(tmp_path / "vm2")
    ids, mask, pos = _batch(AutoTokenizer.from_pretrained(tmp_path / "vm"))
    with torch.no_grad():
        expected = vm(ids, mask, pos)
        got = loaded(ids, mask, pos)
        # Hand route: the LM's last hidden state (before lm_head) projected by the head.
        lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
        hidden = lm(input_ids=ids, attention_mask=mask, position_ids=pos,
                    output_hidden_states=True).hidden_states[-1]
        by_hand = hidden @ vm.value_head.weight[0] + 0.25
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(expected, by_hand, rtol=1e-5, atol=1e-5)


def test_value_model_trains_its_backbone(tmp_path):
    build_tiny_lm("llama-micro", tmp_path / "lm")
    make_value_model_from_lm(tmp_path / "lm", tmp_path / "vm")
    vm = ValueModel.from_pretrained(tmp_path / "vm")
    with torch.no_grad():
        vm.value_head.weight.fill_(0.1)
    ids, mask, pos = _batch(AutoTokenizer.from_pretrained(tmp_path / "vm"))
    vm(ids, mask, pos).pow(2).sum().backward()
    assert vm.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


# --- cache ---------------------------------------------------------------------------------------------

def test_resolve_builds_once_then_hits_cache(tmp_path, monkeypatch):
    path = resolve_model_path("tiny:llama-micro", tmp_path)
    assert (tmp_path / "tiny").exists() and path.startswith(str(tmp_path))
    marker_mtime = (tmp_path / "tiny" / path.split("/")[-1] / MARKER_FILE).stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cache hit must not rebuild")

    monkeypatch.setattr(tiny, "build_tiny_lm", no_rebuild)
    start = time.perf_counter()
    assert resolve_model_path("tiny:llama-micro", tmp_path) == path
    assert time.perf_counter() - start < 0.05
    assert (tmp_path / "tiny" / path.split("/")[-1] / MARKER_FILE).stat().st_mtime_ns == marker_mtime
    # Another seed is another model.
    monkeypatch.undo()
    assert resolve_model_path("tiny:llama-micro", tmp_path, seed=1) != path


def test_interrupted_build_is_rebuilt(tmp_path):
    path = resolve_model_path("tiny:llama-micro", tmp_path)
    (tmp_path / "tiny" / path.split("/")[-1] / MARKER_FILE).unlink()
    (tmp_path / "tiny" / path.split("/")[-1] / "model.safetensors").write_bytes(b"truncated")
    assert resolve_model_path("tiny:llama-micro", tmp_path) == path
    AutoModelForCausalLM.from_pretrained(path)  # loads again: the broken copy was replaced
    leftovers = [p.name for p in (tmp_path / "tiny").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_resolve_value_spec_shares_the_lm_backbone(tmp_path):
    value_dir = resolve_model_path("tiny:llama-micro-value", tmp_path)
    lm_dir = resolve_model_path("tiny:llama-micro", tmp_path)
    assert value_dir != lm_dir and is_value_model_dir(value_dir)
    vm, lm = ValueModel.from_pretrained(value_dir), AutoModelForCausalLM.from_pretrained(lm_dir)
    torch.testing.assert_close(vm.model.embed_tokens.weight, lm.model.embed_tokens.weight, rtol=0, atol=0)


def test_resolve_passes_other_paths_through_and_default_cache_env(tmp_path, monkeypatch):
    assert resolve_model_path("/models/my-llama") == "/models/my-llama"
    with pytest.raises(ValueError, match="valid presets"):
        resolve_model_path("tiny:nope", tmp_path)
    monkeypatch.setenv("RLHF_DS_CACHE", str(tmp_path / "envcache"))
    assert resolve_model_path("tiny:llama-micro").startswith(str(tmp_path / "envcache"))


def test_build_script(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "build_tiny_models.py"
    spec = importlib.util.spec_from_file_location("build_tiny_models", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["llama-micro", "--out", str(tmp_path / "m"), "--seed", "4", "--value"])
    assert is_value_model_dir(out)
    reference, _ = create_tiny_lm("llama-micro", seed=4)
    torch.testing.assert_close(ValueModel.from_pretrained(out).model.embed_tokens.weight,
                               reference.model.embed_tokens.weight, rtol=0, atol=0)


def test_left_padded_batch_generates_like_single_prompts(tmp_path):
    build_tiny_lm("llama-arith", tmp_path, seed=0)
    model, tok = AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    batched = model.generate(**enc, max_new_tokens=6, do_sample=False)[:, enc["input_ids"].shape[1]:]
    for i, prompt in enumerate(PROMPTS):
        single = tok(prompt, return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=6, do_sample=False)[0, single["input_ids"].shape[1]:]
        assert batched[i, : len(alone)].tolist() == alone.tolist(), prompt
