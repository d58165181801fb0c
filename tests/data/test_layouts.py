"""Datasets as annotation tools export them: every folder layout, image suffix and XML quirk, class lists from the
data or the config, and the box-corner convention. Each fixture writes real images and XML in that exact shape."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from vocdet.config import load_config
from vocdet.core.voc import (
    VOC_CLASSES,
    box_offset,
    class_list,
    has_own_split,
    layout,
    load_records,
    resolve_split,
    split_records,
)
from vocdet.errors import VocdetError


def _image(path: Path, w: int = 64, h: int = 48, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img), path


def _xml(
    path: Path,
    objects: list[tuple[str, tuple]],
    *,
    filename: str | None = None,
    size: tuple[int, int] | None = (64, 48),
    extra: str = "",
) -> None:
    """VOC XML at ``path``; ``objects`` are (name, (xmin, ymin, xmax, ymax)) written as given (ints or floats)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    objs = "".join(
        f"<object><name>{name}</name>{extra}<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
        f"<ymax>{b[3]}</ymax></bndbox></object>"
        for name, b in objects
    )
    size_tag = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    fn = f"<filename>{filename}</filename>" if filename else ""
    path.write_text(f"<annotation>{fn}{size_tag}{objs}</annotation>", encoding="utf-8")


def _pair(folder: Path, stem: str, objects: list[tuple[str, tuple]], suffix: str = ".jpg", seed: int = 0) -> None:
    """An image and its XML side by side."""
    _image(folder / f"{stem}{suffix}", seed=seed)
    _xml(folder / f"{stem}.xml", objects, filename=f"{stem}{suffix}")


def _flat(root: Path, ids: list[str]) -> None:
    for k, i in enumerate(ids):
        _image(root / "JPEGImages" / f"{i}.jpg", seed=k)
        _xml(root / "Annotations" / f"{i}.xml", [("dog", (2, 3, 30, 40))], filename=f"{i}.jpg")


DOG = [("dog", (2, 3, 30, 40))]


# ----------------------------------------------------------------------------------------------- layouts


def test_flat_folder_with_split_files(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _flat(root, ["a", "b", "c"])
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("c\n")
    assert layout(root) == "flat" and has_own_split(root)
    assert resolve_split(root, [], "train") == [(root, "a"), (root, "b")]  # VOC2007's names: trainval/test
    assert resolve_split(root, [], "val") == [(root, "c")]
    (root / "ImageSets" / "Main" / "test.txt").unlink()  # only the training list: validation is the rest
    assert resolve_split(root, [], "val") == [(root, "c")]
    (root / "ImageSets" / "Main" / "train.txt").write_text("b\n")  # VOC2012's names win: train/val
    (root / "ImageSets" / "Main" / "val.txt").write_text("a\n")
    assert resolve_split(root, [], "train") == [(root, "b")] and resolve_split(root, [], "val") == [(root, "a")]


def test_cvat_export_default_txt_gets_a_drawn_split(tmp_path: Path) -> None:
    """CVAT's "PASCAL VOC 1.1": Annotations/, JPEGImages/, ImageSets/Main/default.txt (every image, no split)."""
    root = tmp_path / "cvat"
    ids = [f"frame_{i:03d}" for i in range(10)]
    _flat(root, ids)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "default.txt").write_text("\n".join(ids[:9]) + "\n")  # frame_009 not listed
    (root / "labelmap.txt").write_text("# label:color_rgb:parts:actions\ndog:250,50,83::\n")
    assert layout(root) == "flat" and not has_own_split(root)
    train = resolve_split(root, [], "train", val_fraction=0.2, seed=0)
    val = resolve_split(root, [], "val", val_fraction=0.2, seed=0)
    assert len(val) == 2 and len(train) == 7 and sorted(i for _, i in train + val) == ids[:9]
    assert len(load_records(train, "train")) == 7
    # val_fraction=0: nothing held out, validation scores the training images
    assert resolve_split(root, [], "val", val_fraction=0, seed=0) == resolve_split(root, [], "train", val_fraction=0)
    assert len(resolve_split(root, [], "val", val_fraction=0, seed=0)) == 9


