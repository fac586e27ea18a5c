"""A causal-LM backbone with a scalar head: the critic (per-token values) and the reward model.

The directory layout is an ordinary ``save_pretrained`` directory whose ``config.json`` is the
backbone's own config (``model_type`` llama, qwen2, ...) with ``architectures: ["ValueModel"]``; the
weights are ``model.*`` (the backbone, same names as inside the causal LM) and ``value_head.*``.
So ``ValueModel.from_pretrained(dir)`` works for any backbone that ``AutoModel`` knows, and a causal-LM
directory is turned into a value-model directory by copying its backbone (:func:`make_value_model_from_lm`),
which is how the critic and the reward model start from the actor's weights. ``from_pretrained`` of a
causal-LM directory works too (backbone loaded, ``lm_head`` ignored, head at zero), and so does that of
an HF ``*ForSequenceClassification`` directory with one label (its ``score`` head becomes ours). A
reward model must bring its head: ``models.files.check_reward_head`` refuses one that would start at zero.

The head starts at zero: every value is 0 until the critic has trained, and the backbone keeps the
LM's features instead of being perturbed by a random head.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig,
                          PreTrainedModel)
from transformers import initialization as init

from rlhf_ds.models.files import has_classification_head


# HF *ForSequenceClassification keeps its scalar head in `score`: loaded as our value head.
CLASSIFICATION_HEAD_MAPPING = {r"^score\.": "value_head."}


class ValueModel(PreTrainedModel):
    """``AutoModel`` backbone + ``Linear(hidden, 1)``; ``forward`` returns one value per token."""

    config_class = PretrainedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    # Loading a causal-LM directory directly is allowed (the head then starts at zero): its lm_head is
    # expected to be unused and the head expected to be missing, so neither is reported.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]
    _keys_to_ignore_on_load_missing = [r"^value_head\."]

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self.model = AutoModel.from_config(config)
        self.value_head = nn.Linear(config.hidden_size, 1)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a value-model directory; the backbone config class is read from ``config.json``. An HF
        ``*ForSequenceClassification`` directory with one label loads too: its trained head
        ``score.weight`` becomes ``value_head.weight`` (that head has no bias: ours starts at zero)."""
        if "config" not in kwargs:
            kwargs["config"] = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        # Only for such a checkpoint: transformers reverses a key mapping on save, so the model saves
        # under the names it was loaded from.
        if has_classification_head(str(pretrained_model_name_or_path)):
            kwargs.setdefault("key_mapping", CLASSIFICATION_HEAD_MAPPING)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        if module is self.value_head:
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask, position_ids: [B, T] -> values [B, T] (dtype of the model)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state  # [B, T, H]
        return self.value_head(hidden).squeeze(-1)


def make_value_model_from_lm(lm_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a value model whose backbone is the causal LM at ``lm_dir`` and whose head is zero.

    The tokenizer is copied along, so ``out_dir`` is self-contained. Keeps the LM's dtype.
    """
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype="auto")
    # transformers wraps to() in functools.wraps, whose stub leaves self unbound
    value_model = ValueModel(lm.config).to(lm.dtype)  # pyright: ignore[reportArgumentType]
    missing, unexpected = value_model.model.load_state_dict(lm.base_model.state_dict(), strict=False)
    # Only non-persistent buffers (e.g. rotary tables) may differ; a missing weight is a real mismatch.
    missing = [k for k in missing if k in dict(value_model.model.named_parameters())]
    if missing or unexpected:
        raise ValueError(f"backbone of {lm_dir} does not match AutoModel for its config: "
                         f"missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        value_model.value_head.weight.zero_()
        value_model.value_head.bias.zero_()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    value_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(lm_dir).save_pretrained(out)
    return out
