"""Stopping a run cleanly: the first SIGTERM / SIGINT asks for a stop at the next safe point (with a
checkpoint), a second one interrupts at once."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """SIGTERM / SIGINT ask the run to stop at its next safe point (a checkpoint is written there); a
    second signal interrupts at once. Yields the flag to poll. Only the main thread can take signals."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum, _frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        print(f"rlhf-ds: {signal.Signals(signum).name}: stopping after this step with a checkpoint "
              f"(again to stop now)", flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested.is_set
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