def test_devkit(tmp_path: Path) -> None:
    root = tmp_path / "VOCdevkit"
    _flat(root / "VOC2007", ["x", "y"])
    (root / "VOC2007" / "ImageSets" / "Main").mkdir(parents=True)
    (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("y\n")
    assert layout(root) == "devkit" and has_own_split(root)
    assert resolve_split(root, ["2007/test"], "val") == [(root / "VOC2007", "y")]


def test_roboflow_folders_train_valid_test(tmp_path: Path) -> None:
    """Roboflow's VOC export: train/, valid/, test/, each image beside its XML, names like x_jpg.rf.<hash>.jpg."""
    root = tmp_path / "roboflow"
    for split, n in (("train", 4), ("valid", 2), ("test", 1)):
        for i in range(n):
            _pair(root / split, f"{split}{i}_jpg.rf.{i:032x}", DOG, seed=i)
    (root / "README.roboflow.txt").write_text("exported from roboflow\n")
    assert layout(root) == "folders" and has_own_split(root)
    train, val = resolve_split(root, [], "train"), resolve_split(root, [], "val")
    assert [d.name for d, _ in train] == ["train"] * 4 and [d.name for d, _ in val] == ["valid"] * 2
    recs = load_records(val, "val")
    assert [Path(r.image).parent.name for r in recs] == ["valid", "valid"] and recs[0].labels.tolist() == [11]


def test_only_a_train_folder_or_one_folder_gets_a_drawn_split(tmp_path: Path) -> None:
    only_train = tmp_path / "rf"
    for i in range(5):
        _pair(only_train / "train", f"t{i}", DOG, seed=i)
    assert layout(only_train) == "folders" and not has_own_split(only_train)
    val = resolve_split(only_train, [], "val", val_fraction=0.2, seed=1)
    train = resolve_split(only_train, [], "train", val_fraction=0.2, seed=1)
    assert len(val) == 1 and len(train) == 4 and not set(val) & set(train)

    flat = tmp_path / "labelimg"  # LabelImg's default: the XML saved beside each image
    for i in range(5):
        _pair(flat, f"img{i}", DOG, seed=i)
    assert layout(flat) == "side-by-side" and not has_own_split(flat)
    pairs = resolve_split(flat, [], "train", val_fraction=0.4, seed=0) + resolve_split(
        flat, [], "val", val_fraction=0.4, seed=0
    )
    assert sorted(i for _, i in pairs) == [f"img{i}" for i in range(5)]


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".JPG", ".png", ".bmp", ".webp"])
def test_image_suffixes(tmp_path: Path, suffix: str) -> None:
    _pair(tmp_path, "pic", DOG, suffix=suffix)
    (rec,) = load_records([(tmp_path, "pic")], "train")
    assert rec.image == str(tmp_path / f"pic{suffix}") and (rec.width, rec.height) == (64, 48)


def test_image_found_by_the_xml_filename_when_the_stem_differs(tmp_path: Path) -> None:
    _image(tmp_path / "IMG_0001.png")
    _xml(tmp_path / "annotation_1.xml", DOG, filename="IMG_0001.png")
    (rec,) = load_records([(tmp_path, "annotation_1")], "train")
    assert rec.image == str(tmp_path / "IMG_0001.png")


# ----------------------------------------------------------------------------------------------- XML quirks


