"""What a run shows and leaves behind.

- a tqdm progress bar over steps (with ETA) and a one-line summary every ``summary_interval`` steps
  (``Config.summary_interval``: about 20 lines for a whole run), at each held-out evaluation and at
  the last step;
- ``OUTPUT_DIR/metrics.jsonl``: one JSON object per step, ``step`` plus every reduced metric;
- TensorBoard events in ``OUTPUT_DIR/tensorboard`` and a W&B run, as ``trainer.loggers`` says (the JSONL file
  is always written: the summary, the curves and resume read it);
- at the end, ``OUTPUT_DIR/curves.png`` (reward, held-out accuracy, losses) and ``OUTPUT_DIR/summary.json``
  with the first and last held-out evaluation.

A resumed run keeps the lines of steps up to the checkpoint and drops later ones (they were computed by
the interrupted run after its last checkpoint and are about to be recomputed). The W&B run is resumed by
the id saved in ``OUTPUT_DIR/wandb_run_id``; W&B keeps only increasing steps, so for the steps between the
checkpoint and the interruption it keeps the interrupted run's values, where metrics.jsonl has the new ones.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import time
import warnings
from typing import TYPE_CHECKING, Any, Optional

from tqdm import tqdm

from rlhf_ds.choices import DEFAULT_LOGGERS

if TYPE_CHECKING:
    from rlhf_ds.config import Config

EVAL_KEY = "eval/accuracy"
WANDB_ID_FILE = "wandb_run_id"
# The summary line: (metric, short label); absent metrics are left out.
_SUMMARY = (("reward/mean", "reward"), (EVAL_KEY, "eval"), ("actor/policy_loss", "pg_loss"),
            ("actor/kl_loss", "kl"), ("critic/value_loss", "v_loss"), ("actor/grad_norm", "gnorm"),
            ("response/length", "len"), ("timing/step_s", "s"))
_PLOTS = (("reward/mean", "reward (train samples)"), (EVAL_KEY, "held-out accuracy (greedy)"),
          ("actor/policy_loss", "actor policy loss"), ("critic/value_loss", "critic value loss"),
          ("actor/kl_loss", "KL loss"), ("actor/entropy", "entropy"))


def read_metrics(path: str, up_to_step: Optional[int] = None) -> list[dict]:
    """The rows of ``metrics.jsonl``. A last line cut short (the run was killed while writing it) is
    dropped with a warning; a bad line before the last is an error naming the file and the line."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for k, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if k < len(lines) - 1:
                raise ValueError(f"{path}:{n}: not a JSON object ({err}); the file is damaged") from None
            warnings.warn(f"{path}:{n}: dropped a torn last line (the run was stopped while writing it)",
                          stacklevel=2)
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def summary_line(step: int, max_steps: int, metrics: dict) -> str:
    parts = [f"step {step}/{max_steps}"]
    for key, label in _SUMMARY:
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.4g}")
    stages = {k[len("timing/"):-2]: v for k, v in metrics.items()
              if k.startswith("timing/") and k not in ("timing/step_s", "timing/eval_s")}
    total = metrics.get("timing/step_s") or sum(stages.values()) or 1.0
    top = sorted(stages.items(), key=lambda kv: -kv[1])[:3]
    if top:
        parts.append("(" + " ".join(f"{name} {100 * v / total:.0f}%" for name, v in top) + ")")
    return " | ".join(parts)


