"""Tests of vocdet.core.voc (VOC parsing, discovery), vocdet.data (image ops, augmentation, collate, DataModule) and vocdet.data.synth.

Pixel-exact checks write lossless PNG bytes under a ``.jpg`` name (OpenCV decodes by content, not by extension),
so colours and edges survive; everything else uses real JPEGs, from ``synthesize_voc`` or from the 100 genuine
VOC2012 images in ``../shared/data/voc2012-sample100`` (beside the repo; those tests skip if it is missing).
"""

from __future__ import annotations

import logging
import random
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vocdet.config import load_config
from vocdet.core.boxes import PAD_VALUE, letterbox, unletterbox_boxes
from vocdet.core.voc import CLASS_INDEX, VOC_CLASSES, VOC_OFFSET, load_records, parse_voc_xml, resolve_split
from vocdet.data.datamodule import VOCDataModule
from vocdet.data.dataset import VOCDataset, collate, imread, random_affine, random_hsv, resize_long_side
from vocdet.data.synth import class_style, synthesize_voc
from vocdet.errors import VocdetError

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "voc2012-sample100"
NO_HSV = ("data.hsv_h=0", "data.hsv_s=0", "data.hsv_v=0")
# Mosaic off and an identity affine: a training item is then the letterboxed image with its scaled boxes.
NO_AUG = (*NO_HSV, "data.mosaic=0", "data.translate=0", "data.scale=0", "data.fliplr=0", "data.flipud=0")


# ----------------------------------------------------------------------------------------------- helpers


def _hyp(*overrides: str):
    return load_config(None, list(overrides)).data


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)


def _sample() -> Path:
    if not SAMPLE.is_dir():
        pytest.skip(f"real VOC sample not found at {SAMPLE}")
    return SAMPLE


def _write_lossless(path: Path, img_bgr: np.ndarray) -> None:
    """PNG bytes under the given (``.jpg``) name: decoded by content, pixel-exact."""
    ok, buf = cv2.imencode(".png", img_bgr)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def _xml(filename: str, width: int, height: int, objects: list[tuple]) -> str:
    """VOC XML; ``objects`` are (name, (xmin, ymin, xmax, ymax), difficult, truncated), corners 1-based inclusive."""
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>{int(t)}</truncated>"
        f"<difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
        f"<ymax>{b[3]}</ymax></bndbox></object>"
        for name, b, d, t in objects
    )
    return (
        f"<annotation><folder>VOC2012</folder><filename>{filename}</filename><size><width>{width}</width>"
        f"<height>{height}</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>\n"
    )


def _flat_image(root: Path, image_id: str, img_bgr: np.ndarray, objects: list[tuple]) -> None:
    h, w = img_bgr.shape[:2]
    _write_lossless(root / "JPEGImages" / f"{image_id}.jpg", img_bgr)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"{image_id}.xml").write_text(_xml(f"{image_id}.jpg", w, h, objects))


def _all_pairs(root: Path) -> list[tuple[Path, str]]:
    return resolve_split(root, [], "train") + resolve_split(root, [], "val")


def _vocdet_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vocdet" and r.levelno == logging.WARNING]


def _colour_fraction(img_rgb: np.ndarray, box: np.ndarray, colour_rgb: np.ndarray, tol: int = 50) -> float:
    """Fraction of pixels in the middle half (per axis) of ``box`` within ``tol`` of ``colour_rgb``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    region = img_rgb[round(y1 + h / 4) : round(y2 - h / 4), round(x1 + w / 4) : round(x2 - w / 4)]
    if region.size == 0:
        return float("nan")
    return float((np.abs(region.astype(np.int32) - colour_rgb).max(-1) <= tol).mean())


def _rgb(class_id: int) -> np.ndarray:
    return np.array(class_style(int(class_id))[1][::-1], np.int32)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic images (32 train / 8 val), long side 256. Shared: do not modify."""
    return synthesize_voc(tmp_path_factory.mktemp("synth") / "voc", images=40, seed=0, size=256)


@pytest.fixture(scope="module")
def synth_records(synth_root: Path) -> list:
    recs = load_records(_all_pairs(synth_root), "synthetic")
    assert len(recs) == 40
    return recs


# ----------------------------------------------------------------------------------------------- 1. XML parsing


def test_class_order_is_standard_alphabetical():
    assert len(VOC_CLASSES) == 20 and len(set(VOC_CLASSES)) == 20
    assert list(VOC_CLASSES) == sorted(VOC_CLASSES)
    expected = {"aeroplane": 0, "bicycle": 1, "bottle": 4, "cat": 7, "diningtable": 10, "dog": 11, "person": 14}
    expected |= {"pottedplant": 15, "sofa": 17, "train": 18, "tvmonitor": 19}
    for name, idx in expected.items():
        assert CLASS_INDEX[name] == idx and VOC_CLASSES[idx] == name
    assert {n: i for i, n in enumerate(VOC_CLASSES)} == CLASS_INDEX
    np.testing.assert_array_equal(VOC_OFFSET, np.float32([1, 1, 0, 0]))


