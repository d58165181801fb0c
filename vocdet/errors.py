"""The exception types the CLI turns into a one-line message and an exit code, never a traceback."""

from __future__ import annotations


class VocdetError(Exception):
    """A user-facing error: the message names the problem and how to fix it (exit code 2)."""

    exit_code = 2
    label = "error"  # the CLI prints "<label>: <message>"


class TrainingStopped(VocdetError):
    """Training stopped on SIGTERM or SIGINT (exit code 128 + the signal: 143 or 130, so schedulers and pipelines
    see an unfinished run); the message says whether there is a checkpoint to ``--resume`` from."""

    label = "stopped"

    def __init__(self, message: str, signum: int = 15):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
