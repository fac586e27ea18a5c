"""Driver-side pieces of the trainer: checkpoint discovery, logging files, curves, stage timing."""
import json
import math
import os

import matplotlib.pyplot as plt
import pytest

from rlhf_ds.trainer.checkpoint import MARKER, latest_checkpoint, retire_checkpoints, step_dir
from rlhf_ds.trainer.logging import RunLogger, curves_figure, plot_curves, smooth, smoothing_window, summary_line
from rlhf_ds.trainer.rl_trainer import StageTimer


def test_latest_checkpoint_ignores_incomplete_directories(tmp_path):
    out = str(tmp_path)
    assert latest_checkpoint(out) is None
    for step, complete in ((5, True), (10, True), (15, False)):
        os.makedirs(step_dir(out, step))
        if complete:
            open(os.path.join(step_dir(out, step), MARKER), "w").close()
    assert latest_checkpoint(out) == step_dir(out, 10)


def test_logger_writes_jsonl_summary_plot_and_resume_drops_later_steps(tmp_path):
    out = str(tmp_path)
    log = RunLogger(out, max_steps=3, show_progress=False)
    log.log(0, {"eval/accuracy": 0.25})
    for step in (1, 2, 3):
        log.log(step, {"reward/mean": 0.1 * step, "actor/policy_loss": -0.01, "timing/step_s": 1.0,
                       "timing/train_s": 0.5, "timing/rollout_s": 0.25})
    summary = log.finish()
    assert summary["first_eval"] == {"step": 0, "accuracy": 0.25} and "eval_gain" in summary
    assert os.path.exists(os.path.join(out, "curves.png"))
    assert json.load(open(os.path.join(out, "summary.json")))["steps"] == 3
    resumed = RunLogger(out, max_steps=5, start_step=2, show_progress=False)
    assert [r["step"] for r in resumed.history] == [0, 1, 2]
    resumed.finish()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2]



_SERIES = ("reward/mean", "eval/accuracy", "actor/policy_loss", "critic/value_loss", "actor/kl_loss",
           "actor/entropy", "response/length")


def _history(keys, steps=200, eval_every=50):
    """Per-step rows of ``keys`` (eval keys only every ``eval_every`` steps), plus metrics that are not plotted."""
    rows = []
    for step in range(steps):
        row = {"step": step, "timing/step_s": 1.0}
        for n, key in enumerate(keys):
            if not key.startswith("eval/") or step % eval_every == 0 or step == steps - 1:
                row[key] = n + 0.01 * step + 0.1 * (-1) ** step
        rows.append(row)
    return rows


@pytest.mark.parametrize("count", [1, 5, 7])
def test_curves_have_one_panel_per_series_and_no_spare_axes(count):
    keys = _SERIES[:count]
    history = _history(keys)
    for row in history:
        row["actor/grad_norm"] = math.nan   # never finite: no panel for it
    fig = curves_figure(history)
    try:
        assert len(fig.axes) == count
        assert [ax.get_title() for ax in fig.axes] == list(keys)
        assert all(ax.get_xlabel() == "step" and ax.lines for ax in fig.axes)
    finally:
        plt.close(fig)


def test_smoothing_is_a_centred_mean_that_does_not_shift_the_curve():
    assert [smoothing_window(n) for n in (1, 2, 3, 100, 1500)] == [1, 1, 1, 5, 45]
    assert all(smoothing_window(n) % 2 == 1 for n in range(1, 3000))
    # a step from 0 to 1 at index 50: the smoothed ramp is centred on the step, symmetric around it
    step = smooth([0.0] * 50 + [1.0] * 50, 5)
    assert step[:48] == [0.0] * 48 and step[52:] == [1.0] * 48
    assert step[48:52] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    # constant + alternating noise: the noise shrinks by the window, the level stays where it was
    noisy = [2.0 + 0.5 * (-1) ** i for i in range(40)]
    smoothed = smooth(noisy, 5)
    assert smoothed[2:-2] == pytest.approx([2.0 + 0.1 * (-1) ** i for i in range(2, 38)])
    assert smoothed[0] == pytest.approx(2.0 + 0.5 / 3)   # the window cut short at the ends
    # non-finite values are left out of the means; a window with none finite is a gap
    assert smooth([1.0, math.nan, 3.0, math.inf], 3) == pytest.approx([1.0, 2.0, 3.0, 3.0])
    assert all(math.isnan(v) for v in smooth([math.nan, math.nan, math.nan], 1))
    assert smooth([], 5) == []


