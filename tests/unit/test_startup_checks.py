"""Start-up checks of the models a run names, and the tokenizer every run loads.

Reward models: an HF *ForSequenceClassification checkpoint (one label) loads with its trained head; one
whose head is not in its checkpoint is refused, naming the path and the missing weights. Roles whose
vocabulary differs from the actor's are refused before any engine is built. A tokenizer without a pad
token pads with eos (else unk). Under the deepspeed launcher each role's rank count must equal the world
size. Tiny checkpoints are built here.
"""
import logging

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf_ds.cluster.roles import check_spmd_ranks
from rlhf_ds.config import load_config
from rlhf_ds.models import tokenizer as tokenizer_module
from rlhf_ds.models.files import ModelCheckError, check_reward_head, check_vocabularies, weight_shapes
from rlhf_ds.models.tiny import build_char_tokenizer
from rlhf_ds.models.tokenizer import ensure_pad_token, load_tokenizer
from rlhf_ds.models.value_model import ValueModel

VOCAB = len(build_char_tokenizer())


def tiny_config(vocab_size: int = VOCAB, **kwargs) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                       **kwargs)


def save(model, path, tokenizer=True):
    model.save_pretrained(path)
    if tokenizer:
        build_char_tokenizer().save_pretrained(path)
    return str(path)


def classifier_dir(path, num_labels: int = 1) -> tuple[str, LlamaForSequenceClassification]:
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(num_labels=num_labels))
    with torch.no_grad():
        model.score.weight.normal_()   # a trained head: not what zero or default initialisation gives
    return save(model, path), model


def drop_weights(model_dir: str, prefix: str) -> None:
    """Rewrite model.safetensors without the tensors whose names start with ``prefix``."""
    from safetensors.torch import load_file, save_file

    file = f"{model_dir}/model.safetensors"
    tensors = {k: v for k, v in load_file(file).items() if not k.startswith(prefix)}
    save_file(tensors, file, metadata={"format": "pt"})


# ----------------------------------------------------------------------------- reward-model heads

def test_sequence_classification_checkpoint_loads_with_its_trained_head(tmp_path):
    path, hf_model = classifier_dir(tmp_path / "rm")
    check_reward_head(path, "reward.model_path")
    model = ValueModel.from_pretrained(path).eval()
    assert torch.equal(model.value_head.weight, hf_model.score.weight)
    assert model.value_head.bias.item() == 0.0   # HF's head has no bias
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(ids)[:, -1], hf_model.eval()(ids).logits[:, 0], atol=1e-6)


def test_value_model_saves_under_the_names_it_was_loaded_from(tmp_path):
    path, _ = classifier_dir(tmp_path / "rm")
    ValueModel.from_pretrained(path).save_pretrained(tmp_path / "again")
    ValueModel.from_pretrained(str(tmp_path / "again")).save_pretrained(tmp_path / "value")
    ValueModel(tiny_config()).save_pretrained(tmp_path / "ours")
    ValueModel.from_pretrained(str(tmp_path / "ours")).save_pretrained(tmp_path / "ours_again")
    assert "score.weight" in weight_shapes(str(tmp_path / "again"))
    assert {"value_head.weight", "value_head.bias"} <= set(weight_shapes(str(tmp_path / "ours_again")))
    assert not any(k.startswith("score.") for k in weight_shapes(str(tmp_path / "ours_again")))


def test_classifier_without_its_head_is_refused_naming_path_and_weight(tmp_path):
    path, _ = classifier_dir(tmp_path / "rm")
    drop_weights(path, "score.")
    with pytest.raises(ModelCheckError) as err:
        check_reward_head(path, "reward.model_path")
    assert f"reward.model_path={path}" in str(err.value) and "missing score.weight" in str(err.value)


def test_value_model_without_its_head_is_refused(tmp_path):
    path = save(ValueModel(tiny_config()), tmp_path / "vm")
    check_reward_head(path, "reward.model_path")
    drop_weights(path, "value_head.")
    with pytest.raises(ModelCheckError, match="missing value_head.weight, value_head.bias"):
        check_reward_head(path, "reward.model_path")


def test_causal_lm_and_multi_label_classifier_are_refused_as_reward_models(tmp_path):
    path = save(LlamaForCausalLM(tiny_config()), tmp_path / "lm")
    with pytest.raises(ModelCheckError, match="not a causal LM"):
        check_reward_head(path, "reward.model_path")
    path, _ = classifier_dir(tmp_path / "two", num_labels=2)
    with pytest.raises(ModelCheckError, match=r"shape \[2, 32\], i.e. 2 labels.*num_labels=1"):
        check_reward_head(path, "reward.model_path")


def test_sharded_checkpoint_names_come_from_the_shard_headers(tmp_path):
    model = ValueModel(tiny_config())
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert set(weight_shapes(str(tmp_path / "sharded"))) == set(model.state_dict())
    with pytest.raises(ModelCheckError, match="no checkpoint found"):
        weight_shapes(str(tmp_path))


def test_header_reader_matches_safetensors(tmp_path):
    from safetensors import safe_open

    path, _ = classifier_dir(tmp_path / "rm")
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert weight_shapes(path) == expected and expected["score.weight"] == (1, 32)


# ----------------------------------------------------------------------------- vocabularies

def config_only_dir(path, vocab_size: int, tokenizer_json: str = "") -> str:
    tiny_config(vocab_size).save_pretrained(path)
    if tokenizer_json:
        (path / "tokenizer.json").write_text(tokenizer_json)
    return str(path)


