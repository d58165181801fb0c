"""``vocdet export`` and ``vocdet predict`` through the real CLI: ONNX (raw and with NMS in the graph), TorchScript,
Ultralytics .pt, each read back and compared with the checkpoint; a plain ONNX Runtime consumer; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error
from vocdet.core.boxes import letterbox
from vocdet.core.detections import match_detections
from vocdet.core.images import read_image
from vocdet.infer.detector import Detector

pytestmark = pytest.mark.slow


def _agreement(a: list, b: list) -> tuple[int, int]:
    pairs = [match_detections(x, y) for x, y in zip(a, b, strict=True)]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


@pytest.fixture(scope="module")
def nms_onnx(checkpoint: Path, sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    proc = run_cli(
        "export",
        "--checkpoint",
        str(checkpoint),
        "--format",
        "onnx",
        "--dynamic-batch",
        "--nms",
        "--output",
        str(out),
        "predict.conf=0.01",  # a small model: a low baked-in threshold keeps boxes to compare
        f"export.parity_images=[{sample_root / 'JPEGImages'}]",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "parity vs PyTorch on 100 images" in proc.stdout and "exported" in proc.stdout
    return out


def test_onnx_carries_its_metadata(nms_onnx: Path, checkpoint: Path) -> None:
    import onnx

    import vocdet

    props = {p.key: p.value for p in onnx.load(str(nms_onnx)).metadata_props}
    meta = json.loads(props["vocdet"])
    assert meta["class_names"] == list(vocdet.VOC_CLASSES) and json.loads(props["names"]) == meta["class_names"]
    assert meta["imgsz"] == 128 and meta["stride"] == 32 and meta["nms"] and meta["dynamic_batch"]
    assert meta["vocdet_version"] == vocdet.__version__ and meta["ultralytics_version"].startswith("8.4")
    assert len(meta["config_hash"]) == 16 and props["config_hash"] == meta["config_hash"]


def test_plain_onnxruntime_consumer_gets_final_boxes(nms_onnx: Path, sample_root: Path) -> None:
    """Only numpy + onnxruntime: letterbox two images, run, read (N, 7) rows per image."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(nms_onnx), providers=["CPUExecutionProvider"])
    paths = sorted((sample_root / "JPEGImages").glob("*.jpg"))[:2]
    batch = np.stack([letterbox(read_image(p), 128)[0] for p in paths]).transpose(0, 3, 1, 2)
    (dets,) = session.run(None, {"images": batch.astype(np.float32) / 255})
    assert dets.ndim == 2 and dets.shape[1] == 7
    assert set(np.unique(dets[:, 0]).astype(int)) <= {0, 1}
    assert (dets[:, 5] > 0.01).all() and ((dets[:, 6] >= 0) & (dets[:, 6] < 20)).all()
    assert (dets[:, 3] >= dets[:, 1]).all() and (dets[:, 4] >= dets[:, 2]).all()
    for i in (0, 1):  # each image's rows come sorted by score
        scores = dets[dets[:, 0] == i, 5]
        assert (np.diff(scores) <= 0).all()


def test_predict_onnx_and_checkpoint_agree_on_the_real_sample(
    nms_onnx: Path, checkpoint: Path, sample_root: Path, tmp_path: Path
) -> None:
    images = sample_root / "JPEGImages"
    runs = {}
    for flag, model in (("--onnx", nms_onnx), ("--checkpoint", checkpoint)):
        out = tmp_path / flag.strip("-")
        proc = run_cli("predict", str(images), flag, str(model), "--out", str(out), "--conf", "0.01")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "100 images" in proc.stdout and "detections" in proc.stdout
        assert len(list(out.glob("*.jpg"))) == 100
        runs[flag] = json.loads((out / "detections.json").read_text())
    a, b = runs["--onnx"], runs["--checkpoint"]
    assert len(b) > 100
    key = lambda r: (r["image_id"], r["class"], round(r["score"], 2))  # noqa: E731
    assert len(a) == len(b)
    for ra, rb in zip(sorted(a, key=key), sorted(b, key=key)):
        assert ra["image_id"] == rb["image_id"] and ra["class"] == rb["class"]
        assert abs(ra["score"] - rb["score"]) < 1e-3
        assert np.abs(np.subtract(ra["bbox"], rb["bbox"])).max() < 0.5


