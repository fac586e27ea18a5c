"""`rlhf-ds` command line.

Each subcommand is one entry of COMMANDS: a help line, a function adding its arguments to its
argparse sub-parser, and a function running it (returns the exit status). Heavy imports (torch, ray,
deepspeed) belong inside the run functions, so `rlhf-ds --help` and `rlhf-ds config ...` stay fast.
Commands that take a config use `add_config_arguments` / `config_from_args`:

    rlhf-ds <command> [CONFIG] [key=value ...]     CONFIG: a YAML path or a shipped recipe name

A ConfigError anywhere prints its message and exits with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from rlhf_ds.config import DEFAULT_RECIPE, Config, ConfigError, list_recipes, load_config


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ----------------------------------------------------------------------------- shared config arguments

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


def config_from_args(ns: argparse.Namespace) -> Config:
    path, overrides = split_config_args(ns.config_args)
    return load_config(path, overrides)


# ----------------------------------------------------------------------------- config show | fields

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
    from rlhf_ds.config_loader import iter_fields, type_name

    rows = [f for f in iter_fields(Config) if f.path.startswith(prefix)]
    if not rows:
        raise ConfigError(f"no config key starts with {prefix!r}")
    lines = []
    for f in rows:
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        lines += [f"{f.path}: {type_name(f.hint)} = {default!r}", f"    {f.help}"]
    print("\n".join(lines))
    return 0


COMMANDS: dict[str, Command] = {
    "config": Command("inspect configs: `config show [CONFIG] [key=value ...]`, `config fields`",
                      _add_config_command, _run_config_command),
}

from rlhf_ds.cli_train import TRAIN_COMMANDS  # noqa: E402  (train, sft, bench; imports nothing heavy)

COMMANDS.update({name: Command(*spec) for name, spec in TRAIN_COMMANDS.items()})


# ----------------------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-ds",
        description="RLHF on DeepSpeed ZeRO-3 engines in Ray actors, with vLLM or HF rollouts.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.help,
                                                  description=command.help))
    return parser


def _strip_local_rank(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` the deepspeed launcher appends (LOCAL_RANK is in the environment too)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, rest = parser.parse_known_args(_strip_local_rank(sys.argv[1:] if argv is None else argv))
    # argparse stops collecting positionals at the first option: `train cfg --no-progress a.b=1` leaves
    # `a.b=1` over. Overrides may stand anywhere, so they join the config arguments.
    if rest and hasattr(ns, "config_args") and all("=" in item and not item.startswith("-") for item in rest):
        ns.config_args = [*ns.config_args, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return COMMANDS[ns.command].run(ns)
    except ConfigError as err:
        print(f"rlhf-ds: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: stop quietly, as other CLI tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
