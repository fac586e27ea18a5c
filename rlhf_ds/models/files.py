"""What a model directory holds, read without loading its weights, and the start-up checks built on it.

A run refuses, before any engine is built, models that would load but run wrongly:

- a reward model whose scalar head is not in its checkpoint: it would start from a zero head (our
  :class:`~rlhf_ds.models.value_model.ValueModel` ignores the missing head so that a critic can start
  from a causal LM) and score every response alike;
- roles whose vocabularies differ from the actor's: they read the actor's token ids.

Weight names come from the safetensors headers (or a sharded checkpoint's index), never from the
tensors. A model is a local directory, or a hub name already in the local HF cache (nothing is
downloaded).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Optional

from huggingface_hub import try_to_load_from_cache

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# The scalar head of a reward model, by checkpoint format: ours (ValueModel), and HF's
# *ForSequenceClassification (no bias), which ValueModel.from_pretrained maps onto its own.
VALUE_HEAD = ("value_head.weight", "value_head.bias")
CLASSIFICATION_HEAD = ("score.weight",)


class ModelCheckError(ValueError):
    """A model directory that a role cannot use; the message names the config field and the path."""


def local_file(model: str, filename: str) -> Optional[str]:
    """Path of ``filename`` in a model directory (or in the local HF cache for a hub name); None if absent."""
    if os.path.isdir(model):
        path = os.path.join(model, filename)
        return path if os.path.isfile(path) else None

    try:
        found = try_to_load_from_cache(model, filename)
    except ValueError:   # not a valid hub name either (e.g. a local path that does not exist)
        return None
    return found if isinstance(found, str) else None


def _safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} from a safetensors header (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name: tuple(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def _torch_bin_shapes(path: str) -> dict[str, tuple[int, ...]]:
    import torch  # torch: loaded when first needed

    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return {name: tuple(t.shape) for name, t in state.items()}


def weight_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """{weight name: shape} of the checkpoint at ``model`` (safetensors or PyTorch, sharded or not)."""
    for index_name, read in ((SAFETENSORS_INDEX, _safetensors_shapes), (TORCH_BIN_INDEX, _torch_bin_shapes)):
        index = local_file(model, index_name)
        if index is not None:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            shapes: dict[str, tuple[int, ...]] = {}
            for shard in shards:
                shapes.update(read(os.path.join(os.path.dirname(index), shard)))
            return shapes
    for file_name, read in ((SAFETENSORS, _safetensors_shapes), (TORCH_BIN, _torch_bin_shapes)):
        path = local_file(model, file_name)
        if path is not None:
            return read(path)
    raise ModelCheckError(f"{model}: no checkpoint found (none of {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN}, "
                          f"{TORCH_BIN_INDEX}); expected a save_pretrained directory")


def has_classification_head(model: str) -> bool:
    """The checkpoint holds an HF classification head (``score.weight``) and not our ``value_head``."""
    try:
        shapes = weight_shapes(model)
    except ModelCheckError:   # no local checkpoint: the loader reports it
        return False
    return CLASSIFICATION_HEAD[0] in shapes and VALUE_HEAD[0] not in shapes


def check_reward_head(model: str, field: str) -> None:
    """Refuse a reward model whose scalar head would not come from its checkpoint.

    Accepted: ``value_head.weight`` and ``value_head.bias`` (ValueModel), or ``score.weight`` of shape
    [1, hidden] (HF *ForSequenceClassification with one label). field: the config key, for the message.
    """
    shapes = weight_shapes(model)
    if all(name in shapes for name in VALUE_HEAD):
        return
    score = shapes.get(CLASSIFICATION_HEAD[0])
    if score is not None and score[0] != 1:
        raise ModelCheckError(f"{field}={model}: the classification head score.weight has shape {list(score)}, "
                              f"i.e. {score[0]} labels; a reward model gives one score per sequence: use a "
                              f"checkpoint trained with num_labels=1")
    if score is not None:
        return
    classifier = _architectures(model, "ForSequenceClassification")
    missing = list(CLASSIFICATION_HEAD) if classifier else [name for name in VALUE_HEAD if name not in shapes]
    raise ModelCheckError(f"{field}={model}: the reward model's scoring head is not in the checkpoint (missing "
                          f"{', '.join(missing)}), so it would start from zero and score every response alike. "
                          f"Use a trained reward model: a ValueModel directory (value_head.weight, "
                          f"value_head.bias) or an HF *ForSequenceClassification with num_labels=1 "
                          f"(score.weight), not a causal LM")


def _architectures(model: str, suffix: str) -> bool:
    """Whether the model's config.json names an architecture ending in ``suffix``."""
    path = local_file(model, "config.json")
    if path is None:
        return False
    with open(path, encoding="utf-8") as f:
        return any(a.endswith(suffix) for a in json.load(f).get("architectures") or [])


def vocab_size(model: str) -> int:
    """Rows of the model's token embedding, from its config (no weights loaded)."""
    from transformers import AutoConfig  # transformers: loaded when first needed

    return int(AutoConfig.from_pretrained(model).get_text_config().vocab_size)


def _same_tokenizer_file(a: str, b: str) -> bool:
    """Both directories ship a byte-identical tokenizer.json."""
    file_a, file_b = (local_file(m, "tokenizer.json") for m in (a, b))
    if file_a is None or file_b is None:
        return False
    with open(file_a, "rb") as fa, open(file_b, "rb") as fb:
        return fa.read() == fb.read()


def check_vocabularies(models: dict[str, str]) -> None:
    """Refuse models whose vocabulary size differs from the first one's (the actor's).

    models: {config field: resolved model path}, the actor first. Sizes that differ while both
    directories ship the same tokenizer.json are accepted: one tokenizer, embeddings padded to
    different sizes (Qwen2.5-1.5B has 151936 rows, Qwen2.5-7B 152064).
    """
    (base_field, base), *others = models.items()
    base_size = vocab_size(base)
    problems = []
    for field, model in others:
        if model == base:
            continue
        size = vocab_size(model)
        if size != base_size and not _same_tokenizer_file(base, model):
            problems.append(f"{field}={model} has vocab_size {size}")
    if problems:
        raise ModelCheckError(f"the roles must share the actor's vocabulary (they read its token ids), but "
                              f"{base_field}={base} has vocab_size {base_size} while " + "; ".join(problems)
                              + " (config.json). Use models of the actor's tokenizer family")
