"""What a run shows and leaves behind.

- a tqdm progress bar over steps (with ETA) and a one-line summary every ``summary_interval`` steps
  (``Config.summary_interval``: about 20 lines for a whole run), at each held-out evaluation and at
  the last step;
- ``OUTPUT_DIR/metrics.jsonl``: one JSON object per step, ``step`` plus every reduced metric;
- TensorBoard events in ``OUTPUT_DIR/tensorboard`` and a W&B run, as ``trainer.loggers`` says (the JSONL file
  is always written: the summary, the curves and resume read it);
- at the end, ``OUTPUT_DIR/curves.png`` (reward, held-out accuracy, losses, KL, ...) and ``OUTPUT_DIR/summary.json``
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
# The curves of curves.png, in panel order: (metric, y-axis label); a panel only for a metric with a finite value.
_PLOTS = (("reward/mean", "reward (train samples)"), (EVAL_KEY, "held-out accuracy (greedy)"),
          ("eval/pairwise_accuracy", "held-out pairwise accuracy"), ("actor/policy_loss", "policy loss"),
          ("critic/value_loss", "value loss"), ("actor/kl_loss", "KL loss"), ("actor/kl", "KL to the reference"),
          ("actor/entropy", "entropy"), ("actor/grad_norm", "gradient norm (before clipping)"),
          ("response/length", "tokens"), ("sft/loss", "SFT loss"), ("rm/loss", "reward-model loss"))
# Per-step curves are smoothed by a centred mean over about this share of their points.
SMOOTH_SHARE = 0.03


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
            # torch: loaded when first needed
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
        import wandb  # wandb: only with the wandb logger
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


def smoothing_window(n: int) -> int:
    """The odd width of the centred mean for a curve of ``n`` points: about ``SMOOTH_SHARE`` of them,
    1 (no smoothing) for short runs."""
    return 2 * round(SMOOTH_SHARE * n / 2) + 1


def smooth(values: list[float], window: int) -> list[float]:
    """Centred mean over ``window`` points (odd), of the finite values only: a centred window does not
    delay the curve the way a trailing mean or a plain EMA does. Near the ends the window is cut short;
    a point whose window holds no finite value stays NaN (a gap, not a made-up value)."""
    half = window // 2
    sums, counts = [0.0], [0]   # prefix sums over the finite values: O(n) for any window
    for v in values:
        finite = math.isfinite(v)
        sums.append(sums[-1] + (v if finite else 0.0))
        counts.append(counts[-1] + finite)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        count = counts[hi] - counts[lo]
        out.append((sums[hi] - sums[lo]) / count if count else math.nan)
    return out


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key``; a value that is not a finite number becomes NaN (matplotlib leaves
    a gap there)."""
    steps, values = [], []
    for row in history:
        if key in row:
            try:
                value = float(row[key])
            except (TypeError, ValueError):
                value = math.nan
            steps.append(row["step"])
            values.append(value if math.isfinite(value) else math.nan)
    return steps, values


def _grid(n: int) -> tuple[int, int]:
    """Rows and columns for ``n`` panels: at most 3 columns, 2 x 2 rather than 3 + 1."""
    cols = 2 if n == 4 else min(3, n)
    return -(-n // cols), cols


def _plot_per_step(ax: Any, steps: list[int], values: list[float]) -> int:
    """Every step faint, the centred mean on top: the trend reads through the noise. Returns the window
    (1: too few points to smooth, drawn as they are)."""
    window = smoothing_window(len(values))
    if window == 1:
        ax.plot(steps, values, marker="o", markersize=3, color="C0")
        return window
    ax.plot(steps, values, color="C0", alpha=0.25, linewidth=0.8)
    ax.plot(steps, smooth(values, window), color="C0", linewidth=2)
    return window


def _plot_evaluations(ax: Any, steps: list[int], values: list[float]) -> None:
    """Evaluations are few: each one a marker, none smoothed, the first and the last written next to
    their points (the gain of the run at a glance)."""
    ax.plot(steps, values, marker="o", markersize=4, color="C1")
    finite = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    ax.margins(x=0.08, y=0.3)   # room for the labels inside the panel
    middle = (min(v for _, v in finite) + max(v for _, v in finite)) / 2
    # each label on the side away from the bulk of the curve (above a high point, below a low one), the
    # first right of its point and the last left of it: the labels stay inside the panel, off the line
    for k, point in enumerate(dict.fromkeys([finite[0], finite[-1]])):
        _label(ax, point, right=k == 0, above=point[1] >= middle)


def _label(ax: Any, point: tuple[int, float], right: bool, above: bool) -> None:
    step, value = point
    ax.annotate(f"{value:.2f} @ step {step}", point, xytext=(6 if right else -6, 8 if above else -8),
                textcoords="offset points", ha="left" if right else "right", va="bottom" if above else "top",
                fontsize="small", bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none",
                                        "alpha": 0.8})


def _legend(fig: Any, windows: set[int]) -> float:
    """One legend for the per-step panels, above them (in a panel it would cover the curve); returns the
    share of the figure's height it takes."""
    from matplotlib.lines import Line2D  # matplotlib: only to draw the curves

    smoothed = ("centred mean over " + (f"{windows.pop()} steps" if len(windows) == 1
                                        else f"{SMOOTH_SHARE:.0%} of the steps"))
    legend_items = [Line2D([], [], color="C0", alpha=0.25, linewidth=0.8), Line2D([], [], color="C0", linewidth=2)]
    fig.legend(legend_items, ["every step", smoothed], loc="upper center", ncol=2, frameon=False)
    return 0.4 / fig.get_figheight()


def curves_figure(history: list[dict]) -> Any:
    """The figure of ``plot_curves`` (None: nothing to plot): one panel per metric of ``_PLOTS`` with at
    least one finite value, and no spare axes."""
    import matplotlib  # matplotlib: only to draw the curves

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: only to draw the curves
    from matplotlib.ticker import MaxNLocator  # matplotlib: only to draw the curves

    series = [(key, label, *_series(history, key)) for key, label in _PLOTS]
    series = [s for s in series if any(math.isfinite(v) for v in s[3])]
    if not series:
        return None
    rows, cols = _grid(len(series))
    fig = plt.figure(figsize=(4.8 * cols, 3.4 * rows))
    windows = set()
    for i, (key, label, steps, values) in enumerate(series):
        ax = fig.add_subplot(rows, cols, i + 1)
        if key.startswith("eval/"):
            _plot_evaluations(ax, steps, values)
        else:
            windows.add(_plot_per_step(ax, steps, values))
        missing = sum(not math.isfinite(v) for v in values)
        if missing:   # a gap in the curve should not pass for a quiet stretch
            ax.text(0.99, 0.01, f"{missing} non-finite not drawn", transform=ax.transAxes, ha="right",
                    va="bottom", fontsize="small", color="C3")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # steps are whole, even for a 1-step run
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    windows.discard(1)
    top = 1 - _legend(fig, windows) if windows else 1
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def plot_curves(history: list[dict], path: str) -> None:
    """``OUTPUT_DIR/curves.png`` from the per-step rows (matplotlib Agg: no display needed)."""
    fig = curves_figure(history)
    if fig is None:
        return
    import matplotlib.pyplot as plt  # matplotlib: only to draw the curves

    fig.savefig(path, dpi=100)
    plt.close(fig)
