"""Tiny models built locally: their tokenizers and small Llama / Qwen2 causal LMs.

Nothing here touches a model hub. A model is named ``tiny:<preset>`` (causal LM) or
``tiny:<preset>-value`` (the same backbone with a scalar head, initialised from the LM so that the
critic and the reward model start from the actor's weights). :func:`resolve_model_path` builds the
directory on first use (deterministically from a seed) and returns it from the on-disk cache afterwards.

A preset's tokenizer is one of two kinds (``TinyPreset.tokenizer``):

- ``"char"`` (the arithmetic presets): plain text, no chat template. ``tokenizer(prompt)`` yields
  ``[<bos>] + one id per character``; a response is the characters the model generates, ended by
  ``<eos>``. The SFT text of an example is therefore ``prompt + answer + "<eos>"`` (the ``<eos>`` string
  is matched as a special token).
- ``"bpe"`` (``qwen2-bpe``): shaped like an instruct model's, to exercise the real-model path on CPU. A
  byte-level BPE trained here on the word-problem corpus (``rlhf_ds.data.word_problems``), split as
  Qwen2 splits (digits one by one); Qwen's special tokens ``<|endoftext|> <|im_start|> <|im_end|>``
  (the last ids); eos ``<|im_end|>``; no bos (``tokenizer(text)`` adds nothing) and no pad token (runs
  pad with eos: ``models.tokenizer.ensure_pad_token``); a ChatML chat template
  (``data.apply_chat_template``).

Both tokenizers pad on the left (prompts are left-padded before generation); set
``tokenizer.padding_side = "right"`` for a call that needs right padding.

Head sizes are kept at 32 or more because vLLM's CPU attention backend refuses smaller ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2Tokenizer

from rlhf_ds.data.word_problems import WORD_PROBLEMS
from rlhf_ds.fs import publish_directory
from rlhf_ds.models.value_model import make_value_model_from_lm

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0..3, in this order
# Digits and the symbols of the synthetic tasks, plus a few that hand-written prompts commonly use.
DEFAULT_ALPHABET = "0123456789+-*/=()., ?"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
BPE_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # the last ids, in this order, as in Qwen's vocabulary
BPE_VOCAB_SIZE = 512   # an upper bound: training stops earlier once every word of the corpus is one token
# Qwen2's pre-tokenizer split: a letter run with one leading non-letter, single digits, punctuation runs,
# newlines, other whitespace.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# ChatML, as Qwen's instruct models use it (without Qwen's default system message).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
TOKENIZER_KINDS = ("char", "bpe")
TINY_PREFIX = "tiny:"
VALUE_SUFFIX = "-value"
MARKER_FILE = ".rlhf_ds_build_complete"
# Bump when the build recipe changes, so that cached directories built by an older recipe are not reused.
BUILD_VERSION = 1


@dataclass(frozen=True)
class TinyPreset:
    """Architecture of a tiny causal LM and the kind of its tokenizer (the vocabulary comes from it)."""

    family: str  # "llama" | "qwen2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 128
    alphabet: str = DEFAULT_ALPHABET  # the characters of a "char" tokenizer
    tokenizer: str = "char"           # "char" | "bpe" (see the module docstring)


PRESETS: dict[str, TinyPreset] = {
    # ~135 K parameters: the size whose SFT / GRPO behaviour was measured on 2 cores
    # (docs/benchmarks.md#how-the-demo-task-was-chosen).
    "llama-arith": TinyPreset("llama", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                              intermediate_size=256),
    # ~1.1 M parameters.
    "llama-1m": TinyPreset("llama", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
                           intermediate_size=512),
    # ~6.3 M parameters: the "small" model of the benchmark (head_dim 32, a size vLLM's CPU kernels take).
    "llama-small": TinyPreset("llama", hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=8,
                              intermediate_size=1024),
    # Qwen2 family (biased q/k/v) with grouped-query attention, to exercise a second architecture.
    "qwen2-arith": TinyPreset("qwen2", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                              intermediate_size=256),
    # ~12 K parameters: for tests of the machinery, not of learning.
    "llama-micro": TinyPreset("llama", hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                              intermediate_size=64, max_position_embeddings=64),
    # ~174 K parameters, 397 tokens: an instruct model's shape (byte-level BPE, chat template, no pad token)
    # for the GSM8K-shaped word problems.
    "qwen2-bpe": TinyPreset("qwen2", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                            intermediate_size=256, max_position_embeddings=256, tokenizer="bpe"),
}

_CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def get_preset(name: str) -> TinyPreset:
    """The preset called ``name``; the error lists every valid name."""
    if name not in PRESETS:
        raise ValueError(f"unknown tiny model preset {name!r}; valid presets: {sorted(PRESETS)}")
    return PRESETS[name]


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET, model_max_length: int = 128
                         ) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ids 0..3 are ``<pad> <bos> <eos> <unk>``, then one id per character.

    Encoding prepends ``<bos>``; characters outside the alphabet map to ``<unk>``; decoding joins the
    characters without separators. Pads on the left.
    """
    chars = list(dict.fromkeys(alphabet))  # keep order, drop repeats
    if len(chars) != len(alphabet) or not chars:
        raise ValueError(f"alphabet must be non-empty characters without repeats, got {alphabet!r}")
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    bos_id = vocab[BOS_TOKEN]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)])
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN, padding_side="left", model_max_length=model_max_length)


