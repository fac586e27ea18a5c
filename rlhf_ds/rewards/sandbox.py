"""A built-in reward that runs the response as a Python program against stdin/stdout test cases.

``code_tests`` (registry name) pays 1.0 when the response, a Python program (a surrounding ```python
fence is stripped), prints the expected output for every test case of the sample's answer and the
response ended on eos; else 0.0. A truncated response is not run, as ``exact_match`` does not pay one.
The answer is JSON, ``[{"stdin": "...", "stdout": "..."}, ...]``; outputs are compared with trailing
whitespace (of each line and of the whole output) ignored. A malformed answer raises ``ValueError``.

Each test case runs ``python -I main.py`` in a temporary directory of its own (deleted afterwards), in a
session of its own whose whole process group is killed when the program ends or times out, with a
minimal environment (no secrets of the trainer) and stdin, stdout and stderr in files. A launcher sets
the limits, then execs the program (limits survive exec; subprocess's preexec_fn is unsafe in a process
with threads, such as a reward worker): address space (``memory_limit_mb``), CPU time (the timeout
plus a second), size of any file written (16 MiB, stdout included), no core files, and death with its
parent (``PR_SET_PDEATHSIG``), since a reward worker killed on timeout does not reach another session.

Test cases run one after another and stop at the first that does not pass, so a call takes up to
samples x tests x ``timeout_s``: raise ``reward.timeout_s`` to match. Like the reward workers, this
confines accidents, not an attacker: the program runs as the trainer's user and may read its files or
use the network (use a container for untrusted code), and a program's own children outlive it if the
reward worker is killed mid-run.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from rlhf_ds.rewards.processes import kill_process_group, minimal_env

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_LIMIT_MB = 512
_MAX_FILE_BYTES = 16 * 2**20
_STDERR_TAIL_CHARS = 2000


class Outcome(str, enum.Enum):
    PASSED = "passed"  # every test case printed the expected output
    FAILED = "failed"  # ran to a zero exit status, wrong output
    ERROR = "error"  # non-zero exit status: an exception, a syntax error, sys.exit(1), a fatal signal
    TIMEOUT = "timeout"  # past the wall-clock timeout or the CPU-time limit
    OUT_OF_MEMORY = "out_of_memory"  # MemoryError, or killed for memory


@dataclass(frozen=True)
class ProgramResult:
    outcome: Outcome
    stderr_tail: str = ""  # of the first test case that did not pass; empty when all passed
    failed_test: int | None = None  # index of that test case


class StdioTest(NamedTuple):
    stdin: str
    stdout: str


def parse_tests(answer: str) -> list[StdioTest]:
    """The test cases of an answer ``[{"stdin": "...", "stdout": "..."}, ...]``; ValueError saying what is
    wrong."""
    try:
        raw = json.loads(answer)
    except json.JSONDecodeError as err:
        raise ValueError(f"test cases are not JSON ({err}): {answer[:100]!r}") from None
    if not isinstance(raw, list):
        raise ValueError(f'test cases must be a JSON list of {{"stdin": ..., "stdout": ...}} objects, got '
                         f"a {type(raw).__name__}: {answer[:100]!r}")
    if not raw:
        raise ValueError("the list of test cases is empty")
    for k, case in enumerate(raw):
        if not (isinstance(case, dict) and all(isinstance(case.get(f), str) for f in ("stdin", "stdout"))):
            raise ValueError(f'test case {k} is not an object with string "stdin" and "stdout": '
                             f"{case!r:.100}")
    return [StdioTest(case["stdin"], case["stdout"]) for case in raw]


_FENCED = re.compile(r"\s*```(?:python|py)?[ \t]*\n(.*?)\n?[ \t]*```\s*", re.DOTALL)


def extract_program(response: str) -> str:
    """The program of a response: the inside of a ```python fenced block around all of it, else all of it."""
    match = _FENCED.fullmatch(response)
    return match.group(1) if match else response


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]


# Runs between the fork and the program, with only os, resource and ctypes imported.
_LAUNCHER = """\
import ctypes, os, resource, sys
parent, memory, cpu, file_size = map(int, sys.argv[1:5])
if sys.platform == "linux":
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL
if os.getppid() != parent:
    os._exit(137)  # the parent died before prctl
def cap(kind, soft, hard):
    ceiling = resource.getrlimit(kind)[1]
    if ceiling != resource.RLIM_INFINITY:
        soft, hard = min(soft, ceiling), min(hard, ceiling)
    resource.setrlimit(kind, (soft, hard))
if memory:
    cap(resource.RLIMIT_AS, memory, memory)
cap(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL a second later
cap(resource.RLIMIT_FSIZE, file_size, file_size)
cap(resource.RLIMIT_CORE, 0, 0)
os.execv(sys.executable, [sys.executable, "-I", "main.py"])
"""

_OUT_OF_MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc")


def _judge(returncode: int, timed_out: bool, stdout: str, stderr: str, expected: str) -> Outcome:
    if timed_out or returncode == -signal.SIGXCPU:
        return Outcome.TIMEOUT
    # SIGKILL that is not our timeout's comes from the kernel's OOM killer
    out_of_memory = returncode == -signal.SIGKILL or any(m in stderr for m in _OUT_OF_MEMORY_MARKERS)
    if returncode != 0 and out_of_memory:
        return Outcome.OUT_OF_MEMORY
    if returncode != 0:
        return Outcome.ERROR
    return Outcome.PASSED if _lines(stdout) == _lines(expected) else Outcome.FAILED


def _run_case(program: str, case: StdioTest, timeout_s: float, memory_limit_mb: int) -> tuple[Outcome, str]:
    with tempfile.TemporaryDirectory(prefix="rlhf_ds_program_") as workdir:
        work = Path(workdir)
        (work / "main.py").write_text(program)
        (work / "stdin.txt").write_text(case.stdin)
        argv = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), str(memory_limit_mb * 2**20),
                str(math.ceil(timeout_s) + 1), str(_MAX_FILE_BYTES)]
        with open(work / "stdin.txt", "rb") as stdin, open(work / "stdout.txt", "wb") as stdout, \
                open(work / "stderr.txt", "wb") as stderr:
            process = subprocess.Popen(argv, cwd=work, stdin=stdin, stdout=stdout, stderr=stderr,
                                       env=minimal_env(HOME=workdir, TMPDIR=workdir), start_new_session=True)
        timed_out = False
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_process_group(process)  # on timeout, and whatever it left running in the background
        output = (work / "stdout.txt").read_text(errors="replace")
        errors = (work / "stderr.txt").read_text(errors="replace")
    if process.returncode < 0:
        errors += f"\n[killed by {signal.Signals(-process.returncode).name}]"
    return _judge(process.returncode, timed_out, output, errors, case.stdout), errors[-_STDERR_TAIL_CHARS:]


def run_program(code: str, tests: Sequence[StdioTest], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB) -> ProgramResult:
    """Run the Python program ``code`` on each test case in turn, until one does not pass.

    timeout_s: wall-clock limit of each test case (its CPU-time limit is one second more);
    memory_limit_mb: address-space limit (0 = none).
    """
    for k, case in enumerate(tests):
        outcome, stderr_tail = _run_case(code, case, timeout_s, memory_limit_mb)
        if outcome is not Outcome.PASSED:
            return ProgramResult(outcome, stderr_tail, k)
    return ProgramResult(Outcome.PASSED)


def code_tests(prompts: list[str], responses: list[str], answers: list[str], finished: list[bool]
               ) -> list[float]:
    """1.0 when the response is a program that passes every test case of its answer and ended on eos."""
    scores = []
    for response, answer, done in zip(responses, answers, finished, strict=True):
        try:
            tests = parse_tests(answer)
        except ValueError as err:
            raise ValueError(f"code_tests: bad answer: {err}") from None
        passed = done and run_program(extract_program(response), tests).outcome is Outcome.PASSED
        scores.append(1.0 if passed else 0.0)
    return scores