def test_every_quirk_is_repaired_and_counted_in_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "quirks"
    _image(d / "floats.jpg")  # Roboflow: float coordinates; no <difficult>/<truncated>
    _xml(d / "floats.xml", [("dog", (2.5, 3.25, 30.75, 40.0))])
    _image(d / "nosize.jpg")  # <size> missing: the image's
    _xml(d / "nosize.xml", DOG, size=None)
    _image(d / "wrongsize.jpg")  # <size> says 640x480 for a 64x48 image
    _xml(d / "wrongsize.xml", DOG, size=(640, 480))
    _image(d / "outside.jpg")  # reaching past the image: clipped
    _xml(d / "outside.xml", [("dog", (-5, 2, 80, 40)), ("cat", (10, 10, 20, 60))])
    _image(d / "empty.jpg")  # zero-area and inverted: dropped
    _xml(d / "empty.xml", [("dog", (10, 10, 9, 20)), ("cat", (30, 20, 10, 40)), ("bird", (5, 5, 6, 6))])
    _image(d / "cvat.jpg")  # CVAT's <occluded> and attributes: ignored
    extra = "<occluded>1</occluded><attributes><attribute><name>color</name><value>red</value></attribute></attributes>"
    _xml(d / "cvat.xml", DOG, extra=extra)
    ids = ["floats", "nosize", "wrongsize", "outside", "empty", "cvat"]
    with caplog.at_level(logging.WARNING, logger="vocdet"):
        recs = {r.id: r for r in load_records([(d, i) for i in ids], "train")}
    warnings = [r.getMessage() for r in caplog.records if r.name == "vocdet"]
    assert warnings == [
        "train annotations repaired: 2 boxes clipped to the image, 2 sizes taken from the image (XML <size> missing "
        "or wrong), 2 zero-area or inverted boxes dropped"
    ]
    np.testing.assert_array_equal(recs["floats"].boxes, np.float32([[2.5, 3.25, 30.75, 40.0]]))
    assert recs["floats"].difficult.tolist() == [False] and recs["floats"].truncated.tolist() == [False]
    assert (
        (recs["nosize"].width, recs["nosize"].height) == (64, 48) == (recs["wrongsize"].width, recs["wrongsize"].height)
    )
    # 1-based corners: x from 1 to 64, y from 1 to 48
    np.testing.assert_array_equal(recs["outside"].boxes, np.float32([[1, 2, 64, 40], [10, 10, 20, 48]]))
    assert recs["empty"].labels.tolist() == [VOC_CLASSES.index("bird")]  # a 1-based 5..6 box is 2 px wide: kept
    assert recs["cvat"].labels.tolist() == [11]


def test_utf8_class_names_with_spaces(tmp_path: Path) -> None:
    names = ["red car", "Straßenschild", "信号灯"]
    for i, n in enumerate(names):
        _pair(tmp_path, f"i{i}", [(f"  {n} ", (2, 2, 20, 20))], seed=i)
    pairs = [(tmp_path, f"i{i}") for i in range(3)]
    assert class_list("auto", pairs) == sorted(names)
    recs = load_records(pairs, "train", classes=names)
    assert [r.labels.tolist() for r in recs] == [[0], [1], [2]]


# ----------------------------------------------------------------------------------------------- classes


def test_unknown_classes_error_names_each_with_its_count_or_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _pair(tmp_path, "a", [("dog", (2, 2, 20, 20)), ("dragon", (2, 2, 9, 9)), ("dragon", (3, 3, 9, 9))])
    _pair(tmp_path, "b", [("unicorn", (2, 2, 20, 20))], seed=1)
    pairs = [(tmp_path, "a"), (tmp_path, "b")]
    with pytest.raises(VocdetError) as e:
        load_records(pairs, "train")
    assert str(e.value) == (
        "train objects with classes not in data.classes: 'dragon' (2), 'unicorn' (1); add them to data.classes "
        "(or use data.classes=auto), or set data.unknown_classes=ignore to drop them"
    )
    with caplog.at_level(logging.WARNING, logger="vocdet"):
        recs = load_records(pairs, "train", unknown="ignore")
    assert [r.labels.tolist() for r in recs] == [[11], []] and [r.names for r in recs] == [("dog",), ()]
    warnings = [r.getMessage() for r in caplog.records if r.name == "vocdet"]
    assert warnings == ["train annotations repaired: 3 objects of unlisted classes dropped (dragon, unicorn)"]


def test_class_lists_from_the_config(tmp_path: Path) -> None:
    assert class_list("voc") == list(VOC_CLASSES)
    assert class_list(["b", " a "]) == ["b", "a"]  # the order given is the class order
    for bad, message in (
        (["a", "b", "a"], "data.classes lists 'a' more than once"),
        ([], "non-empty list"),
        ("cats", "must be voc, auto or a list"),
        (["a", ""], "empty class name"),
    ):
        with pytest.raises(VocdetError, match=message):
            class_list(bad)
        with pytest.raises(VocdetError, match=message):  # the config refuses it before anything runs
            load_config(None, [f"data.classes={bad if isinstance(bad, str) else '[' + ','.join(map(repr, bad)) + ']'}"])
    _xml(tmp_path / "n.xml", [])
    _image(tmp_path / "n.jpg")
    with pytest.raises(VocdetError, match=r"data\.classes=auto found no objects"):
        class_list("auto", [(tmp_path, "n")])


