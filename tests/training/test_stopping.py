"""SIGTERM / SIGINT at every phase of ``vocdet train``, one process and two DDP ranks; a kill while a checkpoint is
being written; extending a finished run; vocdet as PID 1.

Each run is paused at its phase by ``VOCDET_PAUSE_AT`` (the run prints ``vocdet-phase: <phase>`` and waits there), so
the signal lands in that phase every time, not after a guessed sleep. The signal goes to the whole process group, as a
scheduler sends it. Every run must end with exit 128 + signal, exactly one ``stopped:`` line, no traceback, and no
process of its group left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import start_cli, tiny_overrides

pytestmark = pytest.mark.slow

BEFORE = "before the first checkpoint; nothing to resume, run the same command again"
SAVED = "checkpoint saved to"
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


class Run:
    """``vocdet train`` in its own process group, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, prefix: list[str] | None = None):
        self.lines: list[str] = []
        self.proc = start_cli("train", *args, env={"OMP_NUM_THREADS": "1", **(env or {})}, prefix=prefix)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, count: int = 1, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.out.count(text) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"never saw {count}x {text!r} (exit {self.proc.returncode}):\n{self.out[-3000:]}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 90) -> int:
        """Exit code; a run that outlives ``timeout`` fails the test (and is killed)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"no exit within {timeout} s:\n{self.out[-3000:]}")
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def group_gone(self, timeout: float = 15) -> bool:
        """No process of the run's group is left (workers and ranks included)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False


def _args(root: Path, run_dir: Path, name: str, *extra: str) -> list[str]:
    return [*tiny_overrides(root, run_dir, name), "train.epochs=2", "data.num_workers=1", *extra]


def _stop_at(phase: str, sig: int, args: list[str], ranks: int = 1, env: dict[str, str] | None = None) -> Run:
    run = Run(args, env={"VOCDET_PAUSE_AT": phase, **(env or {})})
    run.wait_for(f"vocdet-phase: {phase.partition('#')[0]}", count=ranks)
    run.signal(sig)
    return run


def _assert_stopped(run: Run, sig: int, expected: str) -> None:
    rc = run.finish()
    out = run.out
    assert rc == 128 + sig, out[-3000:]
    assert out.count("stopped: ") == 1, out[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("stopped: "))
    assert line.startswith(f"stopped: {signal.Signals(sig).name}") and expected in line, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert run.group_gone(), "processes of the run were left behind"


# One process: every phase of a run. (cache needs data.cache; wandb needs the W&B offline logger.)
ONE_PROCESS = [
    ("startup", BEFORE, []),
    ("config", BEFORE, []),
    ("data", BEFORE, []),
    ("cache", BEFORE, ["data.cache=true"]),
    ("sanity", SAVED, []),
    ("workers", SAVED, []),
    ("step", SAVED, []),
    ("validation", SAVED, []),
    ("checkpoint-write", SAVED, []),
    ("final-eval", SAVED, []),
    ("reports", SAVED, []),
    ("wandb", SAVED, ["logging.wandb=true", "logging.wandb_mode=offline"]),
]


@pytest.mark.parametrize(("phase", "expected", "extra"), ONE_PROCESS, ids=[p for p, _, _ in ONE_PROCESS])
def test_sigterm_in_every_phase_one_process(phase: str, expected: str, extra: list[str], synth_root: Path, tmp_path):
    run = _stop_at(phase, signal.SIGTERM, _args(synth_root, tmp_path, "r", *extra))
    _assert_stopped(run, signal.SIGTERM, expected)
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    if expected == SAVED:
        assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] > 0
        assert f"{SAVED} {last}" in run.out
    else:
        assert not last.exists()


# Two ranks: before the process group exists, inside a step's collectives, inside rank 0's checkpoint write (the
# other rank waits at a barrier) and in the final evaluation. (Sanity and epoch-end validation stop the way the
# step does: through the same callback and collective; the one-process matrix covers each phase's own path.)
TWO_RANKS = [
    ("data", BEFORE, 2),
    ("step", SAVED, 2),
    ("checkpoint-write", SAVED, 1),  # rank 0 writes
    ("final-eval", SAVED, 2),
]


@pytest.mark.parametrize(("phase", "expected", "ranks"), TWO_RANKS, ids=[p for p, _, _ in TWO_RANKS])
def test_sigterm_in_every_phase_two_ranks(phase: str, expected: str, ranks: int, synth_root: Path, tmp_path: Path):
    run = _stop_at(phase, signal.SIGTERM, _args(synth_root, tmp_path, "d", *DDP), ranks=ranks)
    _assert_stopped(run, signal.SIGTERM, expected)
    if expected == SAVED:
        last = tmp_path / "d" / "checkpoints" / "last.ckpt"
        assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] > 0


@pytest.mark.parametrize(
    ("phase", "expected", "ddp"),
    [("startup", BEFORE, False), ("step", SAVED, True)],
    ids=["startup", "step-2-ranks"],
)
def test_sigint_stops_like_sigterm_with_130(phase: str, expected: str, ddp: bool, synth_root: Path, tmp_path: Path):
    run = _stop_at(phase, signal.SIGINT, _args(synth_root, tmp_path, "i", *(DDP if ddp else [])), ranks=1 + ddp)
    _assert_stopped(run, signal.SIGINT, expected)


