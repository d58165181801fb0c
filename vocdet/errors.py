"""The exception types the CLI turns into a one-line message and an exit code, never a traceback."""

from __future__ import annotations


class VocdetError(Exception):
    """A user-facing error: the message names the problem and how to fix it (exit code 2)."""

    exit_code = 2
    label = "error"  # the CLI prints "<label>: <message>"


class TrainingStopped(VocdetError):
    """Training stopped on SIGTERM after saving a checkpoint to resume from (exit code 143 = 128 + SIGTERM, so
    schedulers and pipelines see an unfinished run)."""

    exit_code = 143
    label = "stopped"
