"""`rlhf-ds` command line.

Each subcommand is one entry of COMMANDS (``args.Command``): a help line, a function adding its
arguments to its argparse sub-parser, and a function running it (returns the exit status). Commands
that take a config use ``add_config_arguments`` / ``config_from_args``:

    rlhf-ds <command> [CONFIG] [key=value ...]     CONFIG: a YAML path or a shipped recipe name

A ConfigError anywhere prints its message and exits with status 2, without a traceback.
Modules: ``args`` (shared by all commands), ``config_commands``, ``run_commands``, ``serve_command``,
``plan_command``, ``check_gpu``; this one only
assembles them, so nothing imports back into it.
"""
from __future__ import annotations

import argparse
import os
import sys

from rlhf_ds.cli.args import Command, add_config_arguments, config_from_args, split_config_args
from rlhf_ds.cli.check_gpu import CHECK_COMMANDS
from rlhf_ds.cli.config_commands import CONFIG_COMMANDS
from rlhf_ds.cli.plan_command import PLAN_COMMANDS
from rlhf_ds.cli.run_commands import RUN_COMMANDS
from rlhf_ds.cli.serve_command import SERVE_COMMANDS
from rlhf_ds.config import ConfigError

__all__ = ["COMMANDS", "Command", "add_config_arguments", "build_parser", "config_from_args", "main",
           "split_config_args"]

COMMANDS: dict[str, Command] = {**CONFIG_COMMANDS, **RUN_COMMANDS, **SERVE_COMMANDS, **PLAN_COMMANDS,
                                **CHECK_COMMANDS}


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
