"""``vocdet.Detector``: fidelity with Ultralytics' predictor, every input kind, awkward images, drawing, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vocdet
from vocdet.core.detections import Detection, match_detections
from vocdet.core.images import load_image, read_image
from vocdet.errors import VocdetError
from vocdet.infer.detector import Detector

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def detector(checkpoint: Path) -> Detector:
    return Detector.from_checkpoint(checkpoint)


def _sample_images(sample_root: Path) -> list[Path]:
    return sorted((sample_root / "JPEGImages").glob("*.jpg"))


def test_same_detections_as_ultralytics_predictor(
    checkpoint: Path, detector: Detector, sample_root: Path, ultralytics_assets: list[Path], tmp_path: Path
) -> None:
    """Our weights written as an Ultralytics .pt: YOLO(pt).predict and Detector.predict find the same boxes."""
    from ultralytics import YOLO

    pt = vocdet.export(checkpoint, overrides=["export.format=ultralytics", f"export.output={tmp_path / 'm.pt'}"])
    yolo = YOLO(str(pt))
    images = [*ultralytics_assets, *_sample_images(sample_root)]
    conf = 0.01  # a 3-epoch model: a low threshold gives hundreds of boxes to compare
    matched = total = 0
    for path in images:
        r = yolo.predict(str(path), conf=conf, imgsz=detector.imgsz, verbose=False)[0]
        theirs = [
            Detection(tuple(b), float(s), int(c), detector.class_names[int(c)])
            for b, s, c in zip(r.boxes.xyxy.tolist(), r.boxes.conf.tolist(), r.boxes.cls.tolist())
        ]
        ours = detector.predict(path, conf=conf)[0]
        m, t = match_detections(theirs, ours, iou=0.99, score_tol=0.01)
        matched, total = matched + m, total + t
    assert total >= 200, f"only {total} boxes: the comparison would prove little"
    assert matched / total >= 0.99, f"{matched}/{total} boxes matched"


def test_every_input_kind_gives_the_same_detections(detector: Detector, sample_root: Path) -> None:
    path = _sample_images(sample_root)[0]
    ref = detector.predict(path, conf=0.01)[0]
    assert ref, "no detections to compare"
    rgb = read_image(path)
    inputs = {
        "str": str(path),
        "pil": Image.open(path),
        "numpy": rgb,
        "tensor uint8": torch.from_numpy(rgb).permute(2, 0, 1),
        "tensor float": torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
    }
    for name, image in inputs.items():
        got = detector.predict(image, conf=0.01)[0]
        if name == "tensor float":  # 0..1 floats round-trip to the same uint8 values
            assert match_detections(ref, got) == (len(ref), len(ref)), name
        else:
            assert got == ref, name
    # A batch runs the same letterboxed tensors; only the convolution algorithm for batch 3 may differ (~1e-6).
    batch = detector.predict([str(path), rgb, Image.open(path)], conf=0.01)
    batch += detector.predict(torch.from_numpy(rgb).permute(2, 0, 1)[None].repeat(2, 1, 1, 1), conf=0.01)
    assert [match_detections(ref, got) for got in batch] == [(len(ref), len(ref))] * 5


def test_batches_give_the_single_image_detections(detector: Detector, sample_root: Path) -> None:
    images = _sample_images(sample_root)[:20]  # several aspect ratios, so several letterbox shapes per batch
    single = [detector.predict(p, conf=0.01)[0] for p in images]
    batched = detector.predict(images, conf=0.01, batch_size=8)
    assert [match_detections(a, b) for a, b in zip(single, batched)] == [(len(a), len(a)) for a in single]
    assert sum(map(len, single)) > 10


def test_detection_fields_and_dict(detector: Detector, sample_root: Path) -> None:
    path = _sample_images(sample_root)[0]
    w, h = Image.open(path).size
    dets = detector.predict(path, conf=0.01, max_det=5)[0]
    assert 0 < len(dets) <= 5
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    for d in dets:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
        assert d.label == vocdet.VOC_CLASSES[d.class_id] and 0.01 < d.score <= 1
    row = json.loads(json.dumps(dets[0].to_dict()))
    assert set(row) == {"box", "score", "class_id", "label"} and len(row["box"]) == 4


def test_images_as_users_have_them(detector: Detector, sample_root: Path, tmp_path: Path) -> None:
    path = _sample_images(sample_root)[2]
    rgb = read_image(path)
    h, w = rgb.shape[:2]
    pil = Image.fromarray(rgb)

    # EXIF orientation 6 (camera held upright): pixels stored rotated; readers must turn them back.
    stored = pil.transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "exif.jpg", exif=exif, quality=95)
    upright = read_image(tmp_path / "exif.jpg")
    assert upright.shape == (h, w, 3)
    assert np.abs(upright.astype(int) - rgb).mean() < 4  # JPEG re-encoding noise only
    assert load_image(Image.open(tmp_path / "exif.jpg")).shape == (h, w, 3)

    pil.convert("L").save(tmp_path / "gray.png")
    pil.convert("RGBA").save(tmp_path / "rgba.png")
    pil.convert("P").save(tmp_path / "palette.png")
    wide = (rgb[..., 0].astype(np.uint16) * 257).astype(np.uint16)  # 16-bit grey: 8-bit value * 257
    Image.fromarray(wide).save(tmp_path / "gray16.png")
    gray = read_image(tmp_path / "gray.png")
    assert gray.shape == (h, w, 3) and (gray[..., 0] == gray[..., 2]).all()
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)
    assert read_image(tmp_path / "palette.png").shape == (h, w, 3)
    np.testing.assert_array_equal(read_image(tmp_path / "gray16.png")[..., 0], rgb[..., 0])
    np.testing.assert_array_equal(load_image(Image.open(tmp_path / "gray16.png"))[..., 0], rgb[..., 0])
    np.testing.assert_array_equal(load_image(wide)[..., 0], rgb[..., 0])
    np.testing.assert_array_equal(load_image(np.dstack([rgb, np.full((h, w), 255, np.uint8)])), rgb)

    tiny, thin, huge = (
        np.full((1, 1, 3), 200, np.uint8),
        np.zeros((1, 300, 3), np.uint8),
        np.zeros((3000, 4000, 3), np.uint8),
    )
    for image in (tmp_path / "exif.jpg", tmp_path / "gray16.png", tmp_path / "palette.png", tiny, thin, huge):
        for d in detector.predict(image, conf=0.01)[0]:
            assert all(np.isfinite(d.box))


def test_unreadable_inputs_name_the_problem(detector: Detector, sample_root: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("not an image")
    data = (_sample_images(sample_root)[0]).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {
        tmp_path / "notes.jpg": "cannot decode",
        tmp_path / "cut.jpg": "truncated",
        tmp_path / "empty.png": "empty",
        tmp_path / "missing.jpg": "not found",
    }
    for path, needle in cases.items():
        with pytest.raises(VocdetError, match=re.escape(needle)) as err:
            detector.predict(path)
        assert str(path) in str(err.value)
    with pytest.raises(VocdetError, match="shape"):
        detector.predict(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(VocdetError, match="cannot read an image"):
        detector.predict([object()])


def test_plot_draws_labelled_boxes(detector: Detector, sample_root: Path) -> None:
    path = _sample_images(sample_root)[0]
    dets = detector.predict(path, conf=0.01, max_det=3)[0]
    out = vocdet.plot(path, dets)
    original = Image.open(path).convert("RGB")
    assert isinstance(out, Image.Image) and out.size == original.size and out.mode == "RGB"
    changed = np.abs(np.asarray(out, int) - np.asarray(original, int)).sum(-1) > 0
    x1, y1, x2, _ = (round(v) for v in dets[0].box)
    assert changed[min(y1 + 1, out.size[1] - 1), x1 : x2 + 1].any()  # a box edge
    assert vocdet.plot(path, []).tobytes() == original.tobytes()


def test_bad_model_files_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.ckpt").write_bytes(b"\x00" * 100)
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01garbage")
    lin = torch.nn.Linear(2, 2)
    torch.onnx.export(lin, (torch.zeros(1, 2),), str(tmp_path / "foreign.onnx"), dynamo=False)
    cases = [
        (lambda: Detector.from_checkpoint(tmp_path / "none.ckpt"), "not found"),
        (
            lambda: Detector.from_checkpoint(tmp_path / "junk.ckpt"),
            "junk.ckpt is not a vocdet checkpoint (not a PyTorch file)",
        ),
        (lambda: Detector.from_checkpoint(tmp_path / "other.ckpt"), "not a vocdet checkpoint"),
        (lambda: Detector.from_onnx(tmp_path / "none.onnx"), "not found"),
        (lambda: Detector.from_onnx(tmp_path / "junk.onnx"), "ONNX"),
        (lambda: Detector.from_onnx(tmp_path / "foreign.onnx"), "not a vocdet ONNX export"),
    ]
    for load, needle in cases:
        with pytest.raises(VocdetError, match=re.escape(needle)) as err:
            load()
        assert "\n" not in str(err.value)
