"""The process a command runs in, set up once at start: what `tsopsd`'s `main` does before any work.

    utf8_mode()        # re-run under `-X utf8` where the locale is not UTF-8
    on_bus_error()     # a truncated memory-mapped weights file: one line, exit 2, not a silent death
    cuda_allocator()   # expandable segments unless the user chose allocator settings
    shield = ignore_signals(); ...; restore_signals(shield)   # once OUT is written
"""

from __future__ import annotations

import os
import sys


def ignore_signals() -> dict:
    """SIGINT and SIGTERM ignored until `restore_signals` (main thread only: where handlers are set); returns the
    handlers they replaced."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(previous: dict) -> None:
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler)


def cuda_allocator() -> None:
    """Expandable segments for PyTorch's CUDA allocator unless the user chose settings: a reheat allocates
    rollout, training and measuring buffers of changing sizes in turn, and fixed segments fragment
    (docs/performance.md). Read when CUDA first allocates, so set before any work."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def utf8_mode() -> None:
    """Run in Python's UTF-8 mode where the locale is not UTF-8 (LC_ALL=C on a cluster node): file names,
    tables and logs then read and write UTF-8, as under any UTF-8 locale. Done by starting again, once,
    with `-X utf8`; the arguments keep their bytes."""
    if sys.flags.utf8_mode or sys.getfilesystemencoding().lower().replace("-", "") == "utf8":
        return
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-X", "utf8", "-m", "tsopsd", *sys.argv[1:]])


def on_bus_error() -> None:
    """One line and exit 2 on SIGBUS instead of a silent death: it comes from a memory-mapped weights file
    truncated or rewritten while tsopsd reads it, which no Python code can catch."""
    import ctypes
    import signal

    message = (b"tsopsd: error: a memory-mapped file (checkpoint weights) was truncated or rewritten while it was "
               b"read (bus error): rerun once the checkpoint is complete\n")

    def handler(signum):  # runs inside the C signal handler: one write, then out at once (no cleanup, no unwinding)
        os.write(2, message)
        os._exit(2)

    try:
        callback = ctypes.CFUNCTYPE(None, ctypes.c_int)(handler)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.signal(signal.SIGBUS, ctypes.cast(callback, ctypes.c_void_p))
    except (OSError, AttributeError):  # no libc by that name: keep the default
        return
    _keep.append(callback)  # the C side holds only a pointer


_keep: list = []
