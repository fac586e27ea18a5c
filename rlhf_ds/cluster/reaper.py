"""A watchdog that outlives a killed driver and stops what was started for it.

A driver killed with SIGKILL (the OOM killer, a scheduler, ``kill -9``) runs no clean-up, and some of the
processes a local Ray starts for it (its dashboard and runtime-env agents) do not exit when their raylet
is gone. The reaper is a small process in a session of its own: while the driver lives, it notes the
driver's descendants once a second (pid and start time); when the driver is gone, it kills those still
alive (the start time guards against a reused pid) and exits. After a clean shutdown there is nothing
left to kill, and it simply exits.

Linux only (it reads ``/proc``); elsewhere ``start_reaper`` does nothing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

_POLL_S = 1.0


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]   # field 22 of stat: start time since boot


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    return children


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` -> its start time."""
    children, out, todo = _children_by_parent(), {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            started = _start_time(child)
            if started is not None and child not in out:
                out[child] = started
                todo.append(child)
    return out


def watch(driver: int) -> None:
    """The reaper's loop (runs in its own process)."""
    driver_started, me = _start_time(driver), os.getpid()
    seen: dict[int, str] = {}
    while _start_time(driver) == driver_started and driver_started is not None:
        seen.update(descendants(driver))
        seen = {pid: started for pid, started in seen.items() if _start_time(pid) == started and pid != me}
        time.sleep(_POLL_S)
    for pid, started in seen.items():
        if _start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def start_reaper() -> None:
    """Watch this process; no-op where there is no ``/proc``."""
    if not os.path.isdir("/proc/self"):
        return
    code = f"from rlhf_ds.cluster.reaper import watch; watch({os.getpid()})"
    subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