def test_stuck_run_exits_within_stop_timeout(synth_root: Path, tmp_path: Path) -> None:
    """A run that cannot reach a stopping point (held inside a checkpoint write that ignores the signal, as a hung
    collective would) is still gone ``train.stop_timeout_s`` after the signal, with one line; so are both ranks."""
    args = _args(synth_root, tmp_path, "s", "train.stop_timeout_s=5", *DDP)
    run = Run(args, env={"VOCDET_PAUSE_AT": "checkpoint-write", "VOCDET_PAUSE_HOLD": "1"})
    run.wait_for("vocdet-phase: checkpoint-write")
    start = time.monotonic()
    run.signal(signal.SIGTERM)
    rc = run.finish(timeout=60)
    took = time.monotonic() - start
    assert rc == 143 and 4 < took < 30, (took, run.out[-3000:])
    assert run.out.count("stopped: ") == 1 and "still running 5 s after SIGTERM" in run.out
    assert "Traceback" not in run.out
    assert run.group_gone()


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(synth_root: Path, tmp_path: Path) -> None:
    """The second write of last.ckpt is held half-done (the bytes in a temporary file, not yet renamed) and the run
    is SIGKILLed there: last.ckpt is still the first one, whole, and --resume finishes the run from it."""
    args = _args(synth_root, tmp_path, "k", "train.epochs=3")
    run = Run(args, env={"VOCDET_PAUSE_AT": "checkpoint-write:last.ckpt#2"})
    run.wait_for("vocdet-phase: checkpoint-write:last.ckpt")
    ckpts = tmp_path / "k" / "checkpoints"
    assert any(p.name.startswith(".last.ckpt.") for p in ckpts.iterdir()), "the new checkpoint is not being written"
    run.signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    first = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["epoch"] == 0  # the epoch-0 checkpoint, intact
    resumed = Run([*args, "--resume"])
    assert resumed.finish(timeout=300) == 0, resumed.out[-3000:]
    done = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert done["epoch"] == 2 and (tmp_path / "k" / "metrics.json").is_file()


def test_extend_a_finished_run(synth_root: Path, tmp_path: Path) -> None:
    """6 epochs, then --resume train.epochs=10, ends where a 10-epoch run ends (same global step), and its mAP is
    within noise of it."""
    base = [*tiny_overrides(synth_root, tmp_path, "ext"), "data.close_mosaic=2", "train.warmup_epochs=1"]
    for extra in (["train.epochs=6"], ["train.epochs=10", "--resume"]):
        run = Run([*base, *extra])
        assert run.finish(timeout=300) == 0, run.out[-3000:]
    assert "resuming from" in run.out
    ten = Run(
        [
            *tiny_overrides(synth_root, tmp_path, "ten"),
            "data.close_mosaic=2",
            "train.warmup_epochs=1",
            "train.epochs=10",
        ]
    )
    assert ten.finish(timeout=300) == 0, ten.out[-3000:]
    ext = torch.load(tmp_path / "ext" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ref = torch.load(tmp_path / "ten" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (ext["epoch"], ext["global_step"]) == (ref["epoch"], ref["global_step"]) == (9, ref["global_step"])
    assert ext["vocdet"]["config"]["train"]["epochs"] == 10
    a = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    b = json.loads((tmp_path / "ten" / "metrics.json").read_text())
    print(f"mAP50 extended {a['map50']:.4f} vs 10-epoch run {b['map50']:.4f}")
    assert a["map50"] == pytest.approx(b["map50"], abs=0.1)


def test_vocdet_as_pid_1_stops_on_sigterm_at_start_up(synth_root: Path, tmp_path: Path) -> None:
    """In a container vocdet is PID 1, which gets no default action for SIGTERM: the handler must exist from the
    start. The train image's entrypoint command, as PID 1 of its own PID namespace, signalled at start-up."""
    if os.geteuid() != 0 or not Path("/usr/bin/unshare").exists():
        pytest.skip("needs root and unshare")
    run = Run(
        _args(synth_root, tmp_path, "p"),
        env={"VOCDET_PAUSE_AT": "startup"},
        prefix=["unshare", "--pid", "--fork", "--mount-proc"],
    )
    run.wait_for("vocdet-phase: startup")
    pid1 = _pid_1_of(run.proc.pid)
    assert "vocdet" in Path(f"/proc/{pid1}/cmdline").read_text()
    os.kill(pid1, signal.SIGTERM)
    rc = run.finish()
    assert rc == 143 and run.out.count("stopped: SIGTERM " + BEFORE) == 1, run.out[-3000:]


def _pid_1_of(unshare_pid: int) -> int:
    """The process that is PID 1 in the PID namespace ``unshare --pid --fork`` created (seen from here)."""
    ns = None
    for child in Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            ns = os.readlink(f"/proc/{child}/ns/pid")
    assert ns is not None and ns != os.readlink("/proc/self/ns/pid"), "no new PID namespace"
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            nspid = (d / "status").read_text().split("NSpid:")[1].split("\n")[0].split() if d.name.isdigit() else []
            if nspid and nspid[-1] == "1" and os.readlink(d / "ns/pid") == ns:
                return int(d.name)
    pytest.fail("no PID 1 in the new namespace")
