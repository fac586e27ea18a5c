"""The one way a run loads its tokenizer: ``tokenizer_path`` honoured, a pad token guaranteed, and the
start-up check that a run asking for a chat template (``data.apply_chat_template``) has one.

Many released tokenizers (Llama's among them) have no pad token, while every batch here is padded
(prompts on the left, responses on the right). Padded positions are always masked out, so any token
will do as pad: we take the eos token, else the unk token, as most peers do, and say so once per
tokenizer in the log.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from rlhf_ds.models.tiny import resolve_model_path

logger = logging.getLogger(__name__)
_PAD_FALLBACKS = ("eos_token", "unk_token")
_announced: set[str] = set()   # tokenizers whose pad fallback was already logged by this process


def ensure_pad_token(tokenizer: Any, source: str) -> Any:
    """``tokenizer`` (changed in place) with a pad token: its own, else its eos, else its unk token.

    source: where it was loaded from, for the log line and the error. A tokenizer with none of the
    three is refused.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer
    for name in _PAD_FALLBACKS:
        token = getattr(tokenizer, name)
        if token is not None:
            tokenizer.pad_token = token
            if source not in _announced:
                _announced.add(source)
                logger.warning("tokenizer %s has no pad token: padding with its %s %r (padding is masked out)",
                               source, name.removesuffix("_token"), token)
            return tokenizer
    raise ValueError(f"tokenizer {source} has no pad token and no {' or '.join(_PAD_FALLBACKS)} to pad with; "
                     f"add a pad token to it (tokenizer.add_special_tokens) or point <role>.tokenizer_path at "
                     f"a tokenizer that has one")


def load_tokenizer(model_path: str, tokenizer_path: str = "") -> Any:
    """The tokenizer at ``tokenizer_path``, or the one saved with ``model_path`` when it is '' (a
    ``tiny:`` name is built first), with a pad token (:func:`ensure_pad_token`)."""
    source = resolve_model_path(tokenizer_path or model_path)
    return ensure_pad_token(AutoTokenizer.from_pretrained(source), source)


def stop_token_ids(tokenizer: Any, generation_eos: Any = None) -> tuple[int, ...]:
    """The ids a response may stop on: the tokenizer's eos, then every eos id of the model's generation
    config (``generation_eos``: an id, a list of ids, or None). vLLM stops on all of them: Qwen's instruct
    models end a turn with ``<|im_end|>`` while their tokenizer's eos may be ``<|endoftext|>``."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [int(i) for i in (generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
            if i is not None]
    if not ids:
        raise ValueError(f"tokenizer {tokenizer.name_or_path} has no eos token and the model's generation config "
                         f"names none: a response could never be seen to finish")
    return tuple(dict.fromkeys(ids))


def model_stop_token_ids(model_path: str, tokenizer: Any) -> tuple[int, ...]:
    """:func:`stop_token_ids` with the eos ids of the model at ``model_path`` (its generation_config.json,
    else its config.json), read without loading weights."""

    path = resolve_model_path(model_path)
    if os.path.exists(os.path.join(path, "generation_config.json")):
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    else:
        eos = getattr(AutoConfig.from_pretrained(path), "eos_token_id", None)
    return stop_token_ids(tokenizer, eos)


def check_chat_template(tokenizer: Any, apply_chat_template: bool, role: str) -> None:
    """Refuse ``data.apply_chat_template=true`` with a tokenizer that has no chat template, at start-up.

    role: the config section the tokenizer came from ("actor", "reward"), named in the error with what to do.
    """
    if apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"data.apply_chat_template=true, but the tokenizer {tokenizer.name_or_path} ({role}.tokenizer_path, or "
            f"the one saved with {role}.model_path) has no chat template: set data.apply_chat_template=false to "
            f"encode prompts as plain text (a base model), or set {role}.tokenizer_path to a tokenizer saved with "
            f"a chat_template (an instruct model's)")
