"""`rlhf-ds serve-reward` as a user starts it, for the tests (tests/conftest.py puts this folder on the path):
a subprocess on a free port of 127.0.0.1, ready once /health answers, stopped with SIGTERM."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port of 127.0.0.1 nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeReward:
    """`rlhf-ds serve-reward SPEC ARGS...` on a free loopback port; ``url`` is its scoring endpoint."""

    def __init__(self, spec: str, *args: str, start_timeout_s: float = 90):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/score"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        env.pop("RLHF_DS_REWARD_TOKEN", None)
        self.process = subprocess.Popen([sys.executable, "-m", "rlhf_ds.cli", "serve-reward", spec, "--port",
                                         str(self.port), *args], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"serve-reward {spec} did not come up: {self.output()}")

    def post(self, body, **kwargs) -> httpx.Response:
        """POST ``body`` (bytes as they are, anything else as JSON) to the scoring endpoint."""
        key = "content" if isinstance(body, bytes) else "json"
        return httpx.post(self.url, timeout=30, **{key: body}, **kwargs)

    def output(self) -> str:
        return self.process.stdout.read() if self.process.stdout and self.process.poll() is not None else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGKILL: as if it crashed) and wait for it."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
