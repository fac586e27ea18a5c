"""What every test tier shares: the pytest process saves its line coverage when the session ends.

`make test` measures every Python process (COVERAGE_PROCESS_START, pyproject.toml). Coverage saves a
process's data from an exit handler; in the pytest process the exit handlers of what the tests started
(Ray, torch.distributed, vLLM) can end it first, and the unit tests' coverage would be lost with it.
"""
import pytest


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    try:
        import coverage
    except ImportError:   # the dev extra is not installed: nothing measures
        return
    current = coverage.Coverage.current()
    if current is not None:
        current.save()