def test_roles_with_another_vocabulary_are_refused_naming_both(tmp_path):
    actor = config_only_dir(tmp_path / "actor", 100)
    same = config_only_dir(tmp_path / "ref", 100)
    other = config_only_dir(tmp_path / "rm", 120)
    check_vocabularies({"actor.model_path": actor, "reference.model_path": same})
    with pytest.raises(ModelCheckError) as err:
        check_vocabularies({"actor.model_path": actor, "reference.model_path": same, "reward.model_path": other})
    message = str(err.value)
    assert f"actor.model_path={actor} has vocab_size 100" in message
    assert f"reward.model_path={other} has vocab_size 120" in message and "reference" not in message


def test_one_tokenizer_with_differently_padded_embeddings_is_accepted(tmp_path):
    actor = config_only_dir(tmp_path / "small", 100, tokenizer_json='{"model": "same"}')
    reward = config_only_dir(tmp_path / "large", 128, tokenizer_json='{"model": "same"}')
    check_vocabularies({"actor.model_path": actor, "reward.model_path": reward})
    (tmp_path / "large" / "tokenizer.json").write_text('{"model": "other"}')
    with pytest.raises(ModelCheckError, match="vocab_size 128"):
        check_vocabularies({"actor.model_path": actor, "reward.model_path": reward})


def test_run_refuses_bad_models_before_any_engine_is_built(tmp_path, monkeypatch):
    from rlhf_ds.trainer import run
    from rlhf_ds.trainer.run import build_trainer

    def no_engines(*_):
        raise AssertionError("an engine was built before the model checks")

    monkeypatch.setattr(run, "build_roles", no_engines)
    causal = save(LlamaForCausalLM(tiny_config()), tmp_path / "lm")
    cfg = load_config("grpo_tiny", ["reward.use_model=true", f"reward.model_path={causal}"])
    with pytest.raises(ModelCheckError, match=f"reward.model_path={causal}: the reward model's scoring head"):
        build_trainer(cfg, show_progress=False)
    wide = save(ValueModel(tiny_config(VOCAB + 7)), tmp_path / "wide", tokenizer=False)
    cfg = load_config("grpo_tiny", ["reward.use_model=true", f"reward.model_path={wide}"])
    with pytest.raises(ModelCheckError, match=f"reward.model_path={wide} has vocab_size {VOCAB + 7}"):
        build_trainer(cfg, show_progress=False)
    # a tokenizer with more ids than the actor's embedding has rows
    big = build_char_tokenizer("0123456789+-*/=()., ?abc")
    big.save_pretrained(tmp_path / "big_tok")
    cfg = load_config("grpo_tiny", [f"actor.tokenizer_path={tmp_path / 'big_tok'}"])
    with pytest.raises(ModelCheckError, match=f"has {VOCAB + 3} tokens, more than the {VOCAB} rows"):
        build_trainer(cfg, show_progress=False)


# ----------------------------------------------------------------------------- tokenizers

def tokenizer_dir(path, **special) -> str:
    tok = build_char_tokenizer()
    for name, value in special.items():
        setattr(tok, name, value)
    tok.save_pretrained(path)
    return str(path)


def test_missing_pad_token_falls_back_to_eos_said_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_announced", set())
    path = tokenizer_dir(tmp_path / "tok", pad_token=None)
    assert AutoTokenizer.from_pretrained(path).pad_token_id is None
    with caplog.at_level(logging.WARNING, logger="rlhf_ds.models.tokenizer"):
        first = load_tokenizer("unused", path)
        second = load_tokenizer("unused", path)
    assert first.pad_token_id == first.eos_token_id == second.pad_token_id
    assert [r.getMessage() for r in caplog.records] == [
        f"tokenizer {path} has no pad token: padding with its eos '<eos>' (padding is masked out)"]


def test_pad_fallback_order_and_refusal(tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tmp_path / "t", pad_token=None, eos_token=None))
    assert ensure_pad_token(tok, "t").pad_token == "<unk>"
    own = build_char_tokenizer()
    assert ensure_pad_token(own, "own").pad_token == "<pad>"   # a pad token of its own is kept
    bare = AutoTokenizer.from_pretrained(tokenizer_dir(tmp_path / "b", pad_token=None, eos_token=None,
                                                       unk_token=None))
    with pytest.raises(ValueError, match="has no pad token and no eos_token or unk_token"):
        ensure_pad_token(bare, str(tmp_path / "b"))


def test_tokenizer_path_wins_over_the_models_tokenizer(tmp_path):
    model_dir = tokenizer_dir(tmp_path / "model")
    other = build_char_tokenizer("abc")
    other.save_pretrained(tmp_path / "other")
    assert len(load_tokenizer(model_dir)) == VOCAB
    assert len(load_tokenizer(model_dir, str(tmp_path / "other"))) == len(other) != VOCAB


# ----------------------------------------------------------------------------- deepspeed launcher ranks

def test_spmd_rank_counts_must_equal_the_world_size():
    ranks = {"actor": 2, "critic": 0, "reference": 2, "reward": 0, "rollout": 1}
    check_spmd_ranks(ranks, 2)   # rollout.num_engines and unused roles are not counted
    with pytest.raises(ValueError) as err:
        check_spmd_ranks(ranks, 4)
    message = str(err.value)
    assert "actor.num_ranks=2, reference.num_ranks=2" in message and "started 4 process(es)" in message
    assert "set actor.num_ranks=4, reference.num_ranks=4, or launch 2 processes" in message
    assert "critic" not in message and "rollout" not in message
