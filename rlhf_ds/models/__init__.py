"""Model builders: tiny local models (char tokenizer + Llama / Qwen2) and the value model."""

from rlhf_ds.models.tiny import (DEFAULT_ALPHABET, PRESETS, build_char_tokenizer, build_tiny_lm,
                                 create_tiny_lm, default_cache_dir, resolve_model_path)
from rlhf_ds.models.value_model import ValueModel, make_value_model_from_lm

__all__ = ["DEFAULT_ALPHABET", "PRESETS", "ValueModel", "build_char_tokenizer", "build_tiny_lm",
           "create_tiny_lm", "default_cache_dir", "make_value_model_from_lm",
           "resolve_model_path"]
