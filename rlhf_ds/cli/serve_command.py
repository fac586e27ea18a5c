"""`rlhf-ds serve-reward SPEC`: one reward over HTTP, for `reward.remote.url` (docs/rewards.md#the-server).

SPEC is what `reward.functions` accepts (a built-in name such as exact_match, path/to/file.py:fn,
package.module:fn), run by a RewardRunner in isolated worker processes with the limits a run's rule
rewards have, or a reward-model directory (`reward_hf/` of `rlhf-ds rm`), scored at the last real token.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from rlhf_ds.cli.args import Command
from rlhf_ds.config import RewardConfig
from rlhf_ds.rewards.functions import REWARD_FUNCTIONS, RewardFunctionError
from rlhf_ds.rewards.runner import RewardRunner
from rlhf_ds.rewards.schema import SCHEMA_VERSION, TOKEN_ENV
from rlhf_ds.rewards.server import DEFAULT_MAX_REQUEST_MB, RuleScorer, build_app, serve

_DEFAULTS = RewardConfig()   # the limits of a run's rule rewards


def _add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC",
                        help="a reward function as reward.functions names it (exact_match, path/to/file.py:fn, "
                             "module:fn), or a reward-model directory (reward_hf/ of `rlhf-ds rm`)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 = every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument("--token", default="",
                        help=f"refuse requests without 'Authorization: Bearer TOKEN' (401); default: ${TOKEN_ENV} "
                             "if set (a token on the command line shows in process lists)")
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB,
                        help=f"larger request bodies are refused with 413 (default {DEFAULT_MAX_REQUEST_MB:g})")
    parser.add_argument("--num-workers", type=int, default=_DEFAULTS.num_workers,
                        help=f"reward function: worker processes (default {_DEFAULTS.num_workers})")
    parser.add_argument("--timeout-s", type=float, default=_DEFAULTS.timeout_s,
                        help=f"reward function: deadline of one call (default {_DEFAULTS.timeout_s:g})")
    parser.add_argument("--chat-template", action="store_true",
                        help="reward model: encode prompts in the tokenizer's chat template, as a run with "
                             "data.apply_chat_template=true does")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="reward model: sequences per forward pass (default 16)")


def _reward_model(ns: argparse.Namespace):
    # torch and transformers: loaded only to serve a reward model
    from rlhf_ds.models.reward_scorer import RewardModelScorer

    return RewardModelScorer(ns.spec, chat_template=ns.chat_template, batch_size=ns.batch_size)


def _rule_runner(ns: argparse.Namespace) -> RewardRunner:
    # max_failure_fraction=1: a failed call never raises inside the runner; RuleScorer refuses its scores
    return RewardRunner([ns.spec], None, ns.timeout_s, _DEFAULTS.failure_value, ns.num_workers,
                        max_failure_fraction=1.0, import_timeout_s=_DEFAULTS.import_timeout_s,
                        memory_limit_mb=_DEFAULTS.memory_limit_mb, cpu_time_limit_s=_DEFAULTS.cpu_time_limit_s)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _run(ns: argparse.Namespace) -> int:
    token = ns.token or os.environ.get(TOKEN_ENV, "")
    if not 0 < ns.max_request_mb or not 0 <= ns.port < 65536:
        raise SystemExit(f"--max-request-mb must be > 0 and --port in [0, 65535], got {ns.max_request_mb}, {ns.port}")
    runner = None
    try:
        if ns.spec not in REWARD_FUNCTIONS and os.path.isdir(ns.spec):
            scorer, what = _reward_model(ns), f"the reward model {ns.spec}"
        else:
            runner = _rule_runner(ns)
            scorer, what = RuleScorer(runner), f"the reward function {ns.spec!r}"
    except (RewardFunctionError, ValueError) as err:
        print(f"rlhf-ds serve-reward: error: {err}", file=sys.stderr)
        return 2
    try:
        app = build_app(scorer, token=token, max_request_bytes=int(ns.max_request_mb * 2**20))
        if not _is_loopback(ns.host) and not token:
            print(f"rlhf-ds serve-reward: warning: listening on {ns.host} without a token: anyone who can reach "
                  f"the port can use it (set --token or ${TOKEN_ENV})", file=sys.stderr)
        print(f"serving {what} at http://{ns.host}:{ns.port}/score (schema version {SCHEMA_VERSION}; GET /health; "
              f"{'bearer token required' if token else 'no token'})", flush=True)
        serve(app, ns.host, ns.port)
    finally:
        if runner is not None:
            runner.close()
    return 0


SERVE_COMMANDS = {
    "serve-reward": Command("serve a reward function or a reward model over HTTP for reward.remote.url: "
                            "`serve-reward SPEC [--host 127.0.0.1] [--port 8000] [--token T]`", _add, _run),
}