def build_bpe_tokenizer(corpus: list[str], vocab_size: int = BPE_VOCAB_SIZE, model_max_length: int = 256
                        ) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus``: a ``Qwen2Tokenizer`` (what ``AutoTokenizer`` makes of
    any qwen2 directory) with Qwen's special tokens as its last ids, eos ``<|im_end|>`` and a ChatML template.

    Every byte is in the initial alphabet, so any text encodes without unknown tokens. No bos, no unk and
    no pad: saved as explicit nulls, since ``Qwen2Tokenizer`` would otherwise default them to
    ``<|endoftext|>``. The same corpus gives the same tokenizer: builds in separate processes (other hash
    seeds), with or without the trainer's threads, write byte-identical ``tokenizer.json``. Pads on the left.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BPE_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    trained = json.loads(backend.to_str())["model"]
    vocab = trained["vocab"]
    for token in BPE_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    # Qwen2Tokenizer rebuilds the same pipeline (Qwen2's split, byte-level) around the vocabulary and merges.
    # Its annotations say merges are strings and unk / pad are str; it passes merge pairs and None on to BPE.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, eos_token=IM_END, bos_token=None,
        merges=[tuple(pair) for pair in trained["merges"]],  # pyright: ignore[reportArgumentType]
        unk_token=None, pad_token=None,  # pyright: ignore[reportArgumentType]
        extra_special_tokens=[ENDOFTEXT, IM_START], padding_side="left",
        model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tokenizer(preset: TinyPreset) -> PreTrainedTokenizerFast:
    """The tokenizer of ``preset``, by its kind."""
    if preset.tokenizer == "char":
        return build_char_tokenizer(preset.alphabet, preset.max_position_embeddings)
    if preset.tokenizer == "bpe":
        return build_bpe_tokenizer(_bpe_corpus(), model_max_length=preset.max_position_embeddings)
    raise ValueError(f"unknown tokenizer kind {preset.tokenizer!r}; valid: {list(TOKENIZER_KINDS)}")


def _bpe_corpus() -> list[str]:
    """What the "bpe" tokenizer is trained on: the word problems, and the words of the chat template."""
    return WORD_PROBLEMS.tokenizer_corpus() + ["system", "user", "assistant", DEFAULT_ALPHABET]


def tiny_model_config(preset: TinyPreset, tokenizer: PreTrainedTokenizerFast):
    """The transformers config (LlamaConfig / Qwen2Config) of ``preset`` with ``tokenizer``'s ids."""
    if preset.family not in _CONFIG_CLASSES:
        raise ValueError(f"unknown model family {preset.family!r}; valid: {sorted(_CONFIG_CLASSES)}")
    return _CONFIG_CLASSES[preset.family](
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def create_tiny_lm(preset: str, seed: int = 0):
    """(model, tokenizer) of ``preset`` in memory, weights drawn from ``seed``.

    The caller's global torch RNG state is left untouched.
    """
    spec = get_preset(preset)
    tokenizer = build_tokenizer(spec)
    config = tiny_model_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model, tokenizer


def build_tiny_lm(preset: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save the causal LM of ``preset`` (model + tokenizer, ``save_pretrained`` layout) to ``out_dir``."""
    model, tokenizer = create_tiny_lm(preset, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def default_cache_dir() -> Path:
    """``$RLHF_DS_CACHE``, else ``<repo>/.cache/rlhf_ds`` (ignored by git), else ``~/.cache/rlhf_ds``."""
    if os.environ.get("RLHF_DS_CACHE"):
        return Path(os.environ["RLHF_DS_CACHE"])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "setup.py").exists():
        return repo / ".cache" / "rlhf_ds"
    return Path.home() / ".cache" / "rlhf_ds"


def parse_tiny_spec(spec: str) -> tuple[str, bool]:
    """``"tiny:llama-arith-value"`` -> ``("llama-arith", True)``; validates the preset name."""
    if not spec.startswith(TINY_PREFIX):
        raise ValueError(f"not a tiny model name: {spec!r} "
                         f"(expected '{TINY_PREFIX}<preset>[{VALUE_SUFFIX}]')")
    name = spec[len(TINY_PREFIX):]
    is_value = name.endswith(VALUE_SUFFIX) and name not in PRESETS
    if is_value:
        name = name[: -len(VALUE_SUFFIX)]
    get_preset(name)
    return name, is_value


def _build_key(preset: str, seed: int) -> str:
    """A short hash of everything that determines the built weights and tokenizer: a changed preset (or
    BPE corpus) means a new dir."""
    spec = get_preset(preset)
    payload = {"preset": dataclasses.asdict(spec), "seed": seed, "version": BUILD_VERSION}
    if spec.tokenizer == "bpe":
        payload["corpus"] = hashlib.sha256("\n".join(_bpe_corpus()).encode()).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def _publish(final: Path, build, description: dict) -> Path:
    return publish_directory(final, build, MARKER_FILE, json.dumps(description, sort_keys=True))


def resolve_model_path(spec: str, cache_dir: str | os.PathLike | None = None, seed: int = 0) -> str:
    """The local directory for a model name.

    ``tiny:<preset>`` builds (once) and returns the causal-LM directory; ``tiny:<preset>-value`` the
    value-model directory initialised from that LM. Any other string (a local directory, or a hub name
    that the caller's environment already holds) is returned unchanged.
    """
    if not spec.startswith(TINY_PREFIX):
        return spec

    preset, is_value = parse_tiny_spec(spec)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _build_key(preset, seed)
    desc = {"preset": preset, "seed": seed, "key": key, "version": BUILD_VERSION}
    lm_dir = _publish(root / "tiny" / f"{preset}-seed{seed}-{key}", lambda d: build_tiny_lm(preset, d, seed),
                      {**desc, "kind": "causal_lm"})
    if not is_value:
        return str(lm_dir)
    value_dir = _publish(root / "tiny" / f"{preset}-seed{seed}-{key}{VALUE_SUFFIX}",
                         lambda d: make_value_model_from_lm(lm_dir, d), {**desc, "kind": "value"})
    return str(value_dir)
