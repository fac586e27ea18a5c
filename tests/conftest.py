"""What every test tier shares: how `make test` measures line coverage.

`make test` sets COVERAGE_PROCESS_START (pyproject.toml), and coverage's start-up hook measures every
Python process that has it. Tracing slows a process by about half while it imports torch, transformers and
DeepSpeed, which is most of what the e2e and dist tests do, so only the modules marked ``gpu_path`` measure
the processes they start (spawned ranks, Ray workers, vLLM engines): the GPU path (rollout/vllm_*,
engine/gather.py, cluster/ray_group.py, cluster/placement.py) runs there. The pytest process itself is
always measured: the unit tests, and every in-process driver.
"""
import os

import pytest


@pytest.fixture(scope="module", autouse=True)
def _coverage_of_started_processes(request):
    if request.node.get_closest_marker("gpu_path") is not None or "COVERAGE_PROCESS_START" not in os.environ:
        yield
        return
    measured = os.environ.pop("COVERAGE_PROCESS_START")   # what this module starts is not measured
    try:
        yield
    finally:
        os.environ["COVERAGE_PROCESS_START"] = measured


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """Save this process's coverage now: in the pytest process the exit handlers of what the tests started
    (Ray, torch.distributed, vLLM) can end it before coverage's own."""
    try:
        import coverage
    except ImportError:   # the dev extra is not installed: nothing measures
        return
    current = coverage.Coverage.current()
    if current is not None:
        current.save()