def test_split_records_reads_the_config(tmp_path: Path) -> None:
    root = tmp_path / "rf"
    for i in range(6):
        _pair(root, f"p{i}", [("widget", (1, 1, 10, 10))], seed=i)
    data = load_config(None, [f"data.root={root}", "data.val_fraction=0.5"]).data
    train = split_records(data, "train", ["widget"], seed=0)
    val = split_records(data, "val", ["widget"], seed=0)
    assert len(train) == len(val) == 3 and not {r.id for r in train} & {r.id for r in val}
    assert [r.id for r in split_records(data, "all", ["widget"], ids=[val[0].id])] == [val[0].id]


# ----------------------------------------------------------------------------------------------- box origin


def test_box_origin(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    np.testing.assert_array_equal(box_offset(1), [1, 1, 0, 0])
    np.testing.assert_array_equal(box_offset(0), [0, 0, 0, 0])
    _pair(tmp_path, "z", [("dog", (0, 0, 64, 48)), ("cat", (0, 5, 10, 10))])
    with caplog.at_level(logging.WARNING, logger="vocdet"):
        (zero,) = load_records([(tmp_path, "z")], "train", origin=0)
    assert not caplog.records  # 0-based: a box from 0 to the full width is the whole image, nothing to repair
    np.testing.assert_array_equal(zero.boxes, np.float32([[0, 0, 64, 48], [0, 5, 10, 10]]))
    from vocdet.core import voc

    voc._warned_origin.clear()  # said once per process
    with caplog.at_level(logging.WARNING, logger="vocdet"):
        load_records([(tmp_path, "z")], "train", origin=1)
        load_records([(tmp_path, "z")], "val", origin=1)
    said = " | ".join(r.getMessage() for r in caplog.records if r.name == "vocdet")
    assert "2 train boxes have a coordinate at 0" in said and "set data.box_origin=0" in said
    assert "val boxes" not in said


# ----------------------------------------------------------------------------------------------- bad input


def test_empty_folder_and_images_without_xml(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(VocdetError, match=r"holds no VOC XML and no Annotations/ or VOC20xx/ folder"):
        layout(tmp_path / "empty")
    for i in range(3):
        _image(tmp_path / "imgs" / f"{i}.jpg")
    with pytest.raises(VocdetError, match=r"holds 3 images but no VOC XML; data.root must be"):
        resolve_split(tmp_path / "imgs", [], "train")


def test_both_box_origins_give_the_same_training_targets_with_flips(tmp_path: Path) -> None:
    """The same images labelled with 1-based corners (VOC) and 0-based ones (data.box_origin=0) give identical
    augmented training items: flips and mosaics included, nothing is off by a pixel."""
    import random

    from vocdet.data.dataset import VOCDataset
    from vocdet.data.synth import synthesize_voc

    one = synthesize_voc(tmp_path / "one", images=12, seed=5, size=96)
    zero = synthesize_voc(tmp_path / "zero", images=12, seed=5, size=96, box_origin=0)
    assert (one / "Annotations" / "synth_000003.xml").read_text() != (
        zero / "Annotations" / "synth_000003.xml"
    ).read_text()
    items = []
    for root, origin in ((one, 1), (zero, 0)):
        hyp = load_config(None, [f"data.root={root}", f"data.box_origin={origin}", "data.fliplr=0.5"]).data
        records = split_records(hyp, "train", list(VOC_CLASSES))
        ds = VOCDataset(records, 96, augment=True, hyp=hyp, origin=origin)
        random.seed(0)
        np.random.seed(0)
        items.append([ds[i] for i in range(len(ds))])
    assert len(items[0]) == len(items[1]) > 5
    for a, b in zip(*items):
        assert torch_equal(a["img"], b["img"]) and torch_equal(a["cls"], b["cls"])
        np.testing.assert_array_equal(a["boxes"], b["boxes"])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))
