"""Driver-side pieces of the trainer: checkpoint discovery, logging files, stage timing."""
import json
import os

from rlhf_ds.trainer.checkpoint import MARKER, latest_checkpoint, retire_checkpoints, step_dir
from rlhf_ds.trainer.logging import RunLogger, summary_line
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
