"""Synthetic tasks (arithmetic, word problems): answers, splits, determinism, SFT view, JSONL export."""

import re
from types import SimpleNamespace

import numpy as np
import pytest

from rlhf_ds.data.prompts import load_prompt_dataset, load_run_records
from rlhf_ds.data.tasks import (
    HELDOUT_FRACTION,
    TASKS,
    ArithmeticTask,
    generate_split,
    get_task,
    is_heldout,
    write_split_jsonl,
)
from rlhf_ds.data.word_problems import WORD_PROBLEMS
from rlhf_ds.models.tiny import build_char_tokenizer
from rlhf_ds.rewards.functions import final_number

ARITHMETIC = sorted(name for name, task in TASKS.items() if isinstance(task, ArithmeticTask))


def test_problem_format_and_answers_by_hand():
    task = get_task("multiplication")
    assert task.size == 900 * 9
    assert task.record(0).prompt == "100*1=" and task.record(0).answer == "100"
    # index = (a - 100) * 9 + (b - 1): 123*4 is index 23 * 9 + 3
    record = task.record(23 * 9 + 3)
    assert (record.prompt, record.answer) == ("123*4=", "492")
    last = task.record(task.size - 1)
    assert (last.prompt, last.answer) == ("999*9=", "8991")
    add = get_task("addition")
    assert add.record(0).prompt == "100+100=" and add.record(add.size - 1).answer == "1998"


@pytest.mark.parametrize("name", ARITHMETIC)
def test_every_record_is_correct_and_operands_have_the_right_digits(name):
    task = TASKS[name]
    pattern = re.compile(rf"(\d{{{task.digits_a}}})\{task.op}(\d{{{task.digits_b}}})=")
    for record in generate_split(name, "train", 200, seed=0) + generate_split(name, "eval", 50, seed=0):
        match = pattern.fullmatch(record.prompt)
        assert match and match.group(1)[0] != "0" and match.group(2)[0] != "0", record.prompt
        a, b = int(match.group(1)), int(match.group(2))
        assert record.answer == str(a + b if task.op == "+" else a * b)
        assert set(record.prompt + record.answer) <= set(task.alphabet)


def test_splits_are_disjoint_and_cover_the_whole_space():
    train = generate_split("addition_2d", "train", None, seed=4)
    held_out = generate_split("addition_2d", "eval", None, seed=4)
    train_p, eval_p = {r.prompt for r in train}, {r.prompt for r in held_out}
    assert len(train_p) == len(train) and len(eval_p) == len(held_out)  # no duplicates
    assert not train_p & eval_p
    assert len(train_p) + len(eval_p) == 90 * 90
    assert abs(len(eval_p) / 8100 - HELDOUT_FRACTION) < 0.02


def test_heldout_set_does_not_depend_on_requested_sizes():
    small = {r.prompt for r in generate_split("addition", "eval", 30, seed=2)}
    big_train = {r.prompt for r in generate_split("addition", "train", 20_000, seed=2)}
    assert not small & big_train
    # Membership is a pure function of (index, seed): the same index never changes side.
    idx = np.arange(5000)
    assert np.array_equal(is_heldout(idx, 2), is_heldout(idx[::-1], 2)[::-1])
    assert not np.array_equal(is_heldout(idx, 2), is_heldout(idx, 3))


def test_same_seed_same_problems_other_seed_differs():
    a = generate_split("multiplication", "train", 100, seed=0)
    b = generate_split("multiplication", "train", 100, seed=0)
    c = generate_split("multiplication", "train", 100, seed=1)
    assert a == b and a != c


def test_too_many_examples_and_bad_names():
    with pytest.raises(ValueError, match="has only"):
        generate_split("multiplication", "eval", 5000, seed=0)
    with pytest.raises(ValueError, match=r"valid splits: \['train', 'eval'\]"):
        generate_split("multiplication", "test", 10)
    with pytest.raises(ValueError, match="valid tasks") as err:
        get_task("subtraction")
    assert all(name in str(err.value) for name in TASKS)


def test_large_space_sampling_is_fast_and_distinct():
    records = generate_split("addition_4d", "train", 2000, seed=0)  # 81 M problems: no full permutation
    assert len({r.prompt for r in records}) == 2000


