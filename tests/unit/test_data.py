"""Prompt datasets (JSONL, parquet, HF datasets dirs, synthetic) and the resumable PromptLoader."""

import json
import subprocess
import sys

import pytest

from rlhf_ds.data.prompts import DatasetError, PromptLoader, PromptRecord, load_prompt_dataset

ROWS = [{"prompt": "1+2=", "answer": "3", "id": 0}, {"prompt": "20*3=", "answer": "60", "id": 1},
        {"prompt": "9+9=", "answer": "18", "id": 2}]


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_loads_rows_in_order(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS[:2]] + ["", json.dumps(ROWS[2])])
    records = load_prompt_dataset(path)
    assert [(r.prompt, r.answer) for r in records] == [("1+2=", "3"), ("20*3=", "60"), ("9+9=", "18")]
    assert records[2].meta == {"source": str(path), "line": 4}  # blank line 3 skipped, numbering kept
    assert load_prompt_dataset(path, num_examples=2) == records[:2]


def test_custom_keys(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps({"question": "2+2=", "solution": "4"})])
    records = load_prompt_dataset(path, prompt_key="question", answer_key="solution")
    assert records == [PromptRecord("2+2=", "4")]


@pytest.mark.parametrize("line,expected", [
    ('{"prompt": "1+1=", "answer": "2"', "d.jsonl:2: invalid JSON"),
    ('{"prompt": "1+1="}', "d.jsonl:2: missing key 'answer'; keys present: ['prompt']"),
    ('{"prompt": "1+1=", "answer": 2}', "d.jsonl:2: value of 'answer' must be a string, got int 2"),
    ('["1+1=", "2"]', "d.jsonl:2: expected an object"),
])
def test_jsonl_bad_row_names_file_line_and_problem(tmp_path, line, expected):
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), line, json.dumps(ROWS[1])])
    with pytest.raises(DatasetError) as err:
        load_prompt_dataset(path)
    assert expected in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_missing_key_lists_keys_with_custom_key_names(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0])])
    expected = r"missing key 'question'; keys present: \['answer', 'id', 'prompt'\]"
    with pytest.raises(DatasetError, match=expected):
        load_prompt_dataset(path, prompt_key="question")


def test_parquet_loads_and_bad_row_names_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), good)
    records = load_prompt_dataset(good)
    assert [r.answer for r in records] == ["3", "60", "18"] and records[1].meta["row"] == 1
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["1+2=", "2+2=", "3+3="], "answer": ["3", None, "6"]}), bad)
    expected = r"bad.parquet: row 1: value of 'answer' must be a string, got NoneType"
    with pytest.raises(DatasetError, match=expected):
        load_prompt_dataset(bad)


def test_hf_datasets_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert [r.prompt for r in load_prompt_dataset(tmp_path / "single")] == ["1+2=", "20*3=", "9+9="]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                               "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load_prompt_dataset(tmp_path / "dict")) == 3
    assert len(load_prompt_dataset(tmp_path / "dict", split="test")) == 1
    with pytest.raises(DatasetError, match=r"splits \['test', 'train'\]"):
        load_prompt_dataset(tmp_path / "dict", split="eval")
    datasets.Dataset.from_list([{"prompt": "1=", "answer": 1}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DatasetError, match="row 0: value of 'answer' must be a string"):
        load_prompt_dataset(tmp_path / "bad")


def test_unsupported_and_missing_paths(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_prompt_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("prompt,answer\n")
    with pytest.raises(DatasetError, match=r"unsupported file type '.csv'"):
        load_prompt_dataset(tmp_path / "d.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no records"):
        load_prompt_dataset(tmp_path / "empty.jsonl")


def test_synthetic_source():
    train = load_prompt_dataset("synthetic:multiplication", num_examples=50, task_seed=1)
    held_out = load_prompt_dataset("synthetic:multiplication", split="eval", num_examples=50, task_seed=1)
    assert len(train) == len(held_out) == 50
    assert not {r.prompt for r in train} & {r.prompt for r in held_out}
    with pytest.raises(ValueError, match="valid tasks"):
        load_prompt_dataset("synthetic:division")


# --- PromptLoader ------------------------------------------------------------------------------------

def _records(n):
    return [PromptRecord(f"{i}+0=", str(i)) for i in range(n)]


def test_loader_epochs_cover_every_record_once_and_skip_short_tail():
    loader = PromptLoader(_records(10), batch_size=3, seed=0)
    assert loader.batches_per_epoch == 3
    epoch0 = [r.answer for _ in range(3) for r in loader.next_batch()]
    epoch1 = [r.answer for _ in range(3) for r in loader.next_batch()]
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9  # no repeats inside an epoch, tail of 1 skipped
    assert epoch0 != epoch1  # reshuffled
    assert loader.state_dict()["epoch"] == 1


def test_loader_is_seeded_and_unshuffled_keeps_order():
    a = [r.answer for r in PromptLoader(_records(20), 5, seed=7).next_batch()]
    b = [r.answer for r in PromptLoader(_records(20), 5, seed=7).next_batch()]
    c = [r.answer for r in PromptLoader(_records(20), 5, seed=8).next_batch()]
    assert a == b and a != c
    ordered = PromptLoader(_records(20), 5, shuffle=False)
    assert [r.answer for r in next(ordered)] == ["0", "1", "2", "3", "4"]


def test_loader_resume_continues_at_same_position():
    reference = PromptLoader(_records(11), batch_size=4, seed=3)
    expected = [[r.answer for r in reference.next_batch()] for _ in range(9)]
    first = PromptLoader(_records(11), batch_size=4, seed=3)
    seen = [[r.answer for r in first.next_batch()] for _ in range(4)]  # stops mid-epoch 1
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = PromptLoader(_records(11), batch_size=4, seed=3)
    resumed.load_state_dict(state)
    seen += [[r.answer for r in resumed.next_batch()] for _ in range(5)]
    assert seen == expected


def test_loader_refuses_mismatched_state_and_bad_batch_size():
    state = PromptLoader(_records(10), 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="10 records"):
        PromptLoader(_records(12), 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"batch_size \(data.prompts_per_step\) must be in \[1, 10\]"):
        PromptLoader(_records(10), 11)


def test_data_package_imports_no_heavy_framework():
    code = ("import sys, rlhf_ds.data; "
            "print([m for m in ('ray', 'deepspeed', 'vllm', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