def test_real_sample_parses_with_known_statistics(caplog):
    root = _sample()
    ids = (root / "ImageSets" / "Main" / "all.txt").read_text().split()
    with caplog.at_level(logging.WARNING, logger="vocdet"):
        pairs = resolve_split(root, [], "all")
        recs = load_records(pairs, "sample")
    assert pairs == [(root, i) for i in ids]
    assert _vocdet_warnings(caplog) == []
    assert [r.id for r in recs] == ids and len(recs) == 100

    labels = np.concatenate([r.labels for r in recs])
    difficult = np.concatenate([r.difficult for r in recs])
    truncated = np.concatenate([r.truncated for r in recs])
    assert len(labels) == 273 and difficult.sum() == 38 and truncated.sum() == 137
    assert (labels == CLASS_INDEX["person"]).sum() == 91
    counts = [15, 14, 6, 11, 13, 6, 14, 5, 15, 14, 7, 8, 7, 5, 91, 7, 10, 10, 6, 9]
    np.testing.assert_array_equal(np.bincount(labels, minlength=20), counts)

    for r in recs:
        assert r.boxes.dtype == np.float32 and r.boxes.shape == (len(r.labels), 4)
        assert r.labels.dtype == np.int64 and r.difficult.dtype == bool and r.truncated.dtype == bool
        assert Path(r.image) == root / "JPEGImages" / f"{r.id}.jpg"
        img = cv2.imread(r.image)
        assert img.shape[:2] == (r.height, r.width), r.id
        # 1-based inclusive corners inside the image
        assert (r.boxes[:, :2] >= 1).all() and (r.boxes[:, 2] <= r.width).all() and (r.boxes[:, 3] <= r.height).all()
        assert (r.boxes[:, 2:] > r.boxes[:, :2]).all()
        # independent reference: the XML read directly
        objs = ET.parse(root / "Annotations" / f"{r.id}.xml").getroot().findall("object")
        ref_boxes = [[float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objs]
        np.testing.assert_array_equal(r.boxes, np.float32(ref_boxes).reshape(-1, 4))
        np.testing.assert_array_equal(r.truncated, [o.findtext("truncated") == "1" for o in objs])
        np.testing.assert_array_equal(r.difficult, [o.findtext("difficult") == "1" for o in objs])
        np.testing.assert_array_equal(r.labels, [VOC_CLASSES.index(o.findtext("name")) for o in objs])
    first = recs[0]
    assert (first.id, first.width, first.height) == ("2007_000027", 486, 500)
    np.testing.assert_array_equal(first.boxes, [[174, 101, 349, 351]])
    assert first.labels.tolist() == [14]


def test_parse_handwritten_xml(tmp_path):
    xml = tmp_path / "ann" / "img_1.xml"
    xml.parent.mkdir()
    xml.write_text(
        "<annotation><filename>other_name.jpg</filename>"
        "<size><width>320</width><height>240</height><depth>3</depth></size>"
        "<object><name>dog</name><truncated>1</truncated><difficult>0</difficult>"
        "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>320</xmax><ymax>100</ymax></bndbox></object>"
        "<object><name>person</name><truncated>0</truncated><difficult>1</difficult>"
        # a person-layout part carries its own bndbox: it is not an object
        "<part><name>head</name><bndbox><xmin>11</xmin><ymin>12</ymin><xmax>13</xmax><ymax>14</ymax></bndbox></part>"
        "<bndbox><xmin>10.5</xmin><ymin>20</ymin><xmax>60</xmax><ymax>200.25</ymax></bndbox></object>"
        "<object><name>tvmonitor</name>"  # no truncated/difficult tags: both default to False
        "<bndbox><xmin>100</xmin><ymin>110</ymin><xmax>120</xmax><ymax>130</ymax></bndbox></object>"
        "</annotation>"
    )
    rec = parse_voc_xml(xml)
    assert (rec.id, rec.width, rec.height) == ("img_1", 320, 240)
    assert rec.image == str(tmp_path / "JPEGImages" / "other_name.jpg")  # the XML's <filename>, beside Annotations
    np.testing.assert_array_equal(
        rec.boxes, np.float32([[1, 2, 320, 100], [10.5, 20, 60, 200.25], [100, 110, 120, 130]])
    )
    assert rec.boxes.dtype == np.float32
    assert rec.labels.tolist() == [11, 14, 19] and rec.labels.dtype == np.int64
    assert rec.difficult.tolist() == [False, True, False]
    assert rec.truncated.tolist() == [True, False, False]
    assert parse_voc_xml(xml, tmp_path / "x.jpg").image == str(tmp_path / "x.jpg")


def test_parse_xml_without_objects(tmp_path):
    xml = tmp_path / "empty.xml"
    xml.write_text(_xml("empty.jpg", 50, 40, []))
    rec = parse_voc_xml(xml)
    assert rec.boxes.shape == (0, 4) and rec.labels.shape == (0,) and rec.difficult.shape == (0,)


def test_unknown_class_is_labelled_minus_one_with_its_name(tmp_path):
    xml = tmp_path / "bad.xml"
    xml.write_text(_xml("bad.jpg", 50, 40, [("dog", (1, 1, 10, 10), 0, 0), ("dragon", (1, 1, 10, 10), 0, 0)]))
    rec = parse_voc_xml(xml)
    assert rec.labels.tolist() == [CLASS_INDEX["dog"], -1] and rec.names == ("dog", "dragon")


# ----------------------------------------------------------------------------------------------- 2. discovery


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    """VOCdevkit/VOC2007 (6 images: trainval 4, test 2) and VOC2012 (5 images: trainval 5), from synthesize_voc."""
    root = tmp_path / "VOCdevkit"
    for year, n, seed, n_trainval in (("2007", 6, 1, 4), ("2012", 5, 2, 5)):
        d = synthesize_voc(root / f"VOC{year}", images=n, seed=seed, size=128)
        ids = sorted(p.stem for p in (d / "Annotations").glob("*.xml"))
        main = d / "ImageSets" / "Main"
        for f in main.glob("*.txt"):
            f.unlink()
        (main / "trainval.txt").write_text("\n".join(ids[:n_trainval]) + "\n")
        if n_trainval < n:
            (main / "test.txt").write_text("\n".join(ids[n_trainval:]) + "\n")
    return root


def test_resolve_split_devkit_concatenates_sets(devkit):
    d07, d12 = devkit / "VOC2007", devkit / "VOC2012"
    pairs = resolve_split(devkit, ["2007/trainval", "2012/trainval"], "train")
    assert pairs == [(d07, f"synth_{i:06d}") for i in range(4)] + [(d12, f"synth_{i:06d}") for i in range(5)]
    assert resolve_split(devkit, ["2007/test"], "val") == [(d07, "synth_000004"), (d07, "synth_000005")]
    recs = load_records(pairs, "train")
    assert len(recs) == 9
    for (d, i), r in zip(pairs, recs):
        assert r.image == str(d / "JPEGImages" / f"{i}.jpg")
        ref = parse_voc_xml(d / "Annotations" / f"{i}.xml")
        np.testing.assert_array_equal(r.boxes, ref.boxes)
    # the two years hold different images under the same ids: each record must come from its own year
    assert not np.array_equal(recs[0].boxes, recs[4].boxes) or recs[0].width != recs[4].width


def test_resolve_split_devkit_missing_split_file(devkit):
    missing = devkit / "VOC2012" / "ImageSets" / "Main" / "test.txt"
    with pytest.raises(VocdetError) as e:
        resolve_split(devkit, ["2007/test", "2012/test"], "val")
    assert str(missing) in str(e.value)


def test_resolve_split_missing_root(tmp_path):
    with pytest.raises(VocdetError, match="vocdet data download") as e:
        resolve_split(tmp_path / "nope" / "VOCdevkit", ["2007/trainval"], "train")
    assert str(tmp_path / "nope" / "VOCdevkit") in str(e.value)


def test_resolve_split_flat_with_split_files(tmp_path, caplog):
    root = synthesize_voc(tmp_path / "flat", images=5, seed=0, size=64, val_fraction=0.4)
    with caplog.at_level(logging.WARNING, logger="vocdet"):
        train = resolve_split(root, ["2007/trainval"], "train")  # sets are ignored for a flat root
        val = resolve_split(root, ["2007/test"], "val")
    assert train == [(root, "synth_000002"), (root, "synth_000003"), (root, "synth_000004")]
    assert val == [(root, "synth_000000"), (root, "synth_000001")]
    assert _vocdet_warnings(caplog) == []


def test_resolve_split_flat_without_split_files_draws_one(tmp_path, caplog):
    root = synthesize_voc(tmp_path / "flat", images=10, seed=0, size=64)
    shutil.rmtree(root / "ImageSets")
    (root / "JPEGImages" / "no_annotation.jpg").write_bytes(b"x")  # an image without XML is not listed
    with caplog.at_level(logging.INFO, logger="vocdet"):
        train = resolve_split(root, ["2007/trainval"], "train", val_fraction=0.2, seed=3)
        val = resolve_split(root, ["2007/test"], "val", val_fraction=0.2, seed=3)
    assert len(val) == 2 and len(train) == 8
    assert sorted(train + val) == [(root, f"synth_{i:06d}") for i in range(10)]
    assert val == resolve_split(root, [], "val", val_fraction=0.2, seed=3)  # deterministic
    assert val != resolve_split(root, [], "val", val_fraction=0.2, seed=4)  # drawn by the seed
    assert _vocdet_warnings(caplog) == []
    said = [r.getMessage() for r in caplog.records if r.name == "vocdet"]
    assert said == [
        f"{root} has no split of its own: 2 of 10 images held out for validation (data.val_fraction=0.2, run.seed=3)"
    ]


# ----------------------------------------------------------------------------------------------- 3. corrupt inputs


def test_load_records_skips_bad_xml_and_missing_images_with_one_warning(tmp_path, caplog):
    root = synthesize_voc(tmp_path / "flat", images=7, seed=0, size=64)
    ann, jpg = root / "Annotations", root / "JPEGImages"
    full = (ann / "synth_000000.xml").read_text()
    (ann / "synth_000000.xml").write_text(full[: len(full) // 2])  # truncated XML
    (ann / "synth_000001.xml").write_bytes(b"\x00\xffnot xml at all")  # garbage
    (jpg / "synth_000002.jpg").unlink()  # XML whose JPEG is missing
    (ann / "synth_000003.xml").write_text("<annotation><object><name>dog</name><bndbox/></object></annotation>")
    (ann / "synth_000004.xml").write_text("<annotation><object><name>dog</name></object></annotation>")  # no size
    pairs = [(root, f"synth_{i:06d}") for i in range(7)] + [(root, "ghost")]  # ghost: no XML at all
    with caplog.at_level(logging.WARNING, logger="vocdet"):
        recs = load_records(pairs, "train")
    assert [r.id for r in recs] == ["synth_000005", "synth_000006"]
    warnings = _vocdet_warnings(caplog)
    assert len(warnings) == 1
    assert "skipped 6 train images" in warnings[0].getMessage()


def _root_with_corrupt_jpeg(tmp_path: Path) -> Path:
    root = synthesize_voc(tmp_path / "flat", images=3, seed=0, size=64)
    (root / "JPEGImages" / "synth_000001.jpg").write_bytes(b"this is not a jpeg" * 20)
    return root


def test_imread_names_an_undecodable_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(OSError, match=r"bad\.jpg"):
        imread(str(bad))


def test_truncated_jpeg_still_loads(tmp_path):
    """Current behaviour: a JPEG cut short decodes partially (libjpeg warns) and the item loads."""
    root = synthesize_voc(tmp_path / "flat", images=2, seed=0, size=64)
    path = root / "JPEGImages" / "synth_000000.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    recs = load_records(_all_pairs(root), "train")
    assert len(recs) == 2
    item = VOCDataset(recs, 64, augment=False)[[r.id for r in recs].index("synth_000000")]
    assert item["img"].shape == (3, 64, 64)


def test_load_records_skips_corrupt_jpeg(tmp_path, caplog):
    root = _root_with_corrupt_jpeg(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vocdet"):
        recs = load_records(_all_pairs(root), "train")
    assert sorted(r.id for r in recs) == ["synth_000000", "synth_000002"]
    warnings = _vocdet_warnings(caplog)
    assert len(warnings) == 1 and "skipped 1 train images" in warnings[0].getMessage()


@pytest.mark.parametrize("augment", [False, True], ids=["val", "train"])
def test_corrupt_jpeg_never_crashes_an_epoch(tmp_path, augment):
    root = _root_with_corrupt_jpeg(tmp_path)
    recs = load_records(_all_pairs(root), "train")
    ds = VOCDataset(recs, 64, augment=augment, hyp=_hyp())
    _seed(0)
    batches = list(DataLoader(ds, batch_size=2, collate_fn=collate, num_workers=0))
    assert sum(len(b["img"]) for b in batches) == len(ds)


# ----------------------------------------------------------------------------------------------- 4. image ops

SHAPES = {
    "tall": (500, 333),
    "wide": (333, 500),
    "square": (300, 300),
    "tiny_7x300": (7, 300),
    "tiny_300x7": (300, 7),
    "large": (1200, 1600),
    "small_upscaled": (50, 80),
    "odd_padding": (101, 256),  # 155 rows of padding: 77 on top, 78 below
}


@pytest.mark.parametrize("hw", SHAPES.values(), ids=SHAPES.keys())
def test_letterbox_round_trip(hw):
    h, w = hw
    size = 256
    img = np.zeros((h, w, 3), np.uint8)  # black content, so the grey padding is unambiguous
    out, ratio, pad = letterbox(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    r = min(size / h, size / w)
    assert ratio == pytest.approx((round(w * r) / w, round(h * r) / h))  # the exact gains of the rounded resize

    # content occupies exactly the image's mapped extent (to half a pixel); everything else is pad grey
    content = (out != PAD_VALUE).any(-1)
    ys, xs = np.nonzero(content)
    assert xs.min() == pad[0] and ys.min() == pad[1]
    assert xs.max() + 1 == round(w * ratio[0] + pad[0]) and ys.max() + 1 == round(h * ratio[1] + pad[1])
    assert content.sum() == (xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min())
    assert (out[~content] == PAD_VALUE).all() and (out[content] == 0).all()
    # centred: the two pad strips differ by at most one pixel
    assert abs((size - 1 - xs.max()) - xs.min()) <= 1 and abs((size - 1 - ys.max()) - ys.min()) <= 1

    rng = np.random.default_rng(h * 10_000 + w)
    x1, y1 = rng.uniform(0, w, 64), rng.uniform(0, h, 64)
    boxes = np.stack([x1, y1, rng.uniform(x1, w), rng.uniform(y1, h)], 1)
    mapped = boxes * np.array([ratio[0], ratio[1]] * 2) + np.array([pad[0], pad[1]] * 2)
    assert (mapped >= 0).all() and (mapped <= size).all()
    back = unletterbox_boxes(mapped, ratio, pad, w, h)
    np.testing.assert_allclose(back, boxes, atol=1e-4)
    back32 = unletterbox_boxes(mapped.astype(np.float32), ratio, pad, w, h)
    np.testing.assert_allclose(back32, boxes, atol=1e-3)


def test_unletterbox_clips_to_the_original_image():
    _, ratio, pad = letterbox(np.zeros((100, 200, 3), np.uint8), 128)
    assert (ratio, pad) == ((0.64, 0.64), (0, 32))
    boxes = np.float32([[-10.0, 0.0, 140.0, 128.0], [64.0, 64.0, 96.0, 80.0]])
    out = unletterbox_boxes(boxes, ratio, pad, 200, 100)
    np.testing.assert_array_equal(out, np.float32([[0.0, 0.0, 200.0, 100.0], [100.0, 50.0, 150.0, 75.0]]))
    assert boxes[0, 0] == -10  # input untouched


def test_resize_long_side():
    img = np.zeros((500, 333, 3), np.uint8)
    assert resize_long_side(img, 256, augment=True).shape == (256, 171, 3)  # short side rounded up, as Ultralytics
    assert resize_long_side(np.zeros((40, 80, 3), np.uint8), 256, augment=False).shape == (128, 256, 3)
    same = np.zeros((256, 100, 3), np.uint8)
    assert resize_long_side(same, 256, augment=True) is same
    tiny = resize_long_side(np.zeros((7, 300, 3), np.uint8), 256, augment=True)
    assert tiny.shape == (6, 256, 3)


def test_random_affine_identity_keeps_image_and_boxes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (128, 128, 3), np.uint8)
    boxes = np.float32([[10, 20, 50, 70], [0, 0, 128, 128]])
    _seed(0)
    out, new, keep = random_affine(img, boxes, 128, 0, 0, 0, 0, 0)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(new, boxes)
    assert keep.tolist() == [True, True]


def test_random_affine_from_mosaic_canvas_crops_the_centre():
    """A 2S canvas with no translation/scale comes out as its central S x S window (Ultralytics' mosaic border)."""
    s = 64
    canvas = np.random.default_rng(1).integers(0, 255, (2 * s, 2 * s, 3), np.uint8)
    boxes = np.float32([[40, 40, 80, 90], [0, 0, 10, 10]])  # the second lies outside the window
    out, new, keep = random_affine(canvas, boxes, s, 0, 0, 0, 0, 0)
    np.testing.assert_array_equal(out, canvas[s // 2 : s // 2 + s, s // 2 : s // 2 + s])
    assert keep.tolist() == [True, False]
    np.testing.assert_array_equal(new, [[8, 8, 48, 58]])


@pytest.mark.parametrize("degrees", [0.0, 25.0])
def test_random_affine_boxes_follow_the_pixels(degrees):
    size = 256
    img = np.full((size, size, 3), 0, np.uint8)
    colours = [(0, 0, 255), (0, 255, 0), (255, 0, 0)]
    boxes = np.float32([[20, 30, 90, 100], [140, 40, 230, 80], [60, 150, 200, 230]])
    for (x1, y1, x2, y2), c in zip(boxes.astype(int), colours):
        img[y1:y2, x1:x2] = c
    for seed in range(8):
        _seed(seed)
        out, new, keep = random_affine(img, boxes, size, degrees, 0.1, 0.5, 0, 0)
        assert out.shape == (size, size, 3)
        kept_colours = [c for c, k in zip(colours, keep) if k]
        assert len(new) == len(kept_colours)
        for b, c in zip(new, kept_colours):
            ys, xs = np.nonzero(np.abs(out.astype(int) - c).max(-1) < 60)
            tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            if degrees == 0:  # axis-aligned: the box is the object's extent
                np.testing.assert_allclose(b, tight, atol=1.5)
            else:  # rotated: the box encloses the object
                assert (b[:2] <= tight[:2] + 1).all() and (b[2:] >= tight[2:] - 1).all()
                assert (b >= 0).all() and (b <= size).all()


def test_random_affine_on_bgra_matches_bgr():
    """The pipeline warps BGRA (OpenCV's 4-channel warp is vectorised); the colour channels are the BGR warp's."""
    canvas = np.random.default_rng(2).integers(0, 255, (256, 256, 3), np.uint8)
    boxes = np.float32([[40, 40, 120, 130]])
    for perspective in (0.0, 0.001):
        _seed(4)
        out3, new3, _ = random_affine(canvas, boxes, 128, 10, 0.1, 0.5, 2, perspective)
        _seed(4)
        out4, new4, _ = random_affine(
            cv2.cvtColor(canvas, cv2.COLOR_BGR2BGRA), boxes, 128, 10, 0.1, 0.5, 2, perspective
        )
        np.testing.assert_array_equal(out4[..., :3], out3)
        np.testing.assert_array_equal(new4, new3)


def test_random_affine_drops_degenerate_boxes():
    img = np.zeros((64, 64, 3), np.uint8)
    boxes = np.float32([[10, 10, 12, 40], [10, 10, 40, 40], [30, 5, 33, 60]])  # 2 px wide: dropped (w must be > 2)
    _, new, keep = random_affine(img, boxes, 64, 0, 0, 0, 0, 0)
    assert keep.tolist() == [False, True, True]
    np.testing.assert_array_equal(new, boxes[1:])
    _, empty_boxes, empty_keep = random_affine(img, np.zeros((0, 4), np.float32), 64, 0, 0, 0, 0, 0)
    assert empty_boxes.shape == (0, 4) and empty_keep.shape == (0,)


def test_random_hsv():
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)
    ref = img.copy()
    state = np.random.get_state()[1].copy()
    np.testing.assert_array_equal(random_hsv(img, 0, 0, 0), ref[..., ::-1])  # BGR in, RGB out
    np.testing.assert_array_equal(img, ref)  # the input is left alone
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # zero gains draw nothing

    np.random.seed(3)
    out = random_hsv(img, 0.5, 0.7, 0.4)
    assert (out != ref[..., ::-1]).mean() > 0.5

    grey = np.full((8, 8, 3), 100, np.uint8)
    np.random.seed(3)  # hue/saturation jitter leaves grey grey (lut_sat[0] = 0, as Ultralytics)
    assert (random_hsv(grey, 0.5, 0.9, 0.0) == 100).all()
    np.random.seed(3)  # uniform(-1, 1, 3) -> value gain factor 1 + 0.4 * r[2]
    r = np.random.uniform(-1, 1, 3)
    np.random.seed(3)
    out = random_hsv(grey, 0.0, 0.0, 0.4)
    assert (out == out[0, 0]).all() and out[0, 0, 0] == int(np.clip(100 * (1 + 0.4 * r[2]), 0, 255))


@pytest.mark.parametrize("gains", [(0.015, 0.7, 0.4), (0.5, 0.9, 0.9), (0.0, 0.0, 0.0)])
def test_random_hsv_matches_ultralytics_for_bgr_and_bgra(gains):
    from ultralytics.data.augment import RandomHSV

    bgr = np.random.default_rng(1).integers(0, 255, (48, 40, 3), np.uint8)
    theirs = {"img": bgr.copy()}
    np.random.seed(7)
    RandomHSV(*gains)(theirs)
    for img in (bgr, cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)):
        np.random.seed(7)
        np.testing.assert_array_equal(random_hsv(img, *gains), theirs["img"][..., ::-1])


# ----------------------------------------------------------------------------------------------- 5. augmentation


def test_augmented_boxes_sit_on_their_objects(synth_records):
    size = 256
    ds = VOCDataset(synth_records, size, augment=True, hyp=_hyp(*NO_HSV))
    _seed(0)
    on, inner, off, n_items = [], [], [], 60
    for k in range(n_items):
        item = ds[k % len(ds)]
        img, boxes, cls = item["img"], item["boxes"], item["cls"]
        assert img.dtype == torch.uint8 and img.shape == (3, size, size)
        assert boxes.dtype == np.float32 and boxes.shape == (len(cls), 4) and cls.dtype == np.int64
        assert (boxes >= 0).all() and (boxes <= size).all()
        assert (boxes[:, 2:] - boxes[:, :2] > 2).all()
        rgb = img.numpy().transpose(1, 2, 0)
        for b, c in zip(boxes, cls):
            w, h = b[2] - b[0], b[3] - b[1]
            if min(w, h) < 8:
                continue
            on.append(_colour_fraction(rgb, b, _rgb(c)))
            if (b[:2] > 0.5).all() and (b[2:] < size - 0.5).all():  # not cut by the canvas border
                inner.append(on[-1])
            dx = w if b[2] + w <= size else -w  # the same box moved by its own width
            if b[0] + dx >= 0 and b[2] + dx <= size:
                off.append(_colour_fraction(rgb, b + np.float32([dx, 0, dx, 0]), _rgb(c)))
    on_a, inner_a, off_a = np.array(on), np.array(inner), np.array(off)
    assert len(on_a) >= 150 and len(inner_a) >= 80 and len(off_a) >= 50
    # Boxes cut by the canvas border may hold only a thin corner of a triangle or cross; whole boxes never do.
    assert inner_a.min() >= 0.5, np.sort(inner_a)[:5]
    assert np.median(on_a) > 0.8 and (on_a >= 0.3).mean() >= 0.9, np.sort(on_a)[:10]
    assert np.median(off_a) < 0.05 and (off_a > 0.5).mean() < 0.02, np.sort(off_a)[-5:]


def test_mosaic_combines_images_and_close_mosaic_turns_it_off(synth_records):
    size = 256
    hyp = _hyp(*NO_HSV, "data.translate=0", "data.scale=0", "data.fliplr=0")  # mosaic=1.0 (default)
    ds = VOCDataset(synth_records, size, augment=True, hyp=hyp)
    own = [int((~r.difficult).sum()) for r in synth_records]
    _seed(0)
    mosaic_counts = [len(ds[i]["cls"]) for i in range(20)]
    assert mosaic_counts != own[:20] and sum(mosaic_counts) > sum(own[:20])

    ds.close_mosaic()
    assert ds.mosaic_on.item() == 0
    for i, r in enumerate(synth_records):
        item = ds[i]
        keep = ~r.difficult
        assert len(item["cls"]) == own[i]
        np.testing.assert_array_equal(item["cls"], r.labels[keep])
        # exactly the letterboxed record boxes (resized long side 256 == synth size, so ratio 1)
        _, ratio, pad = letterbox(np.zeros((r.height, r.width, 3), np.uint8), size)
        expected = (r.boxes[keep] - VOC_OFFSET) * np.float32([ratio[0], ratio[1]] * 2) + np.float32(
            [pad[0], pad[1]] * 2
        )
        np.testing.assert_allclose(item["boxes"], expected, atol=1e-3)


def test_close_mosaic_reaches_persistent_workers(synth_records):
    recs = synth_records[:6]
    ds = VOCDataset(recs, 128, augment=True, hyp=_hyp(*NO_HSV, "data.translate=0", "data.scale=0"))
    own = [int((~r.difficult).sum()) for r in recs]
    torch.manual_seed(0)  # the worker's random/numpy seeds derive from it
    loader = DataLoader(ds, batch_size=1, num_workers=1, persistent_workers=True, collate_fn=collate)
    first = [len(b["cls"]) for b in loader]
    assert first != own
    ds.close_mosaic()  # in the main process, after the worker has started
    assert [len(b["cls"]) for b in loader] == own


@pytest.mark.parametrize("axis", ["fliplr", "flipud"])
def test_flip_mirrors_image_and_boxes(synth_records, axis):
    size = 256
    plain = VOCDataset(synth_records, size, augment=True, hyp=_hyp(*NO_HSV, "data.fliplr=0", "data.flipud=0"))
    flipped = VOCDataset(synth_records, size, augment=True, hyp=_hyp(*NO_HSV, "data.fliplr=0", f"data.{axis}=1"))
    for i in range(6):
        _seed(i)
        a = plain[i]
        _seed(i)
        b = flipped[i]
        np.testing.assert_array_equal(a["cls"], b["cls"])
        if axis == "fliplr":
            assert torch.equal(b["img"], a["img"].flip(-1))
            expected = np.stack(
                [size - a["boxes"][:, 2], a["boxes"][:, 1], size - a["boxes"][:, 0], a["boxes"][:, 3]], 1
            )
        else:
            assert torch.equal(b["img"], a["img"].flip(-2))
            expected = np.stack(
                [a["boxes"][:, 0], size - a["boxes"][:, 3], a["boxes"][:, 2], size - a["boxes"][:, 1]], 1
            )
        np.testing.assert_allclose(b["boxes"], expected, atol=1e-4)


def test_training_item_box_matches_pixels_exactly(tmp_path):
    """VOC's 1-based inclusive corners: pixels x1..x2-1 (0-based) are written as xmin=x1+1, xmax=x2."""
    img = np.full((192, 256, 3), 30, np.uint8)  # h=192: letterbox pads 32 rows top and bottom
    img[60:120, 50:100] = (0, 0, 255)  # BGR red
    _flat_image(tmp_path, "a", img, [("aeroplane", (51, 61, 100, 120), 0, 0), ("dog", (5, 5, 20, 8), 1, 0)])
    recs = load_records([(tmp_path, "a")], "train")
    ds = VOCDataset(recs, 256, augment=True, hyp=_hyp(*NO_AUG))
    item = ds[0]
    np.testing.assert_array_equal(item["boxes"], [[50, 92, 100, 152]])  # difficult object dropped
    assert item["cls"].tolist() == [0]
    red = (item["img"][0] == 255) & (item["img"][1] == 0) & (item["img"][2] == 0)
    ys, xs = torch.nonzero(red, as_tuple=True)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (50, 92, 100, 152)
    assert (item["img"][:, :32] == PAD_VALUE).all() and (item["img"][:, -32:] == PAD_VALUE).all()

    flipped = VOCDataset(recs, 256, augment=True, hyp=_hyp(*NO_AUG[:-2], "data.fliplr=1", "data.flipud=0"))[0]
    np.testing.assert_array_equal(flipped["boxes"], [[156, 92, 206, 152]])
    assert (flipped["img"][0, 92:152, 156:206] == 255).all() and (flipped["img"][0, 92:152, 150:156] != 255).all()


def test_load_scales_each_axis_by_its_own_ratio(tmp_path):
    img = np.zeros((500, 333, 3), np.uint8)  # resized to 256 x 171: x ratio 171/333 != y ratio 256/500
    _flat_image(tmp_path, "tall", img, [("cat", (1, 1, 333, 500), 0, 0)])
    recs = load_records([(tmp_path, "tall")], "train")
    resized, boxes, _ = VOCDataset(recs, 256, augment=True, hyp=_hyp()).load(0)
    assert resized.shape[:2] == (256, 171)
    np.testing.assert_allclose(boxes, [[0, 0, 171, 256]], atol=0.05)  # ymax is 256.76 today: past the image


# ----------------------------------------------------------------------------------------------- 6. validation items


def test_validation_item_is_rgb_letterboxed_with_original_gt(tmp_path):
    img = np.full((100, 200, 3), 50, np.uint8)
    img[10:50, 20:60] = (0, 0, 255)  # pure red in BGR
    img[50:90, 120:160] = (255, 0, 0)  # pure blue in BGR
    objects = [("bus", (21, 11, 60, 50), 0, 1), ("car", (121, 51, 160, 90), 1, 0)]
    _flat_image(tmp_path, "v", img, objects)
    (rec,) = load_records([(tmp_path, "v")], "val")
    item = VOCDataset([rec], 128, augment=False)[0]
    assert set(item) == {"img", "id", "orig_size", "ratio", "pad", "gt"}
    assert item["img"].dtype == torch.uint8 and item["img"].shape == (3, 128, 128)
    assert item["id"] == "v" and item["orig_size"] == (100, 200)
    assert item["ratio"] == pytest.approx((0.64, 0.64)) and item["pad"] == (0, 32)
    # red block (20..60, 10..50) -> centre (25.6, 51.2) in the letterboxed image: R channel first
    assert item["img"][:, 51, 25].tolist() == [255, 0, 0]
    assert item["img"][:, 77, 89].tolist() == [0, 0, 255]  # blue block centre (140, 70) -> (89.6, 76.8)
    assert (item["img"][:, :32] == PAD_VALUE).all() and (item["img"][:, 96:] == PAD_VALUE).all()
    boxes, labels, difficult = item["gt"]
    np.testing.assert_array_equal(boxes, [[21, 11, 60, 50], [121, 51, 160, 90]])  # XML coordinates, untouched
    assert labels.tolist() == [5, 6] and difficult.tolist() == [False, True]


def test_validation_items_on_real_images():
    root = _sample()
    recs = load_records(resolve_split(root, [], "all")[:4], "sample")
    ds = VOCDataset(recs, 320, augment=False)
    for r, item in zip(recs, (ds[i] for i in range(len(ds)))):
        assert item["orig_size"] == (r.height, r.width)
        scale = min(320 / r.height, 320 / r.width)
        assert item["ratio"] == pytest.approx((round(r.width * scale) / r.width, round(r.height * scale) / r.height))
        assert item["img"].shape == (3, 320, 320)
        assert item["gt"][0] is r.boxes and item["gt"][1] is r.labels and item["gt"][2] is r.difficult
        # the letterboxed content is the original image, RGB, resized
        bgr = cv2.imread(r.image)
        nh, nw = round(r.height * item["ratio"][1]), round(r.width * item["ratio"][0])
        px, py = item["pad"]
        ref = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)[..., ::-1].transpose(2, 0, 1)
        # any interpolation passes (INTER_AREA differs by ~1.5 on average); BGR order or a 1 px shift does not
        assert np.abs(item["img"][:, py : py + nh, px : px + nw].numpy().astype(np.int32) - ref).mean() < 3


# ----------------------------------------------------------------------------------------------- 7. collate


def test_collate_training_batch_exact_values():
    s = 128
    imgs = [torch.full((3, s, s), v, dtype=torch.uint8) for v in (1, 2, 3)]
    items = [
        {"img": imgs[0], "cls": np.int64([3, 14]), "boxes": np.float32([[0, 0, 64, 32], [32, 32, 128, 128]])},
        {"img": imgs[1], "cls": np.zeros(0, np.int64), "boxes": np.zeros((0, 4), np.float32)},
        {"img": imgs[2], "cls": np.int64([19]), "boxes": np.float32([[10, 20, 30, 60]])},
    ]
    b = collate(items)
    assert set(b) == {"img", "batch_idx", "cls", "bboxes"}
    assert b["img"].dtype == torch.uint8 and b["img"].shape == (3, 3, s, s)
    assert torch.equal(b["img"], torch.stack(imgs))
    assert b["batch_idx"].shape == (3,) and b["batch_idx"].tolist() == [0, 0, 2]
    assert b["cls"].shape == (3, 1) and b["cls"].flatten().tolist() == [3, 14, 19]
    assert b["batch_idx"].dtype == b["cls"].dtype == b["bboxes"].dtype == torch.float32
    expected = torch.tensor([[0.25, 0.125, 0.5, 0.25], [0.625, 0.625, 0.75, 0.75], [20 / s, 40 / s, 20 / s, 40 / s]])
    torch.testing.assert_close(b["bboxes"], expected)


def test_collate_training_batch_from_dataset(synth_records):
    ds = VOCDataset(synth_records, 128, augment=True, hyp=_hyp())
    _seed(1)
    items = [ds[i] for i in range(5)]
    b = collate(items)
    n = sum(len(it["cls"]) for it in items)
    assert n > 0 and b["img"].shape == (5, 3, 128, 128) and b["bboxes"].shape == (n, 4) and b["cls"].shape == (n, 1)
    expected_idx = np.concatenate([np.full(len(it["cls"]), i) for i, it in enumerate(items)])
    np.testing.assert_array_equal(b["batch_idx"].numpy(), expected_idx)
    np.testing.assert_array_equal(b["cls"].numpy()[:, 0], np.concatenate([it["cls"] for it in items]))
    assert (b["bboxes"] >= 0).all() and (b["bboxes"] <= 1).all()
    xy, wh = b["bboxes"][:, :2], b["bboxes"][:, 2:]
    assert (xy - wh / 2 >= -1e-6).all() and (xy + wh / 2 <= 1 + 1e-6).all() and (wh > 0).all()
    boxes = torch.from_numpy(np.concatenate([it["boxes"] for it in items]))
    torch.testing.assert_close(torch.cat([xy - wh / 2, xy + wh / 2], 1) * 128, boxes, atol=1e-4, rtol=0)


def test_collate_validation_batch(synth_records):
    ds = VOCDataset(synth_records[:3], 128, augment=False)
    items = [ds[i] for i in range(3)]
    b = collate(items)
    assert set(b) == {"img", "ids", "orig_size", "ratio", "pad", "gt"}
    assert b["img"].shape == (3, 3, 128, 128) and b["img"].dtype == torch.uint8
    assert b["ids"] == [r.id for r in synth_records[:3]]
    assert b["orig_size"] == [(r.height, r.width) for r in synth_records[:3]]
    assert b["ratio"] == [it["ratio"] for it in items] and b["pad"] == [it["pad"] for it in items]
    assert all(g[0] is r.boxes and g[1] is r.labels for g, r in zip(b["gt"], synth_records[:3]))


# ----------------------------------------------------------------------------------------------- 8. synthesize_voc


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthesize_is_deterministic(tmp_path):
    a = _files(synthesize_voc(tmp_path / "a", images=6, seed=3, size=128))
    b = _files(synthesize_voc(tmp_path / "b", images=6, seed=3, size=128))
    c = _files(synthesize_voc(tmp_path / "c", images=6, seed=4, size=128))
    assert len(a) == 6 * 2 + 2
    assert a == b  # XML, split files and JPEG bytes identical
    assert a.keys() == c.keys()
    for name in a:
        if name.startswith(("Annotations", "JPEGImages")):
            assert a[name] != c[name], name


@pytest.mark.parametrize(("images", "val_fraction", "n_val"), [(20, 0.25, 5), (7, 0.2, 1), (10, 0.0, 1), (1, 0.5, 0)])
def test_synthesize_split_files_partition_ids(tmp_path, images, val_fraction, n_val):
    root = synthesize_voc(tmp_path / "s", images=images, seed=0, size=64, val_fraction=val_fraction)
    main = root / "ImageSets" / "Main"
    train, val = main.joinpath("train.txt").read_text().split(), main.joinpath("val.txt").read_text().split()
    ids = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    assert len(ids) == images == len(list((root / "JPEGImages").glob("*.jpg")))
    assert len(val) == n_val and len(train) == images - n_val
    assert not set(train) & set(val) and sorted(train + val) == ids
    assert [(p, i) for p, i in resolve_split(root, [], "val")] == [(root, i) for i in val]


def test_synthesize_xml_is_valid_voc(tmp_path):
    root = synthesize_voc(tmp_path / "s", images=30, seed=5, size=160)
    recs = load_records(_all_pairs(root), "synthetic")
    assert len(recs) == 30
    for r in recs:
        img = cv2.imread(r.image)
        assert img.shape[:2] == (r.height, r.width) and max(r.width, r.height) == 160
        assert 1 <= len(r.labels) <= 4
        b = r.boxes
        assert (b[:, :2] >= 1).all() and (b[:, 2] <= r.width).all() and (b[:, 3] <= r.height).all()
        assert (b[:, 2:] >= b[:, :2]).all()
        sides = np.minimum(b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1)  # inclusive pixel counts
        np.testing.assert_array_equal(r.difficult, sides < 12)
        touches = (b[:, 0] == 1) | (b[:, 1] == 1) | (b[:, 2] == r.width) | (b[:, 3] == r.height)
        assert (touches[r.truncated]).all()
    truncated = np.concatenate([r.truncated for r in recs])
    assert 0 < truncated.sum() < len(truncated)


def test_class_style_is_a_unique_shape_colour_pair():
    styles = [class_style(c) for c in range(20)]
    assert len(set(styles)) == 20
    assert class_style(0) == ("rectangle", (40, 40, 220)) and class_style(14) == ("cross", (220, 80, 30))


def test_synthetic_boxes_are_tight_on_visible_shapes(tmp_path):
    root = synthesize_voc(tmp_path / "s", images=60, seed=0, size=192)
    worst: list[tuple[float, str]] = []
    for r in load_records(_all_pairs(root), "synthetic"):
        img = cv2.imread(r.image).astype(np.int32)
        boxes = r.boxes - VOC_OFFSET
        for k, (b, c) in enumerate(zip(boxes, r.labels)):
            others = np.delete(boxes, k, 0)
            overlap = (others[:, 0] < b[2]) & (others[:, 2] > b[0]) & (others[:, 1] < b[3]) & (others[:, 3] > b[1])
            if overlap.any():
                continue  # occluded shapes are not checked
            x1, y1, x2, y2 = (int(v) for v in b)
            X1, Y1 = max(x1 - 4, 0), max(y1 - 4, 0)
            mask = np.abs(img[Y1 : y2 + 4, X1 : x2 + 4] - class_style(int(c))[1]).max(-1) < 60
            ys, xs = np.nonzero(mask)
            tight = np.array([xs.min() + X1, ys.min() + Y1, xs.max() + 1 + X1, ys.max() + 1 + Y1])
            worst.append((float(np.abs(tight - b).max()), f"{r.id} {class_style(int(c))[0]}"))
    assert len(worst) > 60
    assert max(worst)[0] <= 5, sorted(worst)[-5:]  # JPEG blurs thin tips by a few pixels; today: 11 px


def test_every_synthetic_object_is_visible(tmp_path):
    root = synthesize_voc(tmp_path / "s", images=200, seed=0, size=256)
    hidden = []
    for r in load_records(_all_pairs(root), "synthetic"):
        rgb = cv2.imread(r.image)[..., ::-1]
        for b, c, d in zip(r.boxes - VOC_OFFSET, r.labels, r.difficult):
            if not d and _colour_fraction(rgb, b, _rgb(c)) < 0.25:
                hidden.append((r.id, VOC_CLASSES[c]))
    assert hidden == []


# ----------------------------------------------------------------------------------------------- 9. VOCDataModule


def test_datamodule_loaders_on_a_flat_root(synth_root):
    cfg = load_config(None, [f"data.root={synth_root}", "data.imgsz=128", "data.batch_size=4", "data.num_workers=0"])
    dm = VOCDataModule(cfg.data)
    dm.prepare_data()  # root exists: nothing generated
    dm.setup("fit")
    assert len(dm.train_set) == 32 and len(dm.val_set) == 8
    assert dm.train_set.augment and not dm.val_set.augment
    assert dm.per_device_batch() == 4
    train = dm.train_dataloader()
    assert len(train) == 8
    batch = next(iter(train))
    assert batch["img"].shape == (4, 3, 128, 128) and batch["img"].dtype == torch.uint8
    assert batch["bboxes"].shape[1] == 4 and (batch["batch_idx"] < 4).all()
    val = dm.val_dataloader()
    assert len(val) == 1  # validation batches are twice the training batch
    vbatch = next(iter(val))
    assert vbatch["img"].shape == (8, 3, 128, 128)
    val_ids = (synth_root / "ImageSets" / "Main" / "val.txt").read_text().split()
    assert vbatch["ids"] == val_ids


def test_datamodule_rejects_a_batch_that_does_not_split_across_devices(synth_root):
    cfg = load_config(None, [f"data.root={synth_root}", "data.batch_size=5"])
    dm = VOCDataModule(cfg.data)
    dm._world_size = lambda: 2  # type: ignore[method-assign]
    with pytest.raises(VocdetError, match="batch_size=5"):
        dm.per_device_batch()


def test_datamodule_synthesizes_a_missing_root(tmp_path):
    root = tmp_path / "generated"
    over = [f"data.root={root}", "data.synthesize=true", "data.synth.images=6", "data.synth.size=64"]
    over += ["data.synth.val_fraction=0.5", "data.imgsz=64", "data.batch_size=2", "data.num_workers=0"]
    dm = VOCDataModule(load_config(None, over).data)
    assert not root.exists()
    dm.prepare_data()
    assert len(list((root / "Annotations").glob("*.xml"))) == 6
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 3
    assert next(iter(dm.train_dataloader()))["img"].shape == (2, 3, 64, 64)


def test_datamodule_missing_root_without_synthesize_raises(tmp_path):
    root = tmp_path / "absent"
    dm = VOCDataModule(load_config(None, [f"data.root={root}", "data.num_workers=0"]).data)
    dm.prepare_data()
    assert not root.exists()
    with pytest.raises(VocdetError, match="data root not found"):
        dm.setup("fit")
