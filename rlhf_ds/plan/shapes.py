"""The shapes of a model, read from its HF config and built on the meta device: no weights are loaded,
so a 70B model is planned in seconds on a laptop.

``model_path`` may be a local HF directory, a hub name the local HF cache already holds, ``tiny:<preset>``
(built locally, as for training), or ``shape:<name>``: a well-known architecture from ``KNOWN_SHAPES``,
for planning a run whose weights are not on this machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

SHAPE_PREFIX = "shape:"

# Architectures of public checkpoints (config.json values), for planning without their files.
KNOWN_SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=False),
    "llama-3.1-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                          tie_word_embeddings=False),
}


class ShapeError(ValueError):
    """A model whose config cannot be read."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory arithmetic needs of one model (tied parameters counted once)."""
    param_numels: tuple[int, ...]     # every parameter tensor, in model order
    largest_module_numel: int         # most parameters of one ZeRO-3 gather unit (a module, or a leaf
                                      # module with its children)
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def num_params(self) -> int:
        return sum(self.param_numels)


def _hf_config(model_path: str):
    from transformers import AutoConfig  # transformers: loaded when first needed

    if model_path.startswith(SHAPE_PREFIX):
        name = model_path[len(SHAPE_PREFIX):]
        if name not in KNOWN_SHAPES:
            raise ShapeError(f"unknown model shape {model_path!r}; known: "
                             f"{', '.join(SHAPE_PREFIX + k for k in KNOWN_SHAPES)}")
        values = dict(KNOWN_SHAPES[name])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    # transformers: loaded when first needed
    from rlhf_ds.models.tiny import resolve_model_path
    try:
        return AutoConfig.from_pretrained(resolve_model_path(model_path))
    except (OSError, ValueError) as err:
        raise ShapeError(f"cannot read the HF config of {model_path!r}: {err}. Pass a local model directory, "
                         f"a hub name in the local HF cache, or one of "
                         f"{', '.join(SHAPE_PREFIX + k for k in KNOWN_SHAPES)}") from None


@lru_cache(maxsize=32)
def model_shape(model_path: str, value_head: bool = False, leaf_modules: str = "none",
                field: str = "zero3_leaf_modules") -> ModelShape:
    """Shapes of the causal LM at ``model_path`` (``value_head``: its backbone plus a scalar head, as the
    critic and the reward model are built). ``leaf_modules`` (a ``<role>.zero3_leaf_modules`` value, named
    ``field`` in errors) decides the ZeRO-3 gather unit: a leaf module is gathered whole."""
    # accelerate, transformers: loaded on first use (the CLI and configs start without them)
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    # torch: loaded when first needed
    from rlhf_ds.models.blocks import largest_unit_numel, leaf_module_classes

    config = _hf_config(model_path)
    text = config.get_text_config()
    with init_empty_weights():
        model = (AutoModel if value_head else AutoModelForCausalLM).from_config(config)
    model.tie_weights()   # tied heads come out untied from a meta build; tying inside it is a no-op
    numels = [p.numel() for p in model.parameters()]
    if value_head:
        numels += [text.hidden_size, 1]   # the value head: Linear(hidden, 1) with its bias
    try:
        largest = largest_unit_numel(model, leaf_module_classes(model, leaf_modules, field, model_path))
    except ValueError as err:
        raise ShapeError(str(err)) from None
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(param_numels=tuple(numels), largest_module_numel=largest,
                      num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                      intermediate_size=text.intermediate_size, num_heads=heads,
                      num_kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                      vocab_size=text.vocab_size)
