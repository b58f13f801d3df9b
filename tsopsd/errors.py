"""Errors a user can fix, and the one table of exit codes.

`TsopsdError` is raised for bad input (a missing checkpoint, a malformed prompt file, an invalid
config value, an output folder that exists). The CLI (`tsopsd.cli`) turns it into one line on stderr and exit
code 2. It subclasses `ValueError` so library callers can catch it as such. `TrainingStopped` is a
run that ended without a result a script may continue from; its `code` says which way.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    """What every `tsopsd` command's exit status means (docs/reference.md, "Exit codes")."""

    DONE = 0  # done and the goal met (OUT complete); `watch`: nothing to do
    CRASH = 1  # an unexpected failure: one line, --debug for the traceback
    BAD_INPUT = 2  # bad input or usage: one line, nothing written, no input touched
    REHEATED = 3  # `watch`: a reheated checkpoint was written; resume the RL run from the printed path
    GOAL_NOT_MET = 4  # the run ended, OUT written, but its target (or convergence) was not reached
    GUARD_STOP = 5  # a guard stopped training (non-finite loss, drift): OUT holds the last good state
    NOTHING_TRAINED = 6  # no update was kept: no OUT
    INTERRUPTED = 130  # Ctrl-C or SIGTERM before OUT was written: state saved (--resume), or none yet (rerun)


class TsopsdError(ValueError):
    """Bad input or usage: the message says what is wrong and how to fix it."""


class TrainingStopped(RuntimeError):
    """A run that ended without a result to continue from: a guard stopped it, or it trained nothing.

    `report` is the run's report where an output was written (the last good state), else None; `code` is
    `ExitCode.GUARD_STOP` or `ExitCode.NOTHING_TRAINED`.
    """

    def __init__(self, message: str, report: dict | None = None, code: ExitCode = ExitCode.GUARD_STOP):
        super().__init__(message)
        self.report = report
        self.code = code
