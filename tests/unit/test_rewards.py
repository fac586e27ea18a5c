"""Reward functions and the RewardRunner's failure modes (raise, hang, crash, bad returns), off-thread too."""

import threading
import time

import pytest

from rlhf_ds.data.rewards import (REWARD_FUNCTIONS, RewardFunctionError, RewardRunner, exact_match,
                                  format_reward, load_reward_function)

USER_FUNCTIONS = '''
import math, os, time

def length(prompts, responses, answers, finished):
    return [float(len(r)) for r in responses]

def boom(prompts, responses, answers, finished):
    raise ValueError("boom")

def hang(prompts, responses, answers, finished):
    time.sleep(60)

def crash(prompts, responses, answers, finished):
    os._exit(3)

def short(prompts, responses, answers, finished):
    return [1.0] * (len(responses) - 1)

def nan(prompts, responses, answers, finished):
    return [math.nan for _ in responses]

def words(prompts, responses, answers, finished):
    return ["high" for _ in responses]

def hang_on_first_sample_marker(prompts, responses, answers, finished):
    if "slow" in responses:
        time.sleep(60)
    return [1.0 for _ in responses]
'''

PROMPTS = ["1+1=", "2+2=", "3+3=", "4+4="]
RESPONSES = ["2", "5", " 6 ", "8"]
ANSWERS = ["2", "4", "6", "8"]
FINISHED = [True, True, True, False]


def module_level_reward(prompts, responses, answers, finished):
    """A plain callable (pickled by reference into the workers)."""
    return [0.5 for _ in responses]


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FUNCTIONS)
    return path


def _score(runner, responses=RESPONSES):
    return runner(PROMPTS[: len(responses)], responses, ANSWERS[: len(responses)], FINISHED[: len(responses)])


# --- built-in functions (in-process, pure) ------------------------------------------------------------

def test_exact_match_needs_answer_and_eos():
    # right, wrong, right with spaces, right but not finished (truncated: must not be paid)
    assert exact_match(PROMPTS, RESPONSES, ANSWERS, FINISHED) == [1.0, 0.0, 1.0, 0.0]
    assert exact_match(["1+1="], ["22"], ["2"], [True]) == [0.0]  # answer followed by more text


def test_format_reward_is_integer_then_eos():
    responses = ["492", "-3", "4 9", "12=", "", "7"]
    finished = [True] * 5 + [False]
    assert format_reward([""] * 6, responses, [""] * 6, finished) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_spec_errors_list_the_valid_forms(user_file, tmp_path):
    with pytest.raises(RewardFunctionError) as err:
        RewardRunner(["exact_matsh"])
    assert all(name in str(err.value) for name in REWARD_FUNCTIONS)
    assert "path/to/file.py:function" in str(err.value)
    with pytest.raises(RewardFunctionError, match="does not exist"):
        RewardRunner([f"{tmp_path}/missing.py:fn"])
    # The error lists what the file does define.
    with pytest.raises(RewardFunctionError, match=r"no function 'lenght'; callables there: \[.*'length'"):
        load_reward_function(f"{user_file}:lenght")
    assert load_reward_function("rlhf_ds.data.rewards:format_reward") is format_reward
    assert load_reward_function(f"{user_file}:length")([], ["abc"], [], []) == [3.0]


