"""`rlhf-ds config show|fields`: inspect configs without starting anything."""
from __future__ import annotations

import argparse

from rlhf_ds.cli.args import Command, add_config_arguments, config_from_args
from rlhf_ds.config import Config, ConfigError
from rlhf_ds.config_loader import iter_fields, type_name


def _add_config_command(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="config_action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print the resolved config as YAML",
                              description="Load CONFIG, apply the overrides, validate, print YAML.")
    add_config_arguments(show)
    fields = actions.add_parser("fields", help="list every config key with its type, default and "
                                               "meaning")
    fields.add_argument("prefix", nargs="?", default="",
                        help="only keys starting with this, e.g. algo or rollout.vllm")


def _run_config_command(ns: argparse.Namespace) -> int:
    if ns.config_action == "show":
        cfg = config_from_args(ns)
        derived = {name: getattr(cfg, name) for name in
                   ("needs_critic", "needs_reference", "uses_reward_model")}
        print(cfg.to_yaml() + "# derived: "
              + ", ".join(f"{k}={str(v).lower()}" for k, v in derived.items()))
        return 0
    return _print_fields(ns.prefix)


def _print_fields(prefix: str) -> int:
    rows = [f for f in iter_fields(Config) if f.path.startswith(prefix)]
    if not rows:
        raise ConfigError(f"no config key starts with {prefix!r}")
    lines = []
    for f in rows:
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        lines += [f"{f.path}: {type_name(f.hint)} = {default!r}", f"    {f.help}"]
    print("\n".join(lines))
    return 0


CONFIG_COMMANDS = {
    "config": Command("inspect configs: `config show [CONFIG] [key=value ...]`, `config fields`",
                      _add_config_command, _run_config_command),
}
