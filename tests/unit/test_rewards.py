"""Reward functions and the RewardRunner's failure modes (raise, hang, crash, bad returns), off-thread
too; what a worker cannot do to the run (leave processes behind, exhaust memory or CPU, read secrets, hang
an import, fail every sample unnoticed)."""

import os
import resource
import signal
import threading
import time
from pathlib import Path

import pytest

from rlhf_ds.rewards import REWARD_FUNCTIONS, RewardFunctionError, RewardRunner, load_reward_function
from rlhf_ds.rewards.functions import exact_match, format_reward

USER_FUNCTIONS = '''
import math, os, resource, subprocess, sys, time

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

def boom_on_marker(prompts, responses, answers, finished):
    if "bad" in responses:
        raise ValueError("bad sample")
    return [1.0 for _ in responses]

def _spawn_sleeper(pid_file):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(pid_file, "w") as f:
        f.write(str(child.pid))

def spawn_and_hang(prompts, responses, answers, finished):
    _spawn_sleeper(answers[0])  # the answer names the file that gets the child's pid
    time.sleep(60)

def spawn_and_return(prompts, responses, answers, finished):
    _spawn_sleeper(answers[0])
    return [1.0 for _ in responses]

def hog_on_marker(prompts, responses, answers, finished):
    held = []
    while "hog" in responses:
        held.append(bytearray(50 * 2**20))  # calloc: address space, hardly any real memory
    return [1.0 for _ in responses]

def spin(prompts, responses, answers, finished):
    while True:
        pass

def limits(prompts, responses, answers, finished):
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_left = resource.getrlimit(resource.RLIMIT_CPU)[0] - usage.ru_utime - usage.ru_stime
    return [resource.getrlimit(resource.RLIMIT_AS)[0], cpu_left] + [0.0] * (len(responses) - 2)

def env_probe(prompts, responses, answers, finished):
    # an answer "NAME" scores 1.0 when NAME is set, "NAME=value" when it is set to value
    return [float(os.environ.get(a.partition("=")[0]) == a.partition("=")[2]) if "=" in a
            else float(a in os.environ) for a in answers]
'''

