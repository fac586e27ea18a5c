"""Generic machinery behind rlhf_ds.config: typed dataclasses from YAML + dotted overrides.

Nothing here knows the rlhf_ds config tree; config.py declares the tree, config_rules.py its cross-field rules.
Every field is declared with `option(default, help, ...)` (or `section(cls, help)` for a nested
dataclass), so its documentation sits where it is declared and `iter_fields` can print it. Enum-like
fields are annotated `Literal[...]` (the aliases of rlhf_ds/choices.py): the annotation is the one
source of the valid choices, read by both the check and its error message through `typing.get_args`.
No float anywhere in the tree may be NaN or infinite (YAML reads `.nan` and `.inf` as floats).

Pure Python + PyYAML: no torch, ray, deepspeed or vllm imports.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal, NamedTuple, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config value, key or combination is invalid; the message names the dotted field path."""


# ----------------------------------------------------------------------------- declaring fields

def option(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> Any:
    """A documented leaf field with optional numeric bounds (checked when the config is loaded)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return dataclasses.field(default=default, metadata={"help": help, "bounds": bounds})


def section(cls: type, help: str, **defaults: Any) -> Any:
    """A documented nested dataclass field; `defaults` override the class defaults for this slot."""
    return dataclasses.field(default_factory=lambda: cls(**defaults),
                             metadata={"help": help, "bounds": {}})


class FieldInfo(NamedTuple):
    path: str          # dotted path from the root, e.g. "algo.kl_coef"
    hint: Any          # resolved type annotation
    default: Any       # the default of this slot (dataclasses.MISSING for sections)
    help: str

    @property
    def choices(self) -> tuple:
        """Valid values of a Literal field (the same tuple the validator checks), else ()."""
        return get_args(self.hint) if get_origin(self.hint) is Literal else ()


def iter_fields(cls: type, prefix: str = "", instance: Any = None) -> Iterator[FieldInfo]:
    """Walk every leaf field of a dataclass tree, depth first, in declaration order."""
    instance = cls() if instance is None else instance
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, value = hints[f.name], getattr(instance, f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from iter_fields(hint, f"{prefix}{f.name}.", value)
        else:
            yield FieldInfo(f"{prefix}{f.name}", hint, value, f.metadata.get("help", ""))


def type_name(hint: Any) -> str:
    """Readable name of a field type, used in type errors and in `rlhf-ds config fields`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{type_name(args[0])}]"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    return getattr(hint, "__name__", str(hint))


# ----------------------------------------------------------------------------- YAML and overrides

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`, users write `1e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """`["algo.kl_coef=1e-3", "reward.functions=[a, b]"]` -> `[("algo.kl_coef", 0.001), ...]`.

    Values are parsed as YAML (`true`, `1e-4`, `[1, 2]`, `{a: 1}`); an empty value is the empty string.
    """
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        value = "" if text.strip() == "" else yaml_load(text, f"override {item!r}")
        parsed.append((key, value))
    return parsed


def apply_overrides(raw: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Return a copy of the nested dict `raw` with each dotted key set (mappings merge into sections)."""
    result = _deep_merge({}, raw)
    for key, value in overrides:
        node, parts = result, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[:depth + 1])
                raise ConfigError(f"override {key!r}: {where} is a value ({child!r}), not a section")
            node = child
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = _deep_merge(node[last], value)
        else:
            node[last] = value
    return result


def _deep_merge(base: dict, update: Mapping) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = _deep_merge({}, value) if isinstance(value, Mapping) else value
    return merged


# ----------------------------------------------------------------------------- building + type checks

def build(cls: type, raw: Mapping | None, prefix: str = "", base: Any = None) -> Any:
    """Construct dataclass `cls` from a nested mapping, checking keys, types, choices and bounds.

    Keys absent from `raw` keep their value in `base` (default: `cls()`), so a section given in part
    keeps the defaults of its slot; lists become tuples so the result is deeply immutable.
    """
    base = cls() if base is None else base
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where}: expected a mapping of keys, got {_show(raw)}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(unknown_key_message(f"{prefix}{key}", str(key), names, prefix))
    hints = get_type_hints(cls)
    changes = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        path, hint = f"{prefix}{f.name}", hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            changes[f.name] = build(hint, raw[f.name], f"{path}.", getattr(base, f.name))
        else:
            changes[f.name] = _coerce(raw[f.name], hint, path)
            _check_bounds(changes[f.name], f.metadata.get("bounds", {}), path)
            _check_finite(changes[f.name], path)
    return dataclasses.replace(base, **changes)


def unknown_key_message(path: str, key: str, valid: list[str], prefix: str) -> str:
    where = f"section {prefix.rstrip('.')!r}" if prefix else "the top level"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean {prefix + close[0]!r}?" if close else f"valid keys in {where}: {', '.join(valid)}"
    return f"unknown key {path!r}; {hint}"


def invalid_choice_message(path: str, value: Any, choices: tuple) -> str:
    message = f"{path}: invalid value {value!r}; valid choices: {', '.join(map(repr, choices))}"
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return message + (f"; did you mean {close[0]!r}?" if close else "")


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if isinstance(value, (list, dict)) or value not in choices:
            raise ConfigError(invalid_choice_message(path, value, choices))
        return value
    if origin is tuple:
        return _coerce_sequence(value, hint, path)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if ok is None:
        raise TypeError(f"{path}: unsupported field type {hint!r} in the config schema")
    if not ok:
        raise ConfigError(f"{path}: expected {type_name(hint)}, got {_show(value)}")
    return float(value) if hint is float else value


def _coerce_sequence(value: Any, hint: Any, path: str) -> tuple:
    args = get_args(hint)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: expected {type_name(hint)}, got {_show(value)}")
    if len(args) == 2 and args[1] is Ellipsis:
        item_types = [args[0]] * len(value)
    elif len(value) != len(args):
        raise ConfigError(f"{path}: expected {type_name(hint)} ({len(args)} items), "
                          f"got {len(value)} items {list(value)!r}")
    else:
        item_types = list(args)
    return tuple(_coerce(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, item_types, strict=True)))


_BOUND_TESTS = {
    "ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<"),
}


def _check_bounds(value: Any, bounds: Mapping[str, float], path: str) -> None:
    for name, bound in bounds.items():
        test, symbol = _BOUND_TESTS[name]
        if not test(value, bound):  # NaN fails every bound, as it should
            allowed = " and ".join(f"{_BOUND_TESTS[n][1]} {b}" for n, b in bounds.items())
            raise ConfigError(f"{path}: must be {allowed}, got {value!r}")


def _check_finite(value: Any, path: str) -> None:
    """Refuse NaN / inf in a float leaf or in any item of a float sequence. It runs after the bounds,
    so a bounded field refuses NaN with its bounds message ("must be > 0, got nan")."""
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_finite(item, f"{path}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value!r}")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


# ----------------------------------------------------------------------------- printing

class _Dumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists: `adam_betas: [0.9, 0.999]`."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def yaml_dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def to_plain(obj: Any) -> Any:
    """Dataclass tree -> nested dicts / lists / scalars, in declaration order (safe for yaml.dump)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