def test_runner_argument_checks():
    with pytest.raises(ValueError, match="2 reward weights for 1 functions"):
        RewardRunner(["exact_match"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="num_workers"):
        RewardRunner(["exact_match"], num_workers=0)
    runner = RewardRunner(["exact_match"])
    with pytest.raises(ValueError, match="differ in length"):
        runner(PROMPTS, RESPONSES[:2], ANSWERS, FINISHED)


# --- the runner ----------------------------------------------------------------------------------------

def test_weighted_combination_and_per_function_means(user_file):
    with RewardRunner(["exact_match", "format", f"{user_file}:length", module_level_reward],
                      weights=[2.0, 1.0, 0.5, -1.0], num_workers=2) as runner:
        scores, stats = _score(runner)
    # exact [1,0,1,0], format [1,1,1,0], length [1,1,3,1], module [.5]*4
    assert scores == [2 + 1 + 0.5 - 0.5, 0 + 1 + 0.5 - 0.5, 2 + 1 + 1.5 - 0.5, 0 + 0 + 0.5 - 0.5]
    assert stats["exact_match/mean"] == 0.5 and stats["format/mean"] == 0.75 and stats["length/mean"] == 1.5
    assert stats["module_level_reward/mean"] == 0.5
    assert stats["failures"] == 0 and stats["timeouts"] == 0


def test_batches_split_across_workers_keep_sample_order(user_file):
    responses = [str(10**k) for k in range(7)]  # lengths 1..7
    with RewardRunner([f"{user_file}:length"], num_workers=3) as runner:
        scores, _ = runner(["p"] * 7, responses, ["a"] * 7, [True] * 7)
        assert scores == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
        assert runner([], [], [], []) == ([], {"failures": 0, "timeouts": 0, "length/failures": 0,
                                               "length/timeouts": 0})


def test_raising_function_scores_failure_value_and_is_counted(user_file, caplog):
    with RewardRunner(["exact_match", f"{user_file}:boom"], failure_value=-1.0, num_workers=2) as runner:
        scores, stats = _score(runner)
        assert scores == [1 - 1, 0 - 1, 1 - 1, 0 - 1]  # exact_match unaffected, boom scored -1 everywhere
        assert stats["failures"] == 2 and stats["boom/failures"] == 2  # one per call (2 workers -> 2 calls)
        assert stats["boom/mean"] == -1.0 and stats["exact_match/failures"] == 0
        assert "ValueError: boom" in caplog.text
        # The workers survive and serve the next batch.
        assert _score(runner)[1]["failures"] == 2


def _timed_out_call(runner):
    start = time.perf_counter()
    scores, stats = _score(runner)
    return scores, stats, time.perf_counter() - start


def test_hanging_function_is_stopped_after_timeout_and_worker_replaced(user_file):
    with RewardRunner(["exact_match", f"{user_file}:hang"], timeout_s=0.5, failure_value=0.0,
                      num_workers=1) as runner:
        scores, stats, elapsed = _timed_out_call(runner)
        assert scores == [1.0, 0.0, 1.0, 0.0] and stats["timeouts"] == 1 and stats["hang/timeouts"] == 1
        assert stats["failures"] == 0
        assert elapsed < 5.0  # not the 60 s sleep
        first_pid = runner._workers[0].process.pid
        _, stats, _ = _timed_out_call(runner)
        assert stats["timeouts"] == 1 and runner._workers[0].process.pid != first_pid  # replaced again


def test_timeout_works_from_a_non_main_thread(user_file):
    result = {}

    def score_in_thread():
        with RewardRunner(["exact_match", f"{user_file}:hang"], timeout_s=0.5, num_workers=1) as runner:
            result["first"] = _timed_out_call(runner)
            result["second"] = _timed_out_call(runner)

    thread = threading.Thread(target=score_in_thread)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    for scores, stats, elapsed in result.values():
        assert scores == [1.0, 0.0, 1.0, 0.0] and stats["timeouts"] == 1 and elapsed < 5.0


def test_only_the_hanging_call_times_out(user_file):
    # Samples 0-1 go to one worker, 2-3 to the other; only the call holding "slow" hangs.
    with RewardRunner([f"{user_file}:hang_on_first_sample_marker"], timeout_s=1.0, failure_value=-5.0,
                      num_workers=2) as runner:
        scores, stats = _score(runner, ["slow", "x", "y", "z"])
    assert scores == [-5.0, -5.0, 1.0, 1.0] and stats["timeouts"] == 1


def test_crashing_worker_counts_as_failure_and_is_replaced(user_file):
    with RewardRunner(["exact_match", f"{user_file}:crash"], num_workers=1) as runner:
        scores, stats = _score(runner)
        assert scores == [1.0, 0.0, 1.0, 0.0] and stats["crash/failures"] == 1 and stats["timeouts"] == 0
        assert _score(runner)[1]["failures"] == 1


@pytest.mark.parametrize("name,message", [
    ("short", r"'.*my_rewards.py:short' returned 3 values for a batch of 4"),
    ("nan", r"'.*my_rewards.py:nan' returned non-finite value nan for sample 0"),
    ("words", r"'.*my_rewards.py:words'.*not a sequence of numbers"),
    ("absent", r"'.*my_rewards.py:absent'.*defines no function 'absent'"),
])
def test_contract_violations_raise_naming_the_function(user_file, name, message):
    with RewardRunner(["exact_match", f"{user_file}:{name}"], num_workers=1) as runner:
        with pytest.raises(RewardFunctionError, match=message):
            _score(runner)
        # The runner is left consistent: the same call fails the same way, it does not hang or crash.
        with pytest.raises(RewardFunctionError, match=message):
            _score(runner)


def test_close_stops_the_workers(user_file):
    runner = RewardRunner(["exact_match"], num_workers=2)
    _score(runner)
    processes = [w.process for w in runner._workers]
    assert all(p.poll() is None for p in processes)
    runner.close()
    assert all(p.poll() is not None for p in processes)
    assert _score(runner)[0] == [1.0, 0.0, 1.0, 0.0]  # restarts on demand
    runner.close()


def test_final_number_match_reads_worked_solutions():
    from rlhf_ds.data.rewards import REWARD_FUNCTIONS, final_number

    assert final_number("Natalia sold 48/2 = 24 clips in May.\n#### 72") == "72"
    assert final_number("so 1,234 apples.") == "1234" and final_number("x = -3.0") == "-3"
    assert final_number("no digits here") is None
    fn = REWARD_FUNCTIONS["final_number"]
    answers = ["She sold 48 + 24 = 72 clips.\n#### 72"] * 4
    responses = ["48 + 24 = 72, so the answer is 72", "The answer is 72", "The answer is 71", "no answer"]
    # eos required: the second response is right but never stopped
    assert fn([""] * 4, responses, answers, [True, False, True, True]) == [1.0, 0.0, 0.0, 0.0]
