"""The one exception type the CLI turns into a one-line error (exit code 2, no traceback)."""

from __future__ import annotations


class VocdetError(Exception):
    """A user-facing error: the message names the problem and how to fix it."""
