"""The sandboxed code-execution reward: each kind of program gets its own outcome, and a program runs
isolated (limits, minimal environment, private directory) and leaves no process behind."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from rlhf_ds.rewards.sandbox import (Outcome, StdioTest, code_tests, extract_program, parse_tests,
                                      run_program)
from rlhf_ds.rewards import RewardRunner

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
TESTS = [StdioTest("1 2\n", "3\n"), StdioTest("10 -4\n", "6")]


def gone_within(pid, seconds=3.0):
    """True once ``pid`` has stopped running (a zombie runs no more); False, and kill it, after
    ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return False
        time.sleep(0.05)


@pytest.mark.parametrize("code,outcome", [
    (ADD, Outcome.PASSED),
    ("a, b = map(int, input().split())\nprint(a - b)\n", Outcome.FAILED),
    ("raise ValueError('no sum today')\n", Outcome.ERROR),
    ("print(3\n", Outcome.ERROR),  # a syntax error
    ("while True:\n    pass\n", Outcome.TIMEOUT),
    ("import time\ntime.sleep(60)\n", Outcome.TIMEOUT),  # the wall clock, not the CPU limit
    ("held = []\nwhile True:\n    held.append(bytearray(50 * 2**20))\n", Outcome.OUT_OF_MEMORY),
    ("print(len(bytearray(8 * 2**30)))\n", Outcome.OUT_OF_MEMORY),  # fits no 256 MB address space
])
def test_each_kind_of_program_has_its_outcome(code, outcome):
    start = time.monotonic()
    result = run_program(code, TESTS, timeout_s=1.0, memory_limit_mb=256)
    assert result.outcome is outcome, result.stderr_tail
    assert time.monotonic() - start < 4.0  # two test cases at most, and a timeout stops at the first


def test_result_says_which_test_failed_and_why():
    result = run_program("print(3)", TESTS, timeout_s=2.0)  # right for the first test case only
    assert result.outcome is Outcome.FAILED and result.failed_test == 1
    result = run_program("raise ValueError('no sum today')", TESTS, timeout_s=2.0)
    assert result.failed_test == 0 and result.stderr_tail.rstrip().endswith("ValueError: no sum today")
    assert run_program(ADD, TESTS, timeout_s=2.0) == run_program(ADD, TESTS[:1], timeout_s=2.0)


def test_output_comparison_ignores_trailing_whitespace_only():
    expected = [StdioTest("", "1\n2")]
    assert run_program("print('1  ')\nprint('2')\nprint()", expected, timeout_s=2.0).outcome is Outcome.PASSED
    assert run_program("print(' 1')\nprint('2')", expected, timeout_s=2.0).outcome is Outcome.FAILED
    assert run_program("print('1')\nprint()\nprint('2')", expected, timeout_s=2.0).outcome is Outcome.FAILED


def test_program_runs_isolated_and_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_DS_TEST_TOKEN", "secret")
    probe = tmp_path / "probe.json"
    code = (  # leaves a sleeping child and a file behind, and prints the names of secret-looking variables
        "import json, os, subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "open('scratch.txt', 'w').write('x')\n"
        f"json.dump({{'cwd': os.getcwd(), 'child': child.pid}}, open({str(probe)!r}, 'w'))\n"
        "print(sorted(name for name in os.environ if 'TOKEN' in name))\n")
    result = run_program(code, [StdioTest("", "[]")], timeout_s=3.0)
    assert result.outcome is Outcome.PASSED, result.stderr_tail  # no token in its environment
    seen = json.loads(probe.read_text())
    assert Path(seen["cwd"]).name.startswith("rlhf_ds_program_")
    assert not Path(seen["cwd"]).exists()  # its private directory is deleted
    assert gone_within(seen["child"])  # and what it left running is killed


def test_a_worker_killed_mid_program_takes_the_program_along(tmp_path):
    # The program runs in a session of its own, out of reach of the worker's group kill.
    pid_file = tmp_path / "program.pid"
    program = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    answer = json.dumps([{"stdin": "", "stdout": ""}])
    with RewardRunner(["code_tests"], timeout_s=1.5, num_workers=1, max_failure_fraction=1.0) as runner:
        _, stats = runner(["p"], [program], [answer], [True])  # the program's own timeout is 5 s
    assert stats["code_tests/timeouts"] == 1
    assert gone_within(int(pid_file.read_text()))


def test_code_tests_is_a_registered_reward_paying_passed_finished_programs():
    answer = json.dumps([{"stdin": "1 2\n", "stdout": "3"}, {"stdin": "5 5\n", "stdout": "10"}])
    responses = [f"```python\n{ADD}```", "print(3)", ADD, "import os; os.abort()"]
    finished = [True, True, False, True]  # the third is right but was cut at the length limit
    with RewardRunner(["code_tests"], timeout_s=30.0, num_workers=1) as runner:
        scores, stats = runner([""] * 4, responses, [answer] * 4, finished)
    assert scores == [1.0, 0.0, 0.0, 0.0] and stats["failures"] == 0


@pytest.mark.parametrize("answer,message", [
    ("not json", "test cases are not JSON"),
    ('{"stdin": "1", "stdout": "1"}', 'must be a JSON list of {"stdin": ..., "stdout": ...} objects, got a '
                                      "dict"),
    ("[]", "the list of test cases is empty"),
    ('[{"stdin": "1"}]', 'test case 0 is not an object with string "stdin" and "stdout"'),
    ('[{"stdin": "1", "stdout": "1"}, {"stdin": "1", "stdout": 1}]', "test case 1 is not an object"),
])
def test_malformed_test_cases_are_a_clear_error(answer, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_tests(answer)
    with pytest.raises(ValueError, match=r"code_tests: bad answer: .*" + re.escape(message)):
        code_tests([""], ["print(1)"], [answer], [True])


def test_extract_program_strips_only_a_surrounding_fence():
    assert extract_program("```python\nprint(1)\n```") == "print(1)"
    assert extract_program("  ```py\nx = 1\nprint(x)\n```\n") == "x = 1\nprint(x)"
    assert extract_program("```\nprint(1)\n```") == "print(1)"
    assert extract_program("print(1)") == "print(1)"
    text_then_code = "Here:\n```python\nprint(1)\n```"
    assert extract_program(text_then_code) == text_then_code  # not around all of it: left alone
