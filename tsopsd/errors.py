"""Errors a user can fix.

`TsopsdError` is raised for bad input (a missing checkpoint, a malformed prompt file, an invalid
config value, an output folder that exists). `cli.py` turns it into one line on stderr and exit
code 2. It subclasses `ValueError` so library callers can catch it as such.
"""


class TsopsdError(ValueError):
    """Bad input or usage: the message says what is wrong and how to fix it."""


class TrainingStopped(RuntimeError):
    """A guard stopped a run (NaN loss, drift), or it trained nothing: exit 1.

    `report` is the run's report where an output was written (the last good state), else None.
    """

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report
