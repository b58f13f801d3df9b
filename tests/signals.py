"""Interrupt a real `tsopsd` subprocess at a chosen moment, found from what it prints or writes.

    p = run_and_signal(["reheat", ...], when=lambda line: "step 2/6" in line, sig=signal.SIGINT)

No hooks in the product: the test watches stderr lines (and files) as a user would, and signals the
process when its predicate first holds. `delay` lets the signal land a little later (mid-step).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Result:
    returncode: int
    stderr: str
    signalled: bool


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def run_and_signal(args: list, *, when: Callable[[str], bool] | None = None,
                   when_file: Callable[[], bool] | None = None, sig: int = signal.SIGINT, delay: float = 0.0,
                   launcher: list[str] | None = None, tree: bool = False, timeout: float = 300,
                   cwd: str | os.PathLike | None = None) -> Result:
    """Run ``python -m tsopsd ARGS`` (or `launcher` + args); send `sig` once `when(line)` or `when_file()` holds.

    Args:
        tree: signal the process and all its descendants (a launcher and its workers, which torchrun
            starts in sessions of their own).
    """
    cmd = (launcher or [sys.executable, "-m", "tsopsd"]) + [str(a) for a in args]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env(),
                         start_new_session=True, cwd=cwd)
    lines: list[str] = []
    fired = threading.Event()

    def fire() -> None:
        if fired.is_set():
            return
        fired.set()
        if delay:
            time.sleep(delay)
        try:
            for pid in [p.pid, *descendants(p.pid)] if tree else [p.pid]:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def read() -> None:
        for line in p.stderr:
            lines.append(line)
            if when is not None and when(line):
                fire()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < deadline:
        if when_file is not None and not fired.is_set() and when_file():
            fire()
        time.sleep(0.005)
    if p.poll() is None:
        for pid in [p.pid, *descendants(p.pid)]:
            os.kill(pid, signal.SIGKILL)
    p.wait()
    reader.join(timeout=10)
    return Result(returncode=p.returncode, stderr="".join(lines), signalled=fired.is_set())


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out
