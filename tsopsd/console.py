"""Console output: logging through one Rich handler, progress bars, tables; all on stderr.

stdout is reserved for results (`--json` prints exactly one object there). Progress is a Rich bar
when stderr is a terminal and plain lines otherwise, so batch logs stay readable.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stderr = Console(stderr=True)


STAMP = "%Y-%m-%dT%H:%M:%S%z"  # ISO 8601 with the offset: lines from several machines sort and compare


def stamp() -> str:
    return time.strftime(STAMP)


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Log lines on stderr: Rich's on a terminal; off one (a batch job's log), one line per event, an ISO
    timestamp and the level first, never wrapped or padded, so `grep` of a SLURM log finds whole events."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if stderr.is_terminal:
        handler = RichHandler(console=stderr, show_path=False, show_time=True, rich_tracebacks=False, markup=False)
        fmt = logging.Formatter("%(message)s")
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = OneLine("%(asctime)s %(levelname)s %(message)s", datefmt=STAMP)
    handler.setFormatter(fmt)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # third-party warnings are log events too: one line each off a terminal
    # transformers' own logger is noise, and its weight-loading and saving bars are too in a batch log (a bar
    # redrawn with carriage returns); on a terminal they are the progress of loading and saving a checkpoint.
    # Its warnings (and everyone's deprecations) still reach the warnings module. Two named ones are not ours:
    import warnings

    import transformers

    # peft (0.17-0.21) reads `is_gradient_checkpointing`, which transformers 5 deprecates, on every get_peft_model
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # peft warns when an adapter's base is a local folder it cannot look up on the hub (we are offline)
    warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)

    transformers.utils.logging.set_verbosity_error()
    if stderr.is_terminal and not quiet:
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.disable_progress_bar()
    logging.getLogger("tsopsd").setLevel(level)


@contextmanager
def timed(what: str, into: dict[str, float], logger: logging.Logger | None = None) -> Iterator[None]:
    """Time a phase of a long job: its seconds into `into[what]` and, with `logger`, an info line when it ends."""
    start = time.monotonic()
    yield
    into[what] = into.get(what, 0.0) + time.monotonic() - start
    if logger is not None:
        logger.info("%s: done in %.1f s", what, time.monotonic() - start)


class OneLine(logging.Formatter):
    """A record as one line: newlines inside a message become ' | '."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "").replace("\n", " | ")


ProgressFactory = Callable[[str, int], Callable[[int], None]]
QUIET_S = 1.0  # off a terminal: at most a PROGRESS line a second, every ~10%; none for a task done sooner


@contextmanager
def planning_status() -> Iterator[Callable[[str], None]]:
    """Yield ``on_phase(name)`` for `plan`: a spinner naming the phase being planned on a TTY (planning a
    4B model on fake tensors takes about a minute), nothing otherwise (scripts read the result)."""
    if not stderr.is_terminal:
        yield lambda name: None
        return
    with stderr.status("planning one worst-case step on fake tensors") as status:
        yield lambda name: status.update(f"planning one worst-case step on fake tensors: {name}")


@contextmanager
def progress(enabled: bool = True, *, plain: bool = True) -> Iterator[ProgressFactory]:
    """Yield ``task(description, total) -> advance(n)``; a bar on a TTY, else a line every ~10%.

    With ``plain=False`` nothing is printed off a TTY (for loops that log a line per step anyway).
    """
    if not enabled or (not plain and not stderr.is_terminal):
        yield lambda description, total: (lambda n=1: None)
        return
    if stderr.is_terminal:
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn(), console=stderr, transient=False)
        with bar:
            def task(description: str, total: int):
                tid = bar.add_task(description, total=total)
                return lambda n=1: bar.advance(tid, n)
            yield task
        return

    def plain_task(description: str, total: int):
        state = {"done": 0, "next": 0.0, "start": time.monotonic(), "last": None}

        def advance(n: int = 1) -> None:
            state["done"] += n
            now, frac, last = time.monotonic(), state["done"] / max(total, 1), state["last"]
            finished = state["done"] >= total
            if not (frac >= state["next"] or finished):
                return
            if now - (last if last is not None else state["start"]) < QUIET_S and not (finished and last is not None):
                return  # a line a second at most; a task done within QUIET_S says nothing
            print(f"{stamp()} PROGRESS {description}: {state['done']}/{total} ({now - state['start']:.1f}s)",
                  file=sys.stderr, flush=True)
            state["next"], state["last"] = frac + 0.1, now
        return advance
    yield plain_task