SLOW_IMPORT = '''
import time
time.sleep(1.5)

def one(prompts, responses, answers, finished):
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
    assert load_reward_function("rlhf_ds.rewards.functions:format_reward") is format_reward
    assert load_reward_function(f"{user_file}:length")([], ["abc"], [], []) == [3.0]


def test_runner_argument_checks():
    with pytest.raises(ValueError, match="2 reward weights for 1 functions"):
        RewardRunner(["exact_match"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="num_workers"):
        RewardRunner(["exact_match"], num_workers=0)
    with pytest.raises(ValueError, match=r"max_failure_fraction must be in \[0, 1\]"):
        RewardRunner(["exact_match"], max_failure_fraction=1.5)
    with pytest.raises(ValueError, match="memory_limit_mb and cpu_time_limit_s >= 0"):
        RewardRunner(["exact_match"], memory_limit_mb=-1)
    with pytest.raises(ValueError, match="import_timeout_s > 0"):
        RewardRunner(["exact_match"], import_timeout_s=0)
    runner = RewardRunner(["exact_match"])
    with pytest.raises(ValueError, match="differ in length"):
        runner(PROMPTS, RESPONSES[:2], ANSWERS, FINISHED)


# Failing on every sample is the point of these tests, not a reason to stop the run.
TOLERANT = {"max_failure_fraction": 1.0}


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
    with RewardRunner(["exact_match", f"{user_file}:boom"], failure_value=-1.0, num_workers=2,
                      **TOLERANT) as runner:
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
                      num_workers=1, **TOLERANT) as runner:
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
        with RewardRunner(["exact_match", f"{user_file}:hang"], timeout_s=0.5, num_workers=1,
                          **TOLERANT) as runner:
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
    with RewardRunner(["exact_match", f"{user_file}:crash"], num_workers=1, **TOLERANT) as runner:
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


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie runs no more; it only waits for whoever reaps it


def gone_within(pid, seconds=3.0):
    """True once ``pid`` has stopped running; False (and kill it, not to leak it) after ``seconds``."""
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return False
        time.sleep(0.05)
    return True


def test_timeout_kills_the_processes_the_function_spawned(user_file, tmp_path):
    pid_file = tmp_path / "child.pid"
    with RewardRunner([f"{user_file}:spawn_and_hang"], timeout_s=1.0, num_workers=1, **TOLERANT) as runner:
        _, stats = runner(["p"], ["r"], [str(pid_file)], [True])
        assert stats["timeouts"] == 1
        assert gone_within(int(pid_file.read_text()))  # not only the worker: its whole process group


def test_close_kills_what_a_function_left_running(user_file, tmp_path):
    pid_file = tmp_path / "child.pid"
    runner = RewardRunner([f"{user_file}:spawn_and_return"], num_workers=1)
    assert runner(["p"], ["r"], [str(pid_file)], [True])[0] == [1.0]
    child = int(pid_file.read_text())
    assert _alive(child)  # the call returned and left its child running...
    runner.close()
    assert gone_within(child)  # ...until close


def test_unbounded_allocation_is_stopped_by_the_memory_limit(user_file, caplog):
    with RewardRunner(["exact_match", f"{user_file}:hog_on_marker"], timeout_s=5.0, memory_limit_mb=256,
                      num_workers=1, **TOLERANT) as runner:
        scores, stats = _score(runner, ["hog", "5", " 6 ", "8"])
        assert scores == [0.0, 0.0, 1.0, 0.0]
        # a MemoryError in the call, well before the timeout
        assert stats["hog_on_marker/failures"] == 1 and stats["timeouts"] == 0
        assert "MemoryError" in caplog.text
        scores, stats = _score(runner)  # the runner scores the next batch as usual
        assert scores == [2.0, 1.0, 2.0, 1.0] and stats["failures"] == 0


def test_cpu_time_limit_kills_a_spinning_worker_which_is_replaced(user_file, caplog):
    with RewardRunner(["exact_match", f"{user_file}:spin"], timeout_s=8.0, cpu_time_limit_s=1,
                      num_workers=1, **TOLERANT) as runner:
        scores, stats = _score(runner)
        assert scores == [1.0, 0.0, 1.0, 0.0]
        assert stats["spin/failures"] == 1 and stats["timeouts"] == 0  # SIGXCPU, not the wall clock
        assert f"exited with code {-signal.SIGXCPU}" in caplog.text


def test_workers_run_under_the_configured_limits(user_file):
    with RewardRunner([f"{user_file}:limits"], memory_limit_mb=300, cpu_time_limit_s=7,
                      num_workers=1) as runner:
        (address_space, cpu_left), _ = runner(["p"] * 2, ["r"] * 2, ["a"] * 2, [True] * 2)
    assert address_space == 300 * 2**20
    assert 6.0 < cpu_left <= 8.0  # renewed per message: 7 s more than the worker had used
    with RewardRunner([f"{user_file}:limits"], memory_limit_mb=0, cpu_time_limit_s=0,
                      num_workers=1) as runner:
        (address_space, cpu_left), _ = runner(["p"] * 2, ["r"] * 2, ["a"] * 2, [True] * 2)
    assert address_space == resource.getrlimit(resource.RLIMIT_AS)[0]  # 0: the trainer's own limit


def test_workers_get_a_minimal_environment(user_file, monkeypatch):
    monkeypatch.setenv("RLHF_DS_TEST_TOKEN", "secret")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.setenv("HOME", "/home/someone")
    probes = ["RLHF_DS_TEST_TOKEN", "OMP_NUM_THREADS=1", "HOME=/home/someone", "PATH"]
    with RewardRunner([f"{user_file}:env_probe"], num_workers=1) as runner:
        scores, _ = runner(["p"] * 4, ["r"] * 4, probes, [True] * 4)
    assert scores == [0.0, 1.0, 1.0, 1.0]  # no secret; one OpenMP thread; HOME and PATH passed on


def test_import_has_its_own_timeout(tmp_path):
    path = tmp_path / "slow_import.py"
    path.write_text(SLOW_IMPORT)
    # a 1.5 s import does not count against the 1 s call timeout
    with RewardRunner([f"{path}:one"], timeout_s=1.0, num_workers=1) as runner:
        scores, stats = _score(runner)
    assert scores == [1.0] * 4 and stats["timeouts"] == 0
    with RewardRunner([f"{path}:one"], timeout_s=1.0, import_timeout_s=0.5, num_workers=1) as runner:
        with pytest.raises(RewardFunctionError,
                           match=r"importing .*/slow_import\.py took longer than import_timeout_s=0\.5 s"):
            _score(runner)


@pytest.mark.parametrize("name,kind", [("boom", "raised"), ("hang", "timeout")])
def test_a_function_failing_every_sample_stops_the_run(user_file, name, kind):
    with RewardRunner(["exact_match", f"{user_file}:{name}"], timeout_s=0.5, num_workers=2) as runner:
        message = (rf"my_rewards.py:{name}': 4 of 4 samples \(100%\) failed or timed out in one step, "
                   r"more than max_failure_fraction=0.5")
        with pytest.raises(RewardFunctionError, match=message) as err:
            _score(runner)
    assert f"first problem ({kind})" in str(err.value)
    assert name != "boom" or "ValueError: boom" in str(err.value)  # the function's own traceback


def test_failure_fraction_up_to_the_limit_is_tolerated(user_file):
    responses = ["bad", "x", "y", "z"]  # 2 workers: the call holding "bad" (2 of 4 samples) raises
    with RewardRunner([f"{user_file}:boom_on_marker"], failure_value=-1.0, num_workers=2) as runner:
        scores, stats = _score(runner, responses)
    assert scores == [-1.0, -1.0, 1.0, 1.0] and stats["failures"] == 1  # 50% is not more than 0.5
    with RewardRunner([f"{user_file}:boom_on_marker"], max_failure_fraction=0.25, num_workers=2) as runner:
        with pytest.raises(RewardFunctionError, match=r"2 of 4 samples \(50%\).*max_failure_fraction=0.25"):
            _score(runner, responses)


def test_a_worker_killed_between_calls_is_replaced(user_file):
    with RewardRunner(["exact_match"], num_workers=1) as runner:
        _score(runner)
        dead = runner._workers[0].process
        dead.kill()
        dead.wait()
        assert _score(runner)[0] == [1.0, 0.0, 1.0, 0.0]
        assert runner._workers[0].process.pid != dead.pid


def test_final_number_match_reads_worked_solutions():
    from rlhf_ds.rewards.functions import REWARD_FUNCTIONS, final_number

    assert final_number("Natalia sold 48/2 = 24 clips in May.\n#### 72") == "72"
    assert final_number("so 1,234 apples.") == "1234" and final_number("x = -3.0") == "-3"
    assert final_number("no digits here") is None
    fn = REWARD_FUNCTIONS["final_number"]
    answers = ["She sold 48 + 24 = 72 clips.\n#### 72"] * 4
    responses = ["48 + 24 = 72, so the answer is 72", "The answer is 72", "The answer is 71", "no answer"]
    # eos required: the second response is right but never stopped
    assert fn([""] * 4, responses, answers, [True, False, True, True]) == [1.0, 0.0, 0.0, 0.0]
