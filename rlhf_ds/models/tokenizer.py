"""The one way a run loads its tokenizer: ``tokenizer_path`` honoured, a pad token guaranteed, and the
start-up check that a run asking for a chat template (``data.apply_chat_template``) has one.

Many released tokenizers (Llama's among them) have no pad token, while every batch here is padded
(prompts on the left, responses on the right). Padded positions are always masked out, so any token
will do as pad: we take the eos token, else the unk token, as most peers do, and say so once per
tokenizer in the log.
"""
from __future__ import annotations

import logging
from typing import Any

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
    from transformers import AutoTokenizer

    source = resolve_model_path(tokenizer_path or model_path)
    return ensure_pad_token(AutoTokenizer.from_pretrained(source), source)


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
