"""Drift detection end to end: the profile a training run stores, carried by its exports, watched by a real
``vocdet serve`` under real traffic — quiet on new images of the training distribution, an alarm on the right feature
within one window of darkened, blurred, noisy or foreign (real VOC) images."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from tests.conftest import ServerProcess
from vocdet.core.checkpoint import load_checkpoint
from vocdet.infer.detector import Detector
from vocdet.infer.robustness import corrupt

pytestmark = pytest.mark.slow
WINDOW = 100


@pytest.fixture(scope="module")
def fresh_images(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """300 new images from the generator the ``checkpoint`` fixture was trained on (another seed)."""
    import vocdet

    root = vocdet.synthesize_voc(tmp_path_factory.mktemp("fresh") / "voc", images=300, seed=7, size=128)
    return [p.read_bytes() for p in sorted((root / "JPEGImages").glob("*.jpg"))]


def _jpeg(img: np.ndarray, quality: int = 92) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def _send(url: str, images: list[bytes]) -> None:
    with httpx.Client(timeout=30) as client:
        for data in images:
            r = client.post(f"{url}/predict/voc", files={"file": ("x.jpg", data)})
            assert r.status_code == 200, r.text


def _drift(url: str) -> dict:
    r = httpx.get(f"{url}/drift", params={"evaluate": "true", "model": "voc"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["models"]["voc"]


def test_the_profile_is_stored_by_training_and_carried_by_exports(
    checkpoint: Path, onnx_model: Path, int8_model: Path
) -> None:
    profile = load_checkpoint(checkpoint)["vocdet"]["drift"]
    assert profile["images"] == 60 and profile["conf"] == 0.25 and "validation split" in profile["source"]
    assert {"brightness", "sharpness", "noise", "jpeg_quality", "detections", "top_score"} <= set(profile["scalars"])
    assert sum(profile["classes"]) > 0, "the fixture model detects things: its class frequencies are not empty"
    assert Detector.from_onnx(onnx_model).drift_profile == profile  # fp32 export: the checkpoint's own
    int8 = Detector.from_onnx(int8_model).drift_profile  # int8: computed with the int8 model itself
    assert (
        int8 is not None
        and int8["images"] == 60
        and sorted(int8["scalars"]["brightness"]) == sorted(profile["scalars"]["brightness"])
    )


def test_served_traffic_alarms_on_drift_and_only_then(
    onnx_model: Path, fresh_images: list[bytes], sample_root: Path
) -> None:
    srv = ServerProcess(
        "--onnx", str(onnx_model), "--name", "voc",
        f"serve.drift_window={WINDOW}", f"serve.drift_min_window={WINDOW}", "serve.drift_interval_s=3600",
    )  # fmt: skip
    try:
        assert _drift(srv.url)["evaluated"] is False  # nothing served yet
        models = httpx.get(f"{srv.url}/models").json()
        assert models[0]["drift"] is True
        # In distribution: three full windows of new images from the training generator, each tested.
        for k in range(3):
            _send(srv.url, fresh_images[k * WINDOW : (k + 1) * WINDOW])
            report = _drift(srv.url)
            assert report["window"] == WINDOW and report["evaluated_seen"] == (k + 1) * WINDOW
            assert not report["alarm"], {f: r for f, r in report["features"].items() if r["drifted"]}
        # Drift: one window of each kind, the alarm on the feature that stands for it.
        for how, feature in (("dark", "brightness"), ("blur", "sharpness"), ("noise", "noise")):
            _send(srv.url, [corrupt(d, how, 2, i) for i, d in enumerate(fresh_images[:WINDOW])])
            report = _drift(srv.url)
            assert report["alarm"] and feature in report["drifted"], (how, report["drifted"])
        # Another distribution: real VOC photos against a model of synthetic shapes.
        real = [p.read_bytes() for p in sorted((sample_root / "JPEGImages").glob("*.jpg"))]
        _send(srv.url, real[:WINDOW])
        report = _drift(srv.url)
        assert report["alarm"] and {"embedding", "width", "height"} <= set(report["drifted"]), report["drifted"]
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert re.search(r'vocdet_drift_alarm\{model="voc"\} 1\.0', metrics)
        assert re.search(r'vocdet_drift_score\{feature="brightness",model="voc"\} [0-9.]+', metrics)
        assert re.search(r'vocdet_drift_evaluations_total\{model="voc"\} 7\.0', metrics)
        assert re.search(r'vocdet_drift_alarms_total\{model="voc"\} 4\.0', metrics)
        assert re.search(rf'vocdet_drift_window\{{model="voc"\}} {WINDOW}\.0', metrics)
        assert httpx.get(f"{srv.url}/drift", params={"model": "nope"}).status_code == 404
    finally:
        srv.stop()


def test_a_model_without_a_profile_serves_with_drift_unavailable(checkpoint: Path, tmp_path: Path) -> None:
    from vocdet.infer.export import export

    bare = export(checkpoint, overrides=["drift.profile=false", f"export.output={tmp_path / 'bare.onnx'}"])
    assert Detector.from_onnx(bare).drift_profile is None
    srv = ServerProcess("--onnx", str(bare), "--name", "voc")
    try:
        r = httpx.post(f"{srv.url}/predict", files={"file": ("x.jpg", _jpeg(np.full((64, 64, 3), 90, np.uint8)))})
        assert r.status_code == 200
        status = httpx.get(f"{srv.url}/drift").json()["models"]["voc"]
        assert status["available"] is False and "no reference profile" in status["reason"]
        assert httpx.get(f"{srv.url}/models").json()[0]["drift"] is False
    finally:
        srv.stop()
