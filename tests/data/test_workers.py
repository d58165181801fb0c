"""Loader workers start from a fork server (never a fork of the threaded trainer), with stop signals kept out, and
the image cache reaches them as shared memory, not as copies."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

SIGTERM_BIT = 1 << 14  # bit (signal number - 1) of /proc/<pid>/status masks


def test_shared_images_are_read_only_views_and_pickle_as_a_handle() -> None:
    import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reductions)

    from vocdet.data.dataset import SharedImages

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(300, 200), (64, 640), (1, 1)]]
    originals = [im.copy() for im in images]
    shared = SharedImages(images)
    assert len(shared) == 3
    for i, im in enumerate(originals):
        np.testing.assert_array_equal(shared[i], im)
        with pytest.raises(ValueError, match="read-only"):
            shared[i][0, 0, 0] = 1
    assert sum(im.nbytes for im in originals) > 300_000
    assert len(ForkingPickler.dumps(shared)) < 10_000  # a handle to the buffer, not its bytes


def _loader_script(path: Path, root: Path, overrides: str, body: str) -> Path:
    """A script (no ``if __name__ == "__main__":`` guard, as notebooks-turned-scripts are) that builds vocdet's
    training loader on ``root`` with 2 workers and runs ``body``."""
    preamble = f"""
        import os
        import time
        import vocdet
        from vocdet.data.datamodule import VOCDataModule

        cfg = vocdet.load_config(None, ["data.root={root}", "data.imgsz=64", "data.batch_size=4",
                                        "data.num_workers=2"{overrides}])
        dm = VOCDataModule(cfg.data)
        dm.setup("fit")
        """
    path.write_text(textwrap.dedent(preamble) + textwrap.dedent(body))
    return path


@pytest.mark.slow  # starts processes
def test_workers_come_from_a_fork_server_with_stop_signals_kept_out(synth_root: Path, tmp_path: Path) -> None:
    # A script without an ``if __name__ == "__main__":`` guard, as notebooks-turned-scripts are: workers must not
    # run it again.
    script = _loader_script(
        tmp_path / "loader.py",
        synth_root,
        ', "data.cache=true"',
        """
        def status(pid, key):
            line = next(l for l in open(f"/proc/{pid}/status") if l.startswith(key + ":"))
            return int(line.split()[1], 16)

        it = iter(dm.train_dataloader())
        batches = [next(it) for _ in range(3)]
        assert all(b["img"].shape == (4, 3, 64, 64) for b in batches)
        for w in it._workers:
            server = int(open(f"/proc/{w.pid}/stat").read().rsplit(")", 1)[1].split()[1])
            print("worker", w.pid, "parent", server, "blocked", status(w.pid, "SigBlk"),
                  "server-ignores", status(server, "SigIgn"))
        it._shutdown_workers()
        print("main", os.getpid())
        """,
    )
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    main = int(next(line for line in lines if line.startswith("main")).split()[1])
    workers = [line.split() for line in lines if line.startswith("worker")]
    assert len(workers) == 2
    for _, _, _, parent, _, blocked, _, server_ignores in workers:
        assert int(parent) != main  # started by the fork server, not forked from the loader's process
        assert int(blocked) & SIGTERM_BIT  # SIGTERM blocked for the worker's whole life
        assert int(server_ignores) & SIGTERM_BIT  # and ignored by the server


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited (its new parent reaps it)


@pytest.mark.slow  # starts processes
def test_workers_and_server_exit_when_the_trainer_is_killed(synth_root: Path, tmp_path: Path) -> None:
    """A hard exit of the training process (SIGKILL, the stop watchdog's os._exit) leaves no worker or server."""
    script = _loader_script(
        tmp_path / "killed.py",
        synth_root,
        "",
        """
        it = iter(dm.train_dataloader())
        next(it)
        server = int(open(f"/proc/{it._workers[0].pid}/stat").read().rsplit(")", 1)[1].split()[1])
        print(server, *(w.pid for w in it._workers), flush=True)
        time.sleep(120)
        """,
    )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait(30)
    deadline = time.monotonic() + 20  # workers notice a changed parent within 5 s of waiting for work
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), [p for p in pids if _alive(p)]
