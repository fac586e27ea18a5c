#!/usr/bin/env bash
# A Ray cluster for rlhf_ds: start the head, join workers, run or submit a training run.
# See README.md#multi-node for what every node needs (same venv path, network, shared files).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
RAY="$VENV/bin/ray"
RAY_PORT="${RAY_PORT:-6379}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
# The dashboard serves `ray job submit` and has no authentication: it listens on this node only unless
# you set RAY_DASHBOARD_HOST=0.0.0.0 (then on a trusted network only).
RAY_DASHBOARD_HOST="${RAY_DASHBOARD_HOST:-127.0.0.1}"
# Passed to every process of a submitted job when set here (Ray workers do not see this shell's env).
# No secrets here: the runtime env is printed below and shown by the Ray dashboard.
FORWARDED_ENV=(RLHF_DS_CACHE HF_HOME HF_HUB_OFFLINE NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_DEBUG
               OMP_NUM_THREADS DS_ACCELERATOR WANDB_MODE WANDB_DIR)
DRY_RUN=0

usage() {
    cat <<EOF
usage: scripts/ray_cluster.sh [--dry-run] COMMAND [ARGS...]

  head [RAY_START_ARGS...]     start the Ray head on this node, print the command workers run to join
  worker HEAD_IP:PORT [RAY_START_ARGS...]
                               join this node to the cluster whose head is at HEAD_IP:PORT
  run CONFIG [key=value ...]   run the driver in this shell: RAY_ADDRESS=... rlhf-ds train CONFIG ...
  submit CONFIG [key=value ...]
                               submit the run as a Ray job: ray job submit --working-dir REPO -- ...
  status                       ray status
  stop                         ray stop (stops EVERY Ray process on this machine)

run: the driver is a process of this shell: its output is here, Ctrl-C stops the run with a
  checkpoint, closing the shell kills it (use tmux / nohup). Every node runs its own checkout.
submit: the driver runs on the head as a Ray job and outlives this shell (ray job logs -f ID,
  ray job stop ID). Every process of the job runs an uploaded copy of REPO (without .git .venv
  .cache outputs) in a temporary directory, so trainer.output_dir must be an absolute path on a
  shared filesystem (checked before submitting), and RLHF_DS_CACHE should be one. Variables passed
  to the job when set here: ${FORWARDED_ENV[*]}.

Arguments after head / worker go to \`ray start\` (e.g. --num-gpus 8). Export NCCL_SOCKET_IFNAME,
GLOO_SOCKET_IFNAME, RLHF_DS_CACHE and HF_HOME before head / worker: the Ray workers of a node inherit
the environment of its \`ray start\`.
Environment: VENV (REPO/.venv; the same path on every node), RAY_PORT (6379), RAY_DASHBOARD_PORT
(8265), RAY_DASHBOARD_HOST (127.0.0.1), RAY_NODE_IP (head address; default: Ray's guess),
RAY_ADDRESS (run, status: 127.0.0.1:RAY_PORT), RAY_JOB_ADDRESS (submit: http://127.0.0.1:RAY_DASHBOARD_PORT).
--dry-run prints the commands without running them.
EOF
}

die() { echo "ray_cluster.sh: $*" >&2; exit 2; }

run_cmd() {   # print the command (shell-quoted); run it unless --dry-run
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

need_venv() {
    [[ -x "$PY" && -x "$RAY" ]] ||
        die "no Ray in $VENV (run \`make install\`, or set VENV to the venv that has rlhf_ds)"
}

cmd_head() {
    need_venv
    local ip="${RAY_NODE_IP:-}"
    if [[ -z "$ip" ]]; then ip="$("$PY" -c 'import ray; print(ray.util.get_node_ip_address())')"; fi
    run_cmd "$RAY" start --head --port "$RAY_PORT" --node-ip-address "$ip" \
        --dashboard-host "$RAY_DASHBOARD_HOST" --dashboard-port "$RAY_DASHBOARD_PORT" "$@"
    cat <<EOF

Ray head at $ip:$RAY_PORT. On every other node (same checkout path, same env exports), run:
    scripts/ray_cluster.sh worker $ip:$RAY_PORT
Then start a run from this node:
    scripts/ray_cluster.sh run CONFIG [key=value ...]      # driver in this shell
    scripts/ray_cluster.sh submit CONFIG [key=value ...]   # driver as a Ray job
EOF
}

cmd_worker() {
    [[ $# -ge 1 && "$1" == *:* ]] || die "worker needs the head's address HEAD_IP:PORT (printed by \`head\`)"
    need_venv
    local address="$1"
    shift
    run_cmd "$RAY" start --address "$address" "$@"
}

cmd_run() {
    [[ $# -ge 1 ]] || die "run needs a CONFIG (a recipe name or a YAML path), then key=value overrides"
    need_venv
    run_cmd env "RAY_ADDRESS=${RAY_ADDRESS:-127.0.0.1:$RAY_PORT}" "$VENV/bin/rlhf-ds" train "$@"
}

cmd_submit() {
    [[ $# -ge 1 ]] || die "submit needs a CONFIG (a recipe name, a YAML path relative to the repo root," \
                          "or an absolute path), then key=value overrides"
    need_venv
    # Resolve and validate the config here, before anything is uploaded (rlhf_ds.config imports no torch).
    local output_dir
    output_dir="$(cd "$REPO" && "$PY" -c 'import sys
from rlhf_ds.config import ConfigError, load_config
try:
    print(load_config(sys.argv[1], sys.argv[2:]).trainer.output_dir)
except ConfigError as err:
    sys.exit(f"ray_cluster.sh submit: {err}")' "$@")"
    [[ "$output_dir" == /* ]] || die "submit: trainer.output_dir is '$output_dir', a relative path: the job runs" \
        "in a temporary copy of the repo, so pass an absolute path on a shared filesystem" \
        "(trainer.output_dir=/shared/runs/NAME)"
    local runtime_env
    runtime_env="$("$PY" -c 'import json, os, sys
env = {name: os.environ[name] for name in sys.argv[1:] if name in os.environ}
print(json.dumps({"env_vars": env, "excludes": [".git", ".venv", ".cache", "outputs"]}))' "${FORWARDED_ENV[@]}")"
    run_cmd "$RAY" job submit --address "${RAY_JOB_ADDRESS:-http://127.0.0.1:$RAY_DASHBOARD_PORT}" \
        --working-dir "$REPO" --runtime-env-json "$runtime_env" -- "$PY" -m rlhf_ds.cli train "$@"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help|help) usage; exit 0 ;;
        -n|--dry-run) DRY_RUN=1; shift ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
command="$1"
shift
case "$command" in
    head) cmd_head "$@" ;;
    worker) cmd_worker "$@" ;;
    run) cmd_run "$@" ;;
    submit) cmd_submit "$@" ;;
    status) need_venv; run_cmd "$RAY" status --address "${RAY_ADDRESS:-127.0.0.1:$RAY_PORT}" ;;
    stop) need_venv; run_cmd "$RAY" stop ;;
    *) echo "ray_cluster.sh: unknown command '$command'" >&2; usage >&2; exit 2 ;;
esac
