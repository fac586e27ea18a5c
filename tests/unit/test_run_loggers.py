"""trainer.loggers: metrics.jsonl is required, TensorBoard and W&B are optional; the W&B run (offline
here: nothing touches the network) holds the values the run logged, and a resumed run continues it.

W&B 0.31 keeps an offline run only in its ``run-<id>.wandb`` file (no wandb-summary.json, and the old
``wandb.sdk.internal.datastore`` reader is gone), so ``wandb_records`` reads that file: a LevelDB-style
log of protobuf ``Record`` messages, the format ``wandb sync`` uploads.
"""
import glob
import json
import math
import os
import struct

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from rlhf_ds.config import ConfigError, load_config
from rlhf_ds.trainer.logging import WANDB_ID_FILE, RunLogger

_BLOCK, _HEADER = 32768, 7   # log blocks; record header: crc32 (4), length (2), type (1)
_FULL, _FIRST, _LAST = 1, 2, 4


def wandb_records(path: str) -> list:
    """The protobuf records of a ``.wandb`` file (records may span 32 KiB blocks)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B log: {data[:7]!r}"
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:   # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def offline_runs(root: str, run_id: str) -> list[dict]:
    """[{'run': the run record, 'history': {step: {metric: value}}}] for the offline runs of ``run_id``
    under ``root``, one per logger that wrote to it, oldest first. A metric name with "/" is stored as a
    nested key."""
    # offline-run-<time>-<id>, or offline-run-<time>-<id>-<k> when two start in the same second
    paths = glob.glob(os.path.join(root, "wandb", f"offline-run-*-{run_id}*", f"run-{run_id}.wandb"))
    assert paths, f"no offline run {run_id} under {root}: {os.listdir(root)}"
    runs = []
    for path in paths:
        records = wandb_records(path)
        kinds = [r.WhichOneof("record_type") for r in records]
        assert "run" in kinds and "exit" in kinds, f"{path} is not a whole run: {kinds}"
        run = records[kinds.index("run")].run
        history = {r.history.step.num: {key: json.loads(item.value_json) for item in r.history.item
                                        if not (key := item.key or "/".join(item.nested_key)).startswith("_")}
                   for r in records if r.WhichOneof("record_type") == "history"}
        runs.append({"run": run, "history": history})
    return sorted(runs, key=lambda r: r["run"].start_time.ToNanoseconds())


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline, silent, and every W&B file (settings, cache, runs) under tmp_path."""
    root = tmp_path / "wandb_root"
    root.mkdir()
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(root))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield str(root)
    wandb.teardown()   # stop the W&B service process this test started


def flush_wandb() -> None:
    """run.finish() can return before W&B's service process has written all of the .wandb file (seen
    with 0.31, offline); teardown waits for it. A run's own process does this at exit."""
    wandb.teardown()


def wandb_config(out: str, *overrides: str):
    return load_config(None, [f"trainer.output_dir={out}", "trainer.loggers=[jsonl,wandb]",
                              "trainer.wandb_project=unit", *overrides])


def test_a_config_without_jsonl_is_refused():
    with pytest.raises(ConfigError, match=r"trainer.loggers must include 'jsonl'.*metrics.jsonl.*"
                                          r"valid loggers: jsonl, tensorboard, wandb"):
        load_config(None, ["trainer.loggers=[tensorboard,wandb]"])
    with pytest.raises(ConfigError, match=r"trainer.loggers\[1\]: invalid value 'wanb'.*did you mean 'wandb'"):
        load_config(None, ["trainer.loggers=[jsonl,wanb]"])
    with pytest.raises(ConfigError, match=r"trainer.wandb_mode: invalid value 'onilne'.*did you mean 'online'"):
        load_config(None, ["trainer.wandb_mode=onilne"])
    defaults = load_config(None).trainer
    assert defaults.loggers == ("jsonl", "tensorboard") and defaults.wandb_mode == "offline"


def test_wandb_run_holds_the_logged_values_and_the_config(tmp_path, wandb_env):
    out = str(tmp_path / "run")
    cfg = wandb_config(out, "trainer.wandb_run_name=tiny-grpo")
    log = RunLogger(out, max_steps=3, show_progress=False, config=cfg)
    rows = {0: {"eval/accuracy": 0.25}}
    rows.update({step: {"reward/mean": 0.1 * step, "actor/policy_loss": -0.01 * step} for step in (1, 2, 3)})
    rows[2]["actor/grad_norm"] = math.nan   # a skipped step's NaN reaches W&B as NaN
    for step, metrics in rows.items():
        log.log(step, metrics)
    log.finish()
    flush_wandb()

    assert not os.path.exists(os.path.join(out, "tensorboard")), "tensorboard was not in trainer.loggers"
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2, 3]
    with open(os.path.join(out, WANDB_ID_FILE)) as f:
        run_id = f.read().strip()
    [logged] = offline_runs(wandb_env, run_id)   # WANDB_DIR set: the run goes there, not under out
    assert logged["run"].project == "unit" and logged["run"].display_name == "tiny-grpo"
    config = {item.key: json.loads(item.value_json) for item in logged["run"].config.update}
    assert config["trainer"]["loggers"] == ["jsonl", "wandb"] and config["seed"] == cfg.seed
    assert sorted(logged["history"]) == [0, 1, 2, 3]
    for step, metrics in rows.items():
        got = logged["history"][step]
        assert set(got) == set(metrics)
        for key, value in metrics.items():
            assert got[key] == pytest.approx(value, nan_ok=True), (step, key)


def test_a_resumed_run_continues_the_saved_wandb_run_and_a_fresh_one_starts_anew(tmp_path, wandb_env,
                                                                                   monkeypatch):
    monkeypatch.delenv("WANDB_DIR")   # unset: the runs go under the output dir
    out = str(tmp_path / "run")
    cfg = wandb_config(out)
    first = RunLogger(out, max_steps=4, show_progress=False, config=cfg)
    for step in (1, 2, 3):   # interrupted after step 3; the checkpoint is at step 2
        first.log(step, {"reward/mean": float(step)})
    first.finish()
    run_id = open(os.path.join(out, WANDB_ID_FILE)).read().strip()

    resumed = RunLogger(out, max_steps=4, start_step=2, show_progress=False, config=cfg)
    for step in (3, 4):
        resumed.log(step, {"reward/mean": 10.0 * step})
    resumed.finish()
    flush_wandb()
    assert open(os.path.join(out, WANDB_ID_FILE)).read().strip() == run_id
    before, after = offline_runs(out, run_id)
    assert before["run"].display_name == "run"   # wandb_run_name '' = the output dir's name
    assert before["history"] == {s: {"reward/mean": float(s)} for s in (1, 2, 3)}
    assert after["history"] == {3: {"reward/mean": 30.0}, 4: {"reward/mean": 40.0}}

    fresh = RunLogger(out, max_steps=1, show_progress=False, config=cfg)   # start_step 0: a new run
    fresh.finish()
    assert open(os.path.join(out, WANDB_ID_FILE)).read().strip() != run_id


def test_only_the_main_process_starts_a_wandb_run(tmp_path, wandb_env):
    out = str(tmp_path / "run")
    other_rank = RunLogger(out, max_steps=2, show_progress=False, main=False, config=wandb_config(out))
    other_rank.log(1, {"reward/mean": 1.0})
    other_rank.finish()
    assert other_rank.wandb is None and not os.path.exists(out)
    assert not glob.glob(os.path.join(wandb_env, "wandb", "*run-*"))
