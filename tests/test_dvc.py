"""The DVC pipeline for real: `dvc repro` of dvc.yaml in a copy of this repository (tiny settings), metrics,
params and plots, and a `dvc push` / `dvc pull` round trip through a local remote. Caches and remotes stay in
the test's temporary directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = {  # the quickstart config, shrunk so the four stages run in seconds
    "images: 600": "images: 40",
    "size: 256": "size: 96",
    "imgsz: 160": "imgsz: 64",
    "batch_size: 16": "batch_size: 8",
    "epochs: 15": "epochs: 1",
    "close_mosaic: 3": "close_mosaic: 0",
    "nbs: 16": "nbs: 8",
}


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # `vocdet` of this environment for the stage commands
        "DVC_NO_ANALYTICS": "1",
        "DVC_TEST": "1",  # no update check
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site"),
        "DVC_GLOBAL_CONFIG_DIR": str(tmp / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(tmp / "dvc-system"),
        "WANDB_MODE": "offline",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _use_local_cache_and_remote(repo: Path, tmp: Path, cache: str, env: dict[str, str]) -> None:
    run([str(BIN / "dvc"), "config", "--local", "cache.dir", str(tmp / cache)], repo, env)
    run([str(BIN / "dvc"), "remote", "modify", "--local", "local", "url", str(tmp / "remote")], repo, env)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """A git copy of this repository (what `git clone` would give) after `dvc repro` with tiny settings."""
    tmp = tmp_path_factory.mktemp("dvc")
    env = _env(tmp)
    repo = tmp / "a"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, repo / f)
    cfg = repo / "configs" / "quickstart.yaml"
    text = cfg.read_text()
    for old, new in TINY.items():
        assert old in text, old
        text = text.replace(old, new)
    cfg.write_text(text)
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "copy"], repo, env)
    _use_local_cache_and_remote(repo, tmp, "cache-a", env)
    proc = run([str(BIN / "dvc"), "repro"], repo, env)
    for stage in ("data", "train", "eval", "export"):
        assert f"Running stage '{stage}'" in proc.stdout, proc.stdout[-3000:]
    return repo, tmp, env


def test_repro_metrics_params_and_plots(pipeline: tuple[Path, Path, dict[str, str]]) -> None:
    repo, _, env = pipeline
    dvc = str(BIN / "dvc")
    q = repo / "runs" / "quickstart"
    assert (q / "checkpoints" / "best.ckpt").is_file() and (q / "export" / "best.onnx").is_file()
    assert len(list((repo / "data" / "synthetic" / "JPEGImages").glob("*.jpg"))) == 40
    assert "up to date" in run([dvc, "status", "dvc.yaml"], repo, env).stdout  # data.dvc: no dataset yet
    assert "didn't change" in run([dvc, "repro"], repo, env).stdout  # nothing re-runs

    metrics = json.loads(run([dvc, "metrics", "show", "--json"], repo, env).stdout)
    shown = metrics[""]["data"]["runs/quickstart/eval/summary.json"]["data"]
    assert set(shown) == {"map50", "map50_95", "voc07_map50", "num_images"} and shown["num_images"] == 8
    assert shown == {k: v for k, v in json.loads((q / "eval" / "metrics.json").read_text()).items() if k in shown}

    plots = json.loads(run([dvc, "plots", "show", "--json"], repo, env).stdout)["data"]
    rows = plots["pr_curve"][0]["content"]["data"]["values"]
    assert {"class", "recall", "precision"} <= set(rows[0]) and len(rows) % 101 == 0
    assert any(k.endswith("confusion_matrix.png") for k in plots)

    # A parameter change re-runs train, eval and export (not data); metrics diff compares with HEAD's lock.
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "first run"], repo, env)
    cfg = repo / "configs" / "quickstart.yaml"
    cfg.write_text(cfg.read_text().replace("epochs: 1", "epochs: 2"))
    status = run([dvc, "status", "--json"], repo, env).stdout
    assert "train" in json.loads(status) and "data" not in json.loads(status)
    params = json.loads(run([dvc, "params", "diff", "--json"], repo, env).stdout)
    assert params["configs/quickstart.yaml"]["train.epochs"] == {"old": 1, "new": 2, "diff": 1}
    proc = run([dvc, "repro"], repo, env)
    assert "Running stage 'train'" in proc.stdout and "Running stage 'data'" not in proc.stdout
    diff = json.loads(run([dvc, "metrics", "diff", "--all", "--json"], repo, env).stdout)
    assert set(diff["runs/quickstart/eval/summary.json"]) >= {"map50", "map50_95"}
    run(["git", "checkout", "--", "configs/quickstart.yaml", "dvc.lock"], repo, env)
    run([dvc, "checkout", "dvc.yaml"], repo, env)  # back to the committed state for the push/pull test


def test_push_pull_round_trip_restores_identical_files(pipeline: tuple[Path, Path, dict[str, str]]) -> None:
    repo, tmp, env = pipeline
    dvc = str(BIN / "dvc")
    # The tracked dataset: a VOC-layout folder at data/VOCdevkit, recorded in data.dvc.
    run([str(BIN / "vocdet"), "data", "synth", "--out", "data/VOCdevkit", "--images", "6", "--size", "64"], repo, env)
    run([dvc, "commit", "--force", "data.dvc"], repo, env)
    assert "md5:" in (repo / "data.dvc").read_text()
    run([dvc, "push"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "dataset and run"], repo, env)

    clone = tmp / "b"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp, env)
    _use_local_cache_and_remote(clone, tmp, "cache-b", env)  # an empty cache: everything comes from the remote
    assert not (clone / "data").exists() or not any((clone / "data").rglob("*.jpg"))
    run([dvc, "pull"], clone, env)
    compared = 0
    for sub in ("data/VOCdevkit", "data/synthetic", "runs/quickstart/checkpoints", "runs/quickstart/export"):
        for f in sorted((repo / sub).rglob("*")):
            if f.is_file():
                assert f.read_bytes() == (clone / f.relative_to(repo)).read_bytes(), f
                compared += 1
    assert compared >= 6 * 2 + 40 * 2 + 3  # jpg+xml per image, split files, checkpoints, onnx
    assert "Data and pipelines are up to date" in run([dvc, "status"], clone, env).stdout