class RunLogger:
    """``main=False`` (SPMD ranks other than 0) reads the history, so every rank takes the same
    decisions from it, but writes and prints nothing. ``config`` gives ``trainer.loggers`` and the W&B
    settings (None: metrics.jsonl and TensorBoard)."""

    def __init__(self, output_dir: str, max_steps: int, start_step: int = 0, summary_interval: int = 1,
                 show_progress: bool = True, main: bool = True, config: Optional[Config] = None):
        self.output_dir, self.max_steps, self.summary_interval = output_dir, max_steps, summary_interval
        loggers = config.trainer.loggers if config is not None else DEFAULT_LOGGERS
        self.path = os.path.join(output_dir, "metrics.jsonl")
        # A fresh run (start_step 0) starts a fresh file, even in an output_dir used before.
        self.history = read_metrics(self.path, up_to_step=start_step) if start_step > 0 else []
        self.main = main
        self.started = time.time()
        self.tb, self.wandb = None, None
        if not main:
            return
        os.makedirs(output_dir, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:   # rewrite: drop steps after the checkpoint
            f.writelines(json.dumps(row) + "\n" for row in self.history)
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)
        if config is not None and "wandb" in loggers:   # never a default logger: its settings are the config's
            self.wandb = start_wandb(config, output_dir, resume=start_step > 0)
        self.bar = tqdm(total=max_steps, initial=start_step, desc="rl", unit="step", dynamic_ncols=True,
                        disable=not show_progress)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if math.isfinite(value):
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        self.bar.update(step - self.bar.n)
        if step % self.summary_interval == 0 or step == self.max_steps or EVAL_KEY in metrics:
            tqdm.write(summary_line(step, self.max_steps, metrics))

    def evals(self) -> list[tuple[int, float]]:
        return [(r["step"], r[EVAL_KEY]) for r in self.history if EVAL_KEY in r]

    def finish(self, extra: Optional[dict] = None) -> dict:
        evals = self.evals()
        summary = {"steps": self.history[-1]["step"] if self.history else 0,
                   "wall_time_s": round(time.time() - self.started, 1), **(extra or {})}
        if evals:
            summary.update(first_eval={"step": evals[0][0], "accuracy": evals[0][1]},
                           last_eval={"step": evals[-1][0], "accuracy": evals[-1][1]},
                           eval_gain=evals[-1][1] - evals[0][1])
        if not self.main:
            return summary
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        with open(os.path.join(self.output_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        plot_curves(self.history, os.path.join(self.output_dir, "curves.png"))
        if self.wandb is not None:   # last: an upload still running does not hold back the files above
            self.wandb.summary.update({k: v for k, v in summary.items() if v is not None})
            self.wandb.finish()
        return summary


def start_wandb(config: Config, output_dir: str, resume: bool) -> Any:
    """The W&B run of ``output_dir``, with the resolved config as its run config. A fresh run
    gets a new id, saved in OUTPUT_DIR/wandb_run_id; a resumed run continues the run of the saved id
    (``resume="allow"``: it is created if W&B does not know it, as offline)."""
    try:
        import wandb
    except ImportError as err:
        raise RuntimeError(f"trainer.loggers includes 'wandb' but the wandb package cannot be imported "
                           f"({err}): install it (pip install wandb) or drop it from trainer.loggers") from None
    trainer = config.trainer
    id_path = os.path.join(output_dir, WANDB_ID_FILE)
    run_id = ""
    if resume and os.path.exists(id_path):
        with open(id_path, encoding="utf-8") as f:
            run_id = f.read().strip()
    if not run_id:
        run_id = secrets.token_hex(4)
        with open(id_path, "w", encoding="utf-8") as f:
            f.write(run_id + "\n")
    name = trainer.wandb_run_name or os.path.basename(os.path.normpath(output_dir))
    # WANDB_DIR, when set, says where W&B writes; wandb.init's `dir` would override it.
    return wandb.init(project=trainer.wandb_project, name=name, id=run_id, resume="allow",
                      mode=trainer.wandb_mode, config=config.to_dict(),
                      dir=None if os.environ.get("WANDB_DIR") else output_dir)


def plot_curves(history: list[dict], path: str) -> None:
    """One panel per available curve of ``_PLOTS`` (matplotlib Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, title) for key, title in _PLOTS if any(key in r for r in history)]
    if not panels:
        return
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels, strict=False):   # the grid may have spare axes
        points = [(r["step"], r[key]) for r in history if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if key == EVAL_KEY else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
