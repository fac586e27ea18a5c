"""Which modules of a model ZeRO-3 treats as one unit (``<role>.zero3_leaf_modules``).

DeepSpeed's ZeRO-3 hooks every module: a pre-forward hook gathers its parameters, a post-forward hook
releases them, and two more do the same around its backward. On a small model these hooks cost more
than the arithmetic (measured on the tiny bench model, one rank, every parameter persistent: forward
18.8 -> 12.8 ms and backward 24.7 -> 18.3 ms per 32-sequence micro-batch once the decoder layers are
units). A *leaf* module is gathered, hooked and released as a whole, children included; the cost is
that a block's parameters are whole at once (the planner counts it). DeepSpeed's own
``stage3_module_granularity_threshold`` picks leaves by a size rule instead: on a small model it picks the
whole model, whose output is not a tensor (so no backward hook fires), and in 0.19.8 on CPU it fails in
``zero_grad``. Here the units are chosen by class.

Pure over a ``torch.nn.Module`` (real or built on the meta device), so the engine builder and the memory
planner resolve the same classes.
"""
from __future__ import annotations

import torch

AUTO, NONE = "auto", "none"


def transformer_block_classes(model: torch.nn.Module) -> tuple[str, ...]:
    """Class names the model's HF parts declare unsplittable (``_no_split_modules``): the decoder layers."""
    names: list[str] = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or ():
            if name not in names:
                names.append(name)
    return tuple(names)


def leaf_module_classes(model: torch.nn.Module, spec: str, field: str, model_path: str) -> tuple[str, ...]:
    """The class names ``spec`` selects in ``model``: 'auto' (its transformer blocks), 'none', or names
    separated by commas. Raises ValueError naming ``field`` and ``model_path`` for a name no module of the
    model has."""
    spec = spec.strip()
    if spec == NONE:
        return ()
    # Containers never run a forward of their own, so their hooks would never gather anything.
    present = {type(module).__name__ for module in model.modules()
               if not isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.ParameterList,
                                          torch.nn.ParameterDict))}
    if spec == AUTO:
        return tuple(name for name in transformer_block_classes(model) if name in present)
    names = tuple(name.strip() for name in spec.split(",") if name.strip())
    missing = [name for name in names if name not in present]
    if missing or not names:
        with_params = sorted({type(m).__name__ for m in model.modules()
                              if type(m).__name__ in present and any(True for _ in m.parameters())})
        raise ValueError(f"{field}={spec!r}: {model_path} has no module of class "
                         f"{', '.join(missing) or '(none named)'}; valid: '{AUTO}', '{NONE}', or class names "
                         f"separated by commas, among {', '.join(with_params)}")
    return names


def largest_unit_numel(model: torch.nn.Module, classes: tuple[str, ...]) -> int:
    """Most parameters ZeRO-3 gathers for one unit: a leaf module with its children, or any other module's
    own parameters."""
    largest = 0
    for module in model.modules():
        recurse = type(module).__name__ in classes
        largest = max(largest, sum(p.numel() for p in module.parameters(recurse=recurse)))
    return largest