def test_sft_examples_tokenize_to_bos_prompt_then_answer_eos():
    from rlhf_ds.trainer.warm_start import encode_examples

    tok = build_char_tokenizer()
    records = generate_split("multiplication", "train", 3, seed=0)
    prompts, completions = encode_examples(tok, records)
    for record, prompt_ids, completion_ids in zip(records, prompts, completions, strict=True):
        ids = prompt_ids + completion_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids
        assert len(prompt_ids) == 1 + len(record.prompt) and len(completion_ids) == len(record.answer) + 1
        assert tok.decode(ids, skip_special_tokens=True) == record.prompt + record.answer


# --- word problems -------------------------------------------------------------------------------------

_STEP = re.compile(r"(\d+) ([+*-]) (\d+) = (\d+)")


def test_word_problem_by_hand():
    # index 0: the first template, first person and item, smallest operands
    first = WORD_PROBLEMS.record(0)
    assert first.prompt == "Tom has 2 apples. He buys 2 more. How many apples does he have now?"
    assert first.answer == "2 + 2 = 4. #### 4"
    # the two-step template of the issue: Tom, 3 boxes of 4 apples, eats 2
    template = WORD_PROBLEMS.templates[3]
    prompt, answer = WORD_PROBLEMS.texts(3, 0, 0, (3, 4, 2))
    assert prompt == "Tom has 3 boxes of 4 apples. He eats 2. How many apples are left?"
    assert answer == "3 * 4 = 12 apples. 12 - 2 = 10. #### 10"
    assert template.operands(template.num_operands - 1) == (9, 9, 8)
    assert WORD_PROBLEMS.size == sum(36 * t.num_operands for t in WORD_PROBLEMS.templates)
    with pytest.raises(IndexError, match="outside"):
        WORD_PROBLEMS.record(WORD_PROBLEMS.size)


def test_every_word_problem_solution_is_right_and_ends_with_its_number():
    """Every step of every worked solution is correct arithmetic, each step starts from the previous
    result, the result after #### is the last step's, and numbers stay small."""
    for index in range(WORD_PROBLEMS.size):
        record = WORD_PROBLEMS.record(index)
        steps = _STEP.findall(record.answer)
        assert steps, record.answer
        for k, (a, op, b, result) in enumerate(steps):
            a, b, result = int(a), int(b), int(result)
            assert result == {"+": a + b, "-": a - b, "*": a * b}[op], record.answer
            assert 0 < result <= 81
            if k:
                assert a == int(steps[k - 1][3]), record.answer
        assert record.answer.endswith(f"#### {steps[-1][3]}") and final_number(record.answer) == steps[-1][3]
        assert all(int(n) <= 30 for n in re.findall(r"\d+", record.prompt)), record.prompt


def test_word_problem_splits_are_disjoint_seeded_and_cover_the_space():
    train = generate_split("word_problems", "train", None, seed=3)
    held_out = generate_split("word_problems", "eval", None, seed=3)
    train_p, eval_p = {r.prompt for r in train}, {r.prompt for r in held_out}
    assert len(train_p) == len(train) and len(eval_p) == len(held_out) and not train_p & eval_p
    assert len(train_p) + len(eval_p) == WORD_PROBLEMS.size
    assert generate_split("word_problems", "eval", 50, seed=3) == generate_split("word_problems", "eval", 50, seed=3)
    assert generate_split("word_problems", "eval", 50, seed=3) != generate_split("word_problems", "eval", 50, seed=4)


def test_a_run_reads_word_problems_from_the_registry_and_from_jsonl(tmp_path):
    data = SimpleNamespace(train_path="synthetic:word_problems", eval_path="", prompt_key="prompt",
                           answer_key="answer", num_train=20000, num_eval=64, task_seed=7)
    train, held_out = load_run_records(data)
    assert (len(train), len(held_out)) == (20000, 64)
    assert not {r.prompt for r in train} & {r.prompt for r in held_out}
    # the same data as files, as a user would point data.train_path / data.eval_path at them
    train_file = write_split_jsonl("word_problems", tmp_path / "train.jsonl", "train", 100, seed=7)
    eval_file = write_split_jsonl("word_problems", tmp_path / "eval.jsonl", "eval", 64, seed=7)
    from_files = load_run_records(SimpleNamespace(**{**vars(data), "train_path": str(train_file),
                                                     "eval_path": str(eval_file)}))
    assert ([(r.prompt, r.answer) for r in from_files[0]]
            == [(r.prompt, r.answer) for r in generate_split("word_problems", "train", 100, seed=7)])
    assert [(r.prompt, r.answer) for r in from_files[1]] == [(r.prompt, r.answer) for r in held_out]
    assert load_prompt_dataset(train_file)[0].meta == {"source": str(train_file), "line": 1}
