"""Shared fixtures: small synthetic VOC sets, the real VOC sample, and a helper to run the real CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "voc2012-sample100"

# Keep every run offline and out of the home directory.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session", autouse=True)
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("home")
    os.environ["YOLO_CONFIG_DIR"] = str(home / "ultralytics")
    os.environ["WANDB_DIR"] = str(home / "wandb")
    os.environ["WANDB_CACHE_DIR"] = str(home / "wandb-cache")
    os.environ["WANDB_CONFIG_DIR"] = str(home / "wandb-config")


@pytest.fixture(scope="session")
def sample_root() -> Path:
    if not SAMPLE.is_dir():
        pytest.skip(f"real VOC sample not found at {SAMPLE}")
    return SAMPLE


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic flat VOC set (32 images, 128 px) shared by the integration tests."""
    from vocdet.data.synth import synthesize_voc

    return synthesize_voc(tmp_path_factory.mktemp("synth") / "voc", images=32, seed=0, size=128, val_fraction=0.25)


def tiny_overrides(root: Path, run_dir: Path, name: str = "tiny") -> list[str]:
    """Settings that train in seconds on a CPU: 64 px, batch 8, one epoch, no workers, no W&B."""
    return [
        f"data.root={root}",
        f"run.dir={run_dir}",
        f"run.name={name}",
        "data.imgsz=64",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.close_mosaic=0",
        "train.epochs=1",
        "train.nbs=8",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logging.wandb=false",
    ]


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed CLI in a fresh process (exit codes and stderr exactly as a user sees them)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vocdet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


def start_process(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """``argv`` in its own process group (a signal to the group reaches its workers too), from the repository, its
    stdout and stderr merged into one text pipe."""
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True,
    )


def start_cli(*args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> subprocess.Popen:
    """``vocdet <args>`` started with ``start_process``."""
    return start_process([*(prefix or []), sys.executable, "-m", "vocdet", *args], env)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The output of ``proc`` once it exits; a hang kills its whole process group and fails the test."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
        pytest.fail(f"no exit within {timeout} s (killed):\n{out[-3000:]}")


@pytest.fixture(scope="session")
def detector_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A model that detects things (12 epochs at 128 px on 300 synthetic images, ~40 s), trained in-process.

    ``overrides`` reproduce it (the resume test trains them again with interruptions); ``best`` is the checkpoint.
    """
    import vocdet

    base = tmp_path_factory.mktemp("detector")
    root = vocdet.synthesize_voc(base / "voc", images=300, seed=1, size=128, val_fraction=0.2)
    overrides = [
        *tiny_overrides(root, base / "runs", "detector"),
        "data.imgsz=128",
        "data.batch_size=16",
        "data.num_workers=2",
        "data.cache=true",
        "data.close_mosaic=3",
        "train.epochs=12",
        "train.nbs=16",
        "train.warmup_epochs=1",
    ]
    return SimpleNamespace(overrides=overrides, best=vocdet.train(vocdet.load_config(None, overrides)))


@pytest.fixture(scope="session")
def checkpoint(detector_run: SimpleNamespace) -> Path:
    """The best checkpoint of ``detector_run``, for inference tests."""
    return detector_run.best


@pytest.fixture(scope="session")
def ultralytics_assets() -> list[Path]:
    """bus.jpg and zidane.jpg, the real photos that ship inside the ultralytics package."""
    from vocdet.infer.export import ultralytics_assets

    return ultralytics_assets()


class ServerProcess:
    """A real ``vocdet serve`` process on a free loopback port (``url``), started and waited for until ready."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 60.0):
        import time

        import httpx

        from vocdet.bench.load import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vocdet", "serve", "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=REPO,
        )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vocdet serve exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"vocdet serve was not ready within {ready_timeout} s")

    def stop(self, timeout: float = 30.0) -> str:
        """SIGTERM, wait, and return everything the server printed."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read() if self.proc.stdout else ""


@pytest.fixture(scope="session")
def onnx_model(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``checkpoint`` fixture exported to ONNX (dynamic batch), as ``vocdet serve --onnx`` takes it."""
    from vocdet.infer.export import export

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export(checkpoint, overrides=["export.dynamic_batch=true", f"export.output={out}"])


@pytest.fixture(scope="session")
def int8_model(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``checkpoint`` fixture exported to int8 ONNX (``vocdet export --int8``, dynamic batch)."""
    from vocdet.infer.export import export

    out = tmp_path_factory.mktemp("int8") / "best-int8.onnx"
    return export(checkpoint, overrides=["export.int8=true", "export.dynamic_batch=true", f"export.output={out}"])


@pytest.fixture(scope="module")
def server(onnx_model: Path):
    """A running ``vocdet serve --onnx`` on loopback (module-scoped; stopped with SIGTERM afterwards)."""
    srv = ServerProcess("--onnx", str(onnx_model), "--name", "voc")
    yield srv
    srv.stop()


INSTALL_CHROMIUM = "apt-get install -y --no-install-recommends chromium && pip install playwright"


def chromium_path() -> str:
    """Debian's Chromium (or another Chromium/Chrome) for the browser tests; a clear failure when there is none."""
    candidates = [os.environ.get("VOCDET_CHROMIUM"), "/usr/lib/chromium/chromium"]  # the Debian binary itself
    candidates += [shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    pytest.fail(f"no Chromium found (set VOCDET_CHROMIUM or install it: {INSTALL_CHROMIUM})", pytrace=False)
