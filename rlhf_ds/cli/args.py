"""What every subcommand shares: its registry entry and the config arguments.

    rlhf-ds <command> [CONFIG] [key=value ...]     CONFIG: a YAML path or a shipped recipe name
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from rlhf_ds.choices import Stage
from rlhf_ds.config import DEFAULT_RECIPE, Config, ConfigError, list_recipes, load_config


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config_args", nargs="*", metavar="[CONFIG] [key=value ...]",
        help=f"a YAML file or a shipped recipe ({', '.join(list_recipes())}; default "
             f"{DEFAULT_RECIPE}), then dotted overrides such as algo.kl_coef=1e-3")


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`["ppo_tiny", "a.b=1"]` -> ("ppo_tiny", ["a.b=1"]); only the first word may be a config."""
    path = args[0] if args and "=" not in args[0] else None
    overrides = args[1:] if path is not None else list(args)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"expected key=value after the config, got {item!r}")
    return path, overrides


def config_from_args(ns: argparse.Namespace, stage: Stage = "rl") -> Config:
    """The config named on the command line, validated for what the command runs (``stage``)."""
    path, overrides = split_config_args(ns.config_args)
    return load_config(path, overrides, stage)
