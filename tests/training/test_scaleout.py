"""Scale-out on the CPU with real processes: DDP from a real Jupyter kernel (ddp_notebook), a failing DDP rank
ending the whole job, two "nodes" launched by torchrun on loopback, and --sync-batchnorm's CPU error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, start_process, tiny_overrides

pytestmark = pytest.mark.slow


def test_ddp_notebook_from_a_jupyter_kernel(synth_root: Path, tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    overrides = [
        *tiny_overrides(synth_root, tmp_path, "nb"),
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp_notebook",
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import vocdet"),
        nbformat.v4.new_code_cell(
            f"cfg = vocdet.load_config(None, {overrides!r})\nbest = vocdet.train(cfg)\nprint('BEST', best)"
        ),
        nbformat.v4.new_code_cell("metrics = vocdet.evaluate(best)\nprint('IMAGES', len(metrics['image_ids']))"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # forked ranks on a 2-core machine: one thread each
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}})
    client.km = client.kernel_manager_class(kernel_name="python3")
    start = time.monotonic()
    client.execute(env=env)
    out = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    assert f"BEST {tmp_path / 'nb' / 'checkpoints' / 'best.ckpt'}" in out, out[-3000:]
    val = (synth_root / "ImageSets" / "Main" / "val.txt").read_text().split()
    assert f"IMAGES {len(val)}" in out
    assert json.loads((tmp_path / "nb" / "metrics.json").read_text())["image_ids"] == sorted(val)
    print(f"ddp_notebook run in {time.monotonic() - start:.0f} s")


FAILING_RANK = """
import sys
from vocdet.training.module import DetectionModule

real = DetectionModule.training_step

def training_step(self, batch, batch_idx):
    if self.global_rank == 1 and batch_idx == 1:
        raise RuntimeError("rank 1 fails on purpose")
    return real(self, batch, batch_idx)

DetectionModule.training_step = training_step

from vocdet.cli import main

main()
"""


def test_a_failing_rank_ends_the_whole_job(synth_root: Path, tmp_path: Path) -> None:
    script = tmp_path / "failing_rank.py"
    script.write_text(textwrap.dedent(FAILING_RANK))
    args = ["train", "--accelerator", "cpu", "--devices", "2", *tiny_overrides(synth_root, tmp_path, "f")]
    start = time.monotonic()
    # Lightning starts rank 1 by re-running this command line, so the patched module is in both ranks.
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,  # a hang fails here instead of blocking the suite
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    took = time.monotonic() - start
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "rank 1 fails on purpose" in proc.stderr
    assert not (tmp_path / "f" / "metrics.json").exists()
    assert took < 240, f"took {took:.0f} s"
    print(f"failing rank: exit {proc.returncode} after {took:.0f} s")


def test_two_nodes_through_torchrun_on_loopback(synth_root: Path, tmp_path: Path) -> None:
    """Two torchrun launchers (node ranks 0 and 1, one process each) rendezvous on 127.0.0.1: --nodes 2."""
    from vocdet.bench.load import free_port

    port = free_port()
    args = [
        *tiny_overrides(synth_root, tmp_path, "nodes"),
        "run.exist_ok=true",
        "trainer.accelerator=cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launcher(node_rank: int) -> list[str]:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        rdzv = ["--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        train = ["-m", "vocdet", "train", "--nodes", "2", "--devices", "1", *args]
        return [*torchrun, *rdzv, *train]

    procs = [start_process(launcher(r), env) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:  # a hang must not leave launchers and their workers behind
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outs[0], outs[0][-3000:]  # one world of two processes
    metrics = json.loads((tmp_path / "nodes" / "metrics.json").read_text())
    val = (synth_root / "ImageSets" / "Main" / "val.txt").read_text().split()
    assert metrics["image_ids"] == sorted(val)  # every image scored once across the two nodes
    assert "num_nodes: 2" in (tmp_path / "nodes" / "config.yaml").read_text()


def test_sync_batchnorm_on_cpu_is_one_line(synth_root: Path, tmp_path: Path) -> None:
    from tests.test_cli import assert_one_line_error

    proc = run_cli("train", "--sync-batchnorm", *tiny_overrides(synth_root, tmp_path, "s"), timeout=120)
    assert_one_line_error(proc, "trainer.sync_batchnorm needs CUDA")
