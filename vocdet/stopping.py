"""Stopping on SIGTERM / SIGINT at any moment: one line, exit 128 + signal, never a hang, never a traceback.

``install()`` runs first thing in the CLI (in the training container vocdet is PID 1, which gets no default action
for SIGTERM: a signal before a handler exists would be ignored until the runtime's SIGKILL). The first signal

- outside the training loop (start-up, config, data indexing and caching, DDP start-up, the final evaluation,
  reports, W&B finishing) raises :class:`Interrupted` where the main thread is, which unwinds to the CLI;
- while Lightning's loop runs (its SIGTERM handler is installed, chaining to ours) is only recorded: the run stops
  at the next training-batch boundary, on every DDP rank at the same batch (``stop_requested`` is agreed on by an
  all-reduce there), after saving ``last.ckpt``;

and starts a watchdog: whatever the run is doing, the process exits ``timeout_s`` (``train.stop_timeout_s``) after
the signal, killing the processes it started. Later signals (a scheduler repeating itself) change nothing.

With ``VOCDET_PAUSE_AT=<phase>`` a run prints ``vocdet-phase: <phase>`` on stderr when it enters that phase and waits
there (at most 120 s) until a signal arrives: how the tests signal every phase deterministically.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

STATE: dict[str, Any] = {
    "signum": None,  # the first stop signal received
    "installed": False,
    "timeout_s": 60.0,
    "kill_children": None,  # () -> None: kills the processes this one started (DDP ranks), set by the trainer
    "checkpoint": None,  # this run's last.ckpt, for the one line the CLI prints
    "training": False,  # `vocdet train` (a stop before any checkpoint says there is nothing to resume)
}


class Interrupted(BaseException):
    """A stop signal outside the training loop (a ``BaseException``: ``except Exception`` blocks let it through)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def install() -> None:
    """Handle SIGTERM and SIGINT in this process (main thread only; idempotent)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    STATE["installed"] = True


def received() -> int | None:
    """The stop signal received so far, if any."""
    return STATE["signum"]


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def check() -> None:
    """Raise :class:`Interrupted` when a signal was recorded while a loop deferred it (before writing results)."""
    if STATE["signum"] is not None:
        raise Interrupted(STATE["signum"])


def message(signum: int, where: str = "", training: bool | None = None) -> str:
    """The one line for a stop: ``where`` it stopped (e.g. " at epoch 3, global step 98") and whether this run's
    checkpoint (``STATE["checkpoint"]``) gives ``--resume`` something."""
    name = signal.Signals(signum).name
    last = STATE["checkpoint"]
    if last is not None and Path(last).exists():
        return f"{name}{where}; checkpoint saved to {last}; continue with the same command plus --resume"
    if STATE.get("training") if training is None else training:
        return f"{name} before the first checkpoint; nothing to resume, run the same command again"
    return f"{name}; nothing was written"


def record(signum: int) -> bool:
    """Note a stop signal; True for the first one (which also starts the watchdog)."""
    if STATE["signum"] is not None:
        return False
    STATE["signum"] = signum
    threading.Thread(target=_watchdog, args=(signum,), name="vocdet-stop-watchdog", daemon=True).start()
    return True


def _loop_is_running() -> bool:
    """Lightning's loop has its SIGTERM handler installed (it chains to ours and records the signal itself)."""
    return signal.getsignal(signal.SIGTERM) is not _handler


def _handler(signum: int, frame: Any) -> None:
    first = record(signum)
    if first:
        kill = STATE["kill_children"]
        if kill is not None:
            kill(signum)  # DDP ranks started by this process stop with it, whoever was signalled
    if first and not _loop_is_running():
        raise Interrupted(signum)


def _watchdog(signum: int) -> None:
    deadline = time.monotonic() + float(STATE["timeout_s"])
    while time.monotonic() < deadline:
        time.sleep(0.2)
    name = signal.Signals(signum).name
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        print(
            f"stopped: still running {STATE['timeout_s']:g} s after {name}; exiting now (train.stop_timeout_s)",
            file=sys.stderr,
            flush=True,
        )
    kill = STATE["kill_children"]
    if kill is not None:
        with contextlib.suppress(Exception):
            kill(signal.SIGKILL)
    os._exit(exit_code(signum))


_ENTERED: dict[str, int] = {}


def pause_at(phase: str) -> None:
    """Test hook: with ``VOCDET_PAUSE_AT=<phase>`` (or ``<phase>#<n>``: its n-th entry) announce the phase on stderr
    and wait there until a stop signal arrives (at most 120 s)."""
    want = os.environ.get("VOCDET_PAUSE_AT")
    if not want:
        return
    name, _, nth = want.partition("#")
    if name != phase:
        return
    _ENTERED[phase] = _ENTERED.get(phase, 0) + 1
    if _ENTERED[phase] != int(nth or 1):
        return
    rank = os.environ.get("LOCAL_RANK", "0")
    print(f"vocdet-phase: {phase} rank {rank}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 120
    hold = os.environ.get("VOCDET_PAUSE_HOLD") == "1"  # stand in for a hang: ignore the signal, keep waiting
    while (hold or STATE["signum"] is None) and time.monotonic() < deadline:
        time.sleep(0.01)  # a signal outside the loop raises Interrupted from inside this sleep
