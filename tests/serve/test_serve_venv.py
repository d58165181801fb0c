"""The serving image's install, without Docker: a fresh venv built exactly as ``docker/serve.Dockerfile`` builds it
(``pip install -c constraints.txt -r docker/serve-requirements.txt``, then ``pip install --no-deps .`` of the same
files the image copies) holds no torch, Lightning, Ultralytics or W&B, and still serves an ONNX model
(``vocdet serve --onnx``, a real process on loopback) and runs ``vocdet predict --onnx``, with the same detections
as the full install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import REPO
from vocdet.bench.load import free_port
from vocdet.core.voc import VOC_OFFSET
from vocdet.infer.detector import Detector

pytestmark = pytest.mark.slow

TRAINING = ("torch", "torchvision", "lightning", "ultralytics", "wandb", "matplotlib")
CONF = "0.01"  # the fixture model is trained on synthetic shapes: low scores on real photos


def venv_env() -> dict[str, str]:
    """The environment for the serving venv's processes: nothing of this one's on sys.path, no pip cache (pip's
    own configuration, such as its index, still applies)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "PYTHONUNBUFFERED": "1", "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "OMP_NUM_THREADS": "1"}  # fmt: skip


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv built as the serving image builds it (a few minutes at most; everything under tmp_path)."""
    base = tmp_path_factory.mktemp("serve-venv")
    env = venv_env()
    # The image's build context: what serve.Dockerfile COPYs (the build writes build/ into it, not into the repo).
    app = base / "app"
    (app / "docker").mkdir(parents=True)
    for name in ("constraints.txt", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, app / name)
    shutil.copy2(REPO / "docker" / "serve-requirements.txt", app / "docker")
    for name in ("vocdet", "configs"):
        shutil.copytree(REPO / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))

    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=180, env=env, cwd=base)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input", "--quiet"]
    for args in (["-c", "constraints.txt", "-r", "docker/serve-requirements.txt"], ["--no-deps", "."]):
        proc = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=600, env=env, cwd=app)
        assert proc.returncode == 0, f"pip install {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
    return venv


def venv_python(venv: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd,
        env=venv_env(),
    )  # fmt: skip


def test_the_serving_venv_has_no_training_stack(serve_venv: Path, tmp_path: Path) -> None:
    torch = venv_python(serve_venv, "import torch", tmp_path)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr, torch.stdout + torch.stderr
    found = venv_python(
        serve_venv,
        "import importlib.util, json, vocdet; "
        f"print(json.dumps([vocdet.__file__, [m for m in {TRAINING!r} if importlib.util.find_spec(m)]]))",
        tmp_path,
    )
    assert found.returncode == 0, found.stderr
    location, installed = json.loads(found.stdout)
    assert Path(location).is_relative_to(serve_venv), location  # the installed copy, not the repo's
    assert installed == []


def images(sample_root: Path, n: int) -> list[Path]:
    return sorted((sample_root / "JPEGImages").glob("*.jpg"))[:n]


def as_rows(detections: list, offset: tuple[float, ...] = (0, 0, 0, 0)) -> list[tuple[str, float, list[float]]]:
    return [(d.label, d.score, [v + o for v, o in zip(d.box, offset)]) for d in detections]


def assert_same(got: list[tuple[str, float, list[float]]], want: list[tuple[str, float, list[float]]]) -> None:
    """Same detections as the full install's Detector (OpenCV headless vs the full build, same ONNX Runtime)."""
    assert len(got) == len(want), (got, want)
    for (label, score, box), (w_label, w_score, w_box) in zip(got, want):
        assert label == w_label and abs(score - w_score) < 1e-4
        assert max(abs(a - b) for a, b in zip(box, w_box)) < 1e-2


def test_serve_onnx_from_the_serving_venv(
    serve_venv: Path, onnx_model: Path, sample_root: Path, tmp_path: Path
) -> None:
    image = images(sample_root, 1)[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    cmd = [str(serve_venv / "bin" / "vocdet"), "serve", "--onnx", str(onnx_model), "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=venv_env())
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"vocdet serve exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"not ready within 120 s:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        r = httpx.post(
            f"{url}/predict", params={"conf": CONF}, files={"file": (image.name, image.read_bytes(), "image/jpeg")},
            timeout=60,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["detections"], list)
        assert (body["width"], body["height"]) == Image.open(image).size
        want = as_rows(Detector.from_onnx(onnx_model).predict(image, conf=float(CONF))[0])
        assert want, "the fixture model finds nothing in the image: nothing would be compared"
        assert_same([(d["label"], d["score"], d["box"]) for d in body["detections"]], want)
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, log.read_text()  # SIGTERM: a graceful shutdown


def test_predict_onnx_from_the_serving_venv(
    serve_venv: Path, onnx_model: Path, sample_root: Path, tmp_path: Path
) -> None:
    paths = images(sample_root, 2)
    out = tmp_path / "predict"
    proc = subprocess.run(
        [str(serve_venv / "bin" / "vocdet"), "predict", "--onnx", str(onnx_model), *map(str, paths),
         "--out", str(out), "--conf", CONF],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=venv_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((out / "detections.json").read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        assert set(row) == {"image_id", "class", "score", "bbox"} and len(row["bbox"]) == 4
    assert {row["image_id"] for row in rows} <= {p.stem for p in paths}
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted(p.name for p in paths)  # annotated copies
    full = Detector.from_onnx(onnx_model).predict(paths, conf=float(CONF))
    for path, want in zip(paths, full):
        got = [(r["class"], r["score"], r["bbox"]) for r in rows if r["image_id"] == path.stem]
        assert_same(sorted(got, key=lambda r: -r[1]), as_rows(want, VOC_OFFSET.tolist()))  # JSON: VOC XML pixels