def test_detections_json_scores_with_eval(checkpoint: Path, sample_root: Path, tmp_path: Path) -> None:
    """predict's JSON is the eval --detections format: it scores on the sample like any detections file."""
    proc = run_cli(
        "predict",
        str(sample_root / "JPEGImages"),
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(tmp_path),
        "--no-save-images",
        "--conf",
        "0.001",
    )
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob("*.jpg"))
    proc = run_cli(
        "eval",
        "--detections",
        str(tmp_path / "detections.json"),
        f"data.root={sample_root}",
        "data.val_sets=[]",
        "--output",
        str(tmp_path / "m.json"),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "m.json").read_text())["map50"] >= 0


@pytest.mark.parametrize(
    "fmt, extra",
    [("onnx", []), ("onnx", ["--fixed-batch", "export.rect=false"]), ("torchscript", []), ("ultralytics", [])],
)
def test_every_format_reads_back_like_the_checkpoint(
    fmt: str, extra: list[str], checkpoint: Path, sample_root: Path, tmp_path: Path
) -> None:
    suffix = {"onnx": ".onnx", "torchscript": ".torchscript", "ultralytics": ".pt"}[fmt]
    out = tmp_path / f"m{suffix}"
    proc = run_cli("export", "--checkpoint", str(checkpoint), "-f", fmt, "--output", str(out), *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "boxes matched" in proc.stdout and out.is_file() and not list(tmp_path.glob("*.partial"))
    if fmt == "ultralytics":
        from ultralytics import YOLO

        assert YOLO(str(out)).names[11] == "dog"
        return
    exported = Detector.load(out)
    ref = Detector.from_checkpoint(checkpoint)
    images = sorted((sample_root / "JPEGImages").glob("*.jpg"))[:30]
    if not exported.rect:  # a fixed square input: compare with the checkpoint on the same square letterbox
        ref.rect = False
    m, t = _agreement(ref.predict(images, conf=0.01), exported.predict(images, conf=0.01))
    assert t > 20 and m / t >= 0.99


def test_export_failing_its_parity_check_leaves_nothing(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    proc = run_cli("export", "--checkpoint", str(checkpoint), "--output", str(out), "export.parity_min_match=1.01")
    assert_one_line_error(proc, "disagrees with PyTorch", "nothing was written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--format", "tflite"], ["export.format must be one of", "onnx"]),
        (["--format", "torchscript", "--nms"], ["NMS", "onnx"]),
        (["--half"], ["half precision needs a CUDA device"]),
        (["--output", "/proc/vocdet/m.onnx"], ["/proc/vocdet"]),
        (["--opset", "3"], ["opset"]),
        (["export.no_such=1"], ["unknown config key 'export.no_such'"]),
    ],
)
def test_export_bad_input(args: list[str], needles: list[str], checkpoint: Path) -> None:
    assert_one_line_error(run_cli("export", "--checkpoint", str(checkpoint), *args), *needles)


def test_export_and_predict_bad_files(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    assert_one_line_error(run_cli("export", "--checkpoint", str(tmp_path / "none.ckpt")), "checkpoint not found")
    assert_one_line_error(
        run_cli("export", "--checkpoint", str(tmp_path / "junk.ckpt")),
        "is not a vocdet checkpoint (not a PyTorch file)",
    )
    assert_one_line_error(run_cli("predict", str(tmp_path), "--checkpoint", str(checkpoint)), "no images")
    assert_one_line_error(run_cli("predict", "nothing*.jpg", "--checkpoint", str(checkpoint)), "no files match")
    assert_one_line_error(run_cli("predict", str(tmp_path / "x.jpg"), "--onnx", str(tmp_path / "m.onnx")), "not found")
    assert_one_line_error(run_cli("predict", "x.jpg"), "exactly one of --checkpoint or --onnx")


def test_predict_skips_an_unreadable_image_and_says_so(checkpoint: Path, sample_root: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    good = sorted((sample_root / "JPEGImages").glob("*.jpg"))[0]
    (src / good.name).write_bytes(good.read_bytes())
    (src / "broken.jpg").write_text("not an image")
    proc = run_cli("predict", str(src), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "broken.jpg" in proc.stdout + proc.stderr and "1 unreadable" in proc.stdout
    assert (tmp_path / "out" / f"{good.stem}.jpg").is_file() and (tmp_path / "out" / "detections.json").is_file()
