"""The process a command runs in, set up once at start: what `tsopsd`'s `main` does before any work.

    utf8_mode()        # re-run under `-X utf8` where the locale is not UTF-8
    supervise()        # the work in a child, waited on: a truncated memory-mapped file is one line, exit 2
    cuda_allocator()   # expandable segments unless the user chose allocator settings
    shield = ignore_signals(); ...; restore_signals(shield)   # once OUT is written
"""

from __future__ import annotations

import os
import sys

from tsopsd.errors import ExitCode


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


BUS_ERROR = ("tsopsd: error: a memory-mapped file (checkpoint weights) was truncated or rewritten while it was read "
             "(bus error): rerun once the checkpoint is complete")
# What the waiting process passes on to the one that works: everything a user or a scheduler sends to stop, hang up,
# or resize, to the pid they see. The work runs in a session of its own (as dumb-init runs its child): a
# terminal's Ctrl-C reaches it once, through here, and it is never a background job stopped for writing.
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGCONT")


def supervise() -> None:
    """Run the rest of the command in a child process, and wait for it here.

    A memory-mapped weights file truncated or rewritten while it is read kills the reader with SIGBUS, which no
    Python code can catch, and no handler in the dying process can report safely (a handler written in Python
    must take the GIL, which another thread may hold while it waits for the faulting one). The waiting process
    holds nothing: it sees the child's death and says it in one line, exit 2. Any other end is passed on as it
    came: the child's exit code, or death by the same signal. Signals sent to this process go on to the child;
    the child dies with it (a SIGKILL here is a SIGKILL there). Where `fork` is missing it does nothing.
    """
    import signal

    if not hasattr(os, "fork"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        os.setsid()
        _die_with(parent)
        return

    def forward(signum, frame) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    def stop(signum, frame) -> None:  # Ctrl-Z: the child stops with this process, and goes on with it
        forward(signal.SIGSTOP, frame)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, stop)

    for name in FORWARDED:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), forward)
    signal.signal(signal.SIGTSTP, stop)
    _, status = os.waitpid(child, 0)  # its end (a stop is not one)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum == signal.SIGBUS:
            os.write(2, (BUS_ERROR + "\n").encode())
            os._exit(ExitCode.BAD_INPUT)
        if signum != signal.SIGKILL:  # die the way the child died, for whoever waits on this process
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(os.WEXITSTATUS(status))


def _die_with(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux); if it is already gone, now."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl (not Linux): the child outlives a parent killed outright
        return
    if os.getppid() != parent:
        os._exit(128 + signal.SIGKILL)