def test_eval_curve_is_unsmoothed_markers_with_its_first_and_last_value_written():
    history = _history(["reward/mean"], steps=1501)
    evals = {0: 0.51, 500: 0.62, 1000: 0.70, 1500: 0.76}
    for step, accuracy in evals.items():
        history[step]["eval/accuracy"] = accuracy
    fig = curves_figure(history)
    try:
        ax = next(ax for ax in fig.axes if ax.get_title() == "eval/accuracy")
        (line,) = ax.lines
        assert list(line.get_xdata()) == list(evals) and list(line.get_ydata()) == list(evals.values())
        assert line.get_marker() == "o"
        labels = {text.get_text(): text.xy for text in ax.texts}
        assert labels == {"0.51 @ step 0": (0, 0.51), "0.76 @ step 1500": (1500, 0.76)}
    finally:
        plt.close(fig)


def test_curves_of_one_step_and_of_nans_are_drawn(tmp_path):
    one = [{"step": 0, "eval/accuracy": 0.3}, {"step": 1, "reward/mean": 0.5, "actor/policy_loss": math.nan}]
    plot_curves(one, str(tmp_path / "one.png"))
    assert (tmp_path / "one.png").stat().st_size > 0
    fig = curves_figure(one)
    try:
        assert [ax.get_title() for ax in fig.axes] == ["reward/mean", "eval/accuracy"]
        assert [t.get_text() for t in fig.axes[1].texts] == ["0.30 @ step 0"]   # first and last: one label
    finally:
        plt.close(fig)
    gappy = _history(["reward/mean", "eval/accuracy"], steps=300)
    for row in gappy[::3]:
        row["reward/mean"] = math.nan
    gappy[5]["reward/mean"], gappy[0]["eval/accuracy"] = math.inf, math.nan
    plot_curves(gappy, str(tmp_path / "gappy.png"))
    assert (tmp_path / "gappy.png").stat().st_size > 0
    plot_curves([], str(tmp_path / "none.png"))   # nothing to plot: no file
    assert not (tmp_path / "none.png").exists()

def test_summary_line_shows_stage_shares_of_the_step():
    line = summary_line(2, 10, {"reward/mean": 0.5, "timing/step_s": 2.0, "timing/train_s": 1.0,
                                "timing/rollout_s": 0.5, "timing/eval_s": 5.0})
    assert line.startswith("step 2/10 | reward 0.5") and "(train 50% rollout 25%)" in line


def test_stage_timer_accumulates_named_stages():
    timer = StageTimer()
    for _ in range(2):
        with timer("rollout"):
            pass
    metrics = timer.metrics()
    assert set(metrics) == {"timing/rollout_s", "timing/step_s"}
    assert 0 <= metrics["timing/rollout_s"] <= metrics["timing/step_s"]


def test_a_fresh_run_moves_an_earlier_runs_checkpoints_aside(tmp_path):
    assert retire_checkpoints(str(tmp_path)) is None          # nothing there: nothing to do
    old = tmp_path / "checkpoints" / "step_900"
    old.mkdir(parents=True)
    (old / MARKER).write_text("step 900\n")
    assert latest_checkpoint(str(tmp_path)).endswith("step_900")
    retired = retire_checkpoints(str(tmp_path))
    assert latest_checkpoint(str(tmp_path)) is None          # resume can no longer pick the old run
    assert os.path.exists(os.path.join(retired, "step_900", MARKER))   # moved, not deleted


def test_console_prints_a_summary_every_interval_and_every_step_goes_to_the_files(tmp_path, capsys):
    out = str(tmp_path)
    log = RunLogger(out, max_steps=900, summary_interval=45, show_progress=False)
    for step in range(1, 901):
        evaluation = {"eval/accuracy": 0.5} if step % 100 == 0 else {}
        log.log(step, {"reward/mean": 0.5, "timing/step_s": 0.1, **evaluation})
    log.finish()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    # every 45th step, plus the evaluations at 100, 200, ... (900 is both)
    assert len(printed) == 20 + 8 and printed[0].startswith("step 45/900") and printed[-1].startswith("step 900/900")
    assert sum("eval 0.5" in line for line in printed) == 9
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 900
