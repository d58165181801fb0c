"""PASCAL VOC annotations: the class list, XML parsing, split discovery and record loading.

Boxes in a :class:`Record` are the XML's 1-based inclusive pixel corners; ``VOC_OFFSET`` turns them into
continuous coordinates (``boxes - VOC_OFFSET``: the object spans xmin-1 .. xmax).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from vocdet.config import check_classes
from vocdet.errors import VocdetError

log = logging.getLogger("vocdet")

# Standard alphabetical VOC order (aeroplane=0 ... diningtable=10, dog=11 ... tvmonitor=19).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}
# VOC XML corners are 1-based inclusive pixels: the object spans xmin-1 .. xmax in continuous coordinates.
VOC_OFFSET = np.float32([1, 1, 0, 0])


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG", ".png", ".PNG", ".bmp", ".webp")
# Split files a flat folder may have, in order of preference: VOC2012 (train/val), VOC2007 (trainval/test).
SPLIT_FILES = {"train": ("train", "trainval"), "val": ("val", "test"), "test": ("test",)}
# Subfolders of Roboflow's VOC export (images and XML side by side).
SPLIT_FOLDERS = {"train": ("train",), "val": ("valid", "val", "test"), "test": ("test",)}


@dataclass
class Record:
    """One annotated image. ``boxes`` (N, 4) float32 xyxy in the XML's pixel coordinates."""

    id: str
    image: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray  # (N,) int64 class ids
    difficult: np.ndarray  # (N,) bool
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (N,) bool
    names: tuple[str, ...] = ()  # the XML's <name> of each object (labels are -1 for names not in the class list)


def box_offset(origin: int = 1) -> np.ndarray:
    """What turns a dataset's box corners into continuous pixel edges (``boxes - offset``): ``VOC_OFFSET`` for the
    devkit's 1-based inclusive corners (``data.box_origin=1``), zeros for 0-based ones (``data.box_origin=0``)."""
    if origin not in (0, 1):
        raise VocdetError(f"data.box_origin={origin} must be 1 (the VOC devkit's corners) or 0")
    return VOC_OFFSET.copy() if origin == 1 else np.zeros(4, np.float32)


def parse_voc_xml(
    xml_path: str | Path, image_path: str | Path | None = None, classes: Sequence[str] = VOC_CLASSES
) -> Record:
    """Parse one VOC annotation file. Object names are matched against ``classes`` (stripped; VOC's default names
    also case-insensitively); a name not in the list gets label -1 (its name stays in ``names``). Coordinates may
    be floats; ``<difficult>``/``<truncated>`` default to 0; other tags (``<occluded>``, attributes) are ignored;
    a missing ``<size>`` reads as 0 x 0 (``load_records`` takes the image's)."""
    root = ET.parse(xml_path).getroot()
    index = {name: i for i, name in enumerate(classes)}
    fold = tuple(classes) == VOC_CLASSES
    size = root.find("size")
    width = _number(size.findtext("width")) if size is not None else 0
    height = _number(size.findtext("height")) if size is not None else 0
    boxes, labels, difficult, truncated, names = [], [], [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"object '{name}' has no <bndbox>")
        boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])  # type: ignore[arg-type]
        labels.append(index.get(name.lower() if fold else name, -1))
        names.append(name)
        difficult.append(_flag(obj.findtext("difficult")))
        truncated.append(_flag(obj.findtext("truncated")))
    xml_path = Path(xml_path)
    if image_path is None:
        image_path = xml_path.parent.parent / "JPEGImages" / (root.findtext("filename") or f"{xml_path.stem}.jpg")
    return Record(
        id=xml_path.stem,
        image=str(image_path),
        width=int(width),
        height=int(height),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        difficult=np.asarray(difficult, bool),
        truncated=np.asarray(truncated, bool),
        names=tuple(names),
    )


def _number(text: str | None) -> float:
    try:
        return float(text or 0)
    except ValueError:
        return 0.0


def _flag(text: str | None) -> bool:
    try:
        return int(float(text or 0)) == 1
    except ValueError:
        return (text or "").strip().lower() == "true"


def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def require_root(root: str | Path) -> Path:
    """``root`` as a Path, or a ``VocdetError`` that says how to get the data."""
    root = Path(root)
    if not root.is_dir():
        raise VocdetError(
            f"data root not found: {root} (get VOC with `vocdet data download --root DIR` and set "
            "data.root=DIR/VOCdevkit, run `dvc pull`, or make a demo set with `vocdet data synth --out DIR`)"
        )
    return root


def layout(root: str | Path) -> str:
    """Which of the layouts annotation tools write ``root`` is: ``flat`` (``Annotations/``, ``JPEGImages/``, as VOC
    and CVAT's "PASCAL VOC 1.1"), ``devkit`` (``VOC2007/``, ``VOC2012/``), ``folders`` (``train/``, ``valid/``,
    ``test/`` with images and XML side by side, as Roboflow's VOC export) or ``side-by-side`` (one folder)."""
    root = require_root(root)
    if (root / "Annotations").is_dir():
        return "flat"
    if any((d / "Annotations").is_dir() for d in root.glob("VOC*")):
        return "devkit"
    if any(any((root / f).glob("*.xml")) for names in SPLIT_FOLDERS.values() for f in names if (root / f).is_dir()):
        return "folders"
    if any(root.glob("*.xml")):
        return "side-by-side"
    images = [p for p in root.iterdir() if p.suffix in IMAGE_SUFFIXES] if root.is_dir() else []
    what = f"{len(images)} images but no VOC XML" if images else "no VOC XML and no Annotations/ or VOC20xx/ folder"
    raise VocdetError(
        f"{root} holds {what}; data.root must be a VOCdevkit, a folder with Annotations/ and JPEGImages/, or "
        "images with their .xml files beside them (optionally in train/, valid/, test/)"
    )


def resolve_split(
    root: str | Path, sets: Sequence[str], split: str, *, val_fraction: float = 0.2, seed: int = 0
) -> list[tuple[Path, str]]:
    """(directory, image id) pairs of a split, for any :func:`layout`.

    The directory holds ``Annotations/`` and ``JPEGImages/`` (devkit years, flat folders) or the XML and images
    themselves (side by side). A VOCdevkit takes ``sets`` (``"2007/trainval"``); a flat folder its
    ``ImageSets/Main`` files (``train.txt``/``val.txt``, else ``trainval.txt``/``test.txt``; ``{split}.txt`` for
    any other split name); Roboflow's folders ``train/`` and ``valid/`` (or ``val/``, else ``test/``). Data with
    no split of its own (no split files, CVAT's ``default.txt``, one folder) is split deterministically:
    ``val_fraction`` of the images (by ``seed``) for ``val``, the rest for ``train`` (:func:`split_pool`).
    """
    root = require_root(root)
    kind = layout(root)
    if kind == "devkit":
        return _devkit_split(root, sets, split)
    if kind == "flat":
        main = root / "ImageSets" / "Main"
        if listed := _split_file(main, split):
            return [(root, i) for i in _read_ids(listed)]
        default = main / "default.txt"  # CVAT: one list of every image, no split
        ids = _read_ids(default) if default.is_file() else sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
        other = _split_file(main, {"train": "val", "val": "train"}.get(split, ""))
        if other is not None:  # only the other split is listed: this one is the rest
            taken = set(_read_ids(other))
            return [(root, i) for i in ids if i not in taken]
        return [(root, i) for i in split_pool(ids, split, val_fraction, seed, root)]
    if kind == "folders":
        train = root / "train"
        if not any(_has_xml(root / f) for f in SPLIT_FOLDERS["val"]) and _has_xml(train):  # train/ only: split it
            ids = [p.stem for p in sorted(train.glob("*.xml"))]
            return [(train, i) for i in split_pool(ids, split, val_fraction, seed, train)]
        folders = [root / f for f in SPLIT_FOLDERS.get(split, (split,)) if _has_xml(root / f)]
        if not folders:
            found = ", ".join(sorted(p.name + "/" for p in root.iterdir() if _has_xml(p)))
            raise VocdetError(f"no {split} folder with VOC XML in {root} (found {found}); expected train/ and valid/")
        return [(folders[0], p.stem) for p in sorted(folders[0].glob("*.xml"))]
    ids = [p.stem for p in sorted(root.glob("*.xml"))]
    return [(root, i) for i in split_pool(ids, split, val_fraction, seed, root)]


def _split_file(main: Path, split: str) -> Path | None:
    """The ``ImageSets/Main`` file that lists ``split`` (see :data:`SPLIT_FILES`), if there is one."""
    for name in SPLIT_FILES.get(split, (split,)) if split else ():
        if (main / f"{name}.txt").is_file():
            return main / f"{name}.txt"
    return None


def has_own_split(root: str | Path) -> bool:
    """Whether the data at ``root`` says which images validate (else :func:`resolve_split` draws a split)."""
    root = Path(root)
    kind = layout(root)
    if kind == "devkit":
        return True
    if kind == "flat":
        main = root / "ImageSets" / "Main"
        return any((main / f"{n}.txt").is_file() for names in SPLIT_FILES.values() for n in names)
    return kind == "folders" and any(_has_xml(root / f) for f in SPLIT_FOLDERS["val"])


def _has_xml(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.xml"))


def _devkit_split(root: Path, sets: Sequence[str], split: str) -> list[tuple[Path, str]]:
    pairs: list[tuple[Path, str]] = []
    for entry in sets:
        year, _, image_set = entry.partition("/")
        d = root / f"VOC{year}"
        split_file = d / "ImageSets" / "Main" / f"{image_set}.txt"
        if not split_file.is_file():
            raise VocdetError(
                f"split file not found: {split_file} (data.{split}_sets entries look like '2007/trainval'; "
                f"{root} should be a VOCdevkit folder or a flat folder with Annotations/ and JPEGImages/)"
            )
        pairs += [(d, i) for i in _read_ids(split_file)]
    return pairs


_announced: set[tuple[str, float, int]] = set()
_warned_origin: list[bool] = []


def split_pool(ids: Sequence[str], split: str, val_fraction: float, seed: int, where: Path) -> list[str]:
    """``ids`` (data without a split of its own) divided deterministically: ``round(val_fraction * n)`` of them
    (at least 1 when there are 2 or more) drawn by ``seed`` for ``val``, the rest for ``train``, each in id order;
    any other split name, or ``val_fraction=0`` (validation scores the training images), gets them all."""
    ids = sorted(ids)
    if split not in ("train", "val"):
        return ids
    if not 0 <= val_fraction < 1:
        raise VocdetError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    if val_fraction == 0:
        if (str(where), 0.0, 0) not in _announced:
            _announced.add((str(where), 0.0, 0))
            log.info("%s has no split of its own and data.val_fraction=0: validation scores the training images", where)
        return ids
    n_val = min(max(round(val_fraction * len(ids)), int(val_fraction > 0 and len(ids) > 1)), len(ids) - 1)
    val = set(np.random.default_rng(seed).permutation(len(ids))[: max(n_val, 0)].tolist())
    key = (str(where), val_fraction, seed)
    if key not in _announced:
        _announced.add(key)
        log.info(
            "%s has no split of its own: %d of %d images held out for validation (data.val_fraction=%g, run.seed=%d)",
            where, len(val), len(ids), val_fraction, seed,
        )  # fmt: skip
    return [i for k, i in enumerate(ids) if (k in val) == (split == "val")]


def find_image(folder: Path, stem: str, filename: str | None) -> Path | None:
    """The image of an annotation: ``stem`` with any of :data:`IMAGE_SUFFIXES` in ``folder``, else the XML's
    ``<filename>`` there."""
    for suffix in IMAGE_SUFFIXES:
        if (p := folder / f"{stem}{suffix}").is_file():
            return p
    if filename and (p := folder / Path(filename).name).is_file():
        return p
    return None


def _files(directory: Path, image_id: str) -> tuple[Path, Path]:
    """(XML, image folder) of an id in a split directory."""
    if (directory / "Annotations").is_dir():
        return directory / "Annotations" / f"{image_id}.xml", directory / "JPEGImages"
    return directory / f"{image_id}.xml", directory


def _repair(
    rec: Record, offset: np.ndarray, origin: int, fixes: Counter, unknown: Counter, at_zero: list[int]
) -> Record:
    """Drop objects of unlisted classes (counted in ``unknown``), clip boxes to the image, drop empty ones."""
    keep = rec.labels >= 0
    unknown.update(n for n, k in zip(rec.names, keep) if not k)
    if origin == 1:
        at_zero[0] += int((rec.boxes[keep, :2] == 0).any(axis=1).sum())
    edges = rec.boxes - offset  # continuous pixel edges
    clipped = np.clip(edges, 0, np.float32([rec.width, rec.height, rec.width, rec.height]))
    moved = (clipped != edges).any(axis=1) & keep
    fixes["boxes clipped to the image"] += int(moved.sum())
    empty = ((clipped[:, 2:] <= clipped[:, :2]).any(axis=1)) & keep
    fixes["zero-area or inverted boxes dropped"] += int(empty.sum())
    keep &= ~empty
    rec.boxes = (clipped + offset)[keep].astype(np.float32)
    rec.labels, rec.difficult = rec.labels[keep], rec.difficult[keep]
    rec.truncated = rec.truncated[keep] if len(rec.truncated) == len(keep) else rec.truncated
    rec.names = tuple(n for n, k in zip(rec.names, keep) if k)
    return rec


class Fixes(Counter):
    """What :func:`load_records` repaired or dropped, by kind; ``summary`` is the one line it prints."""

    def summary(self) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in sorted(self.items()) if n)


def load_records(
    pairs: Sequence[tuple[Path, str]],
    what: str,
    *,
    classes: Sequence[str] = VOC_CLASSES,
    unknown: str = "error",
    origin: int = 1,
) -> list[Record]:
    """Parse the XML of every pair and repair what annotation tools get wrong, each kind counted in one warning:

    * ``<size>`` missing or not the image's: the image's size (read from its header);
    * boxes reaching outside the image: clipped; zero-area or inverted boxes: dropped;
    * objects whose name is not in ``classes``: ``unknown="error"`` stops with one line naming each name and its
      count; ``"ignore"`` drops them (training targets and ground truth alike).

    Unreadable or missing annotations/images are skipped with one warning.
    """
    if unknown not in ("error", "ignore"):
        raise VocdetError(f"data.unknown_classes={unknown} must be error or ignore")
    offset = box_offset(origin)
    fixes, unknown_names, bad = Fixes(), Counter[str](), []
    at_zero = [0]

    def one(pair: tuple[Path, str]) -> tuple[Record, bool] | None:
        """The record and whether its size came from the image (None: unreadable)."""
        d, i = pair
        xml, folder = _files(d, i)
        try:
            rec = parse_voc_xml(xml, folder / f"{i}.jpg", classes)
            filename = ET.parse(xml).getroot().findtext("filename")
        except (OSError, ET.ParseError, ValueError, AttributeError, TypeError):
            return None
        image = find_image(folder, i, filename)
        # Decode at 1/8 scale (libjpeg scales in the DCT, so it is cheap): an undecodable image is skipped here,
        # never discovered mid-epoch.
        if image is None or cv2.imread(str(image), cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
            return None
        rec.image = str(image)
        try:
            with Image.open(image) as im:
                size = im.size
        except OSError:
            return None
        fixed = (rec.width, rec.height) != size
        rec.width, rec.height = size
        return rec, fixed

    records: list[Record] = []
    with ThreadPoolExecutor(8) as ex:
        for pair, got in zip(pairs, ex.map(one, pairs)):  # counted here, in one thread
            if got is None:
                bad.append(pair[1])
                continue
            fixes["sizes taken from the image (XML <size> missing or wrong)"] += got[1]
            records.append(_repair(got[0], offset, origin, fixes, unknown_names, at_zero))
    if unknown_names and unknown == "error":
        listed = ", ".join(f"'{n}' ({c})" for n, c in sorted(unknown_names.items(), key=lambda x: (-x[1], x[0])))
        raise VocdetError(
            f"{what} objects with classes not in data.classes: {listed}; add them to data.classes (or use "
            "data.classes=auto), or set data.unknown_classes=ignore to drop them"
        )
    if unknown_names:
        fixes[f"objects of unlisted classes dropped ({', '.join(sorted(unknown_names))})"] = sum(unknown_names.values())
    if bad:
        log.warning("skipped %d %s images with a missing or corrupt image/XML (first: %s)", len(bad), what, bad[:3])
    if summary := fixes.summary():
        log.warning("%s annotations repaired: %s", what, summary)
    if origin == 1 and at_zero[0] and not _warned_origin:
        _warned_origin.append(True)  # once per process: train and val splits of one dataset say it once
        log.warning(
            "%d %s boxes have a coordinate at 0, which 1-based (VOC devkit) corners never have: if this dataset's "
            "boxes are 0-based (Albumentations' pascal_voc, several exporters), set data.box_origin=0",
            at_zero[0], what,
        )  # fmt: skip
    return records


def split_records(
    data: Any, split: str, classes: Sequence[str], seed: int = 0, ids: Sequence[str] | None = None
) -> list[Record]:
    """The records of ``split`` (``train`` or ``val``; ``all`` with ``ids``: exactly those images of data without a
    split of its own) of the dataset a ``data.*`` config section describes."""
    sets = data.train_sets if split == "train" else data.val_sets
    pairs = resolve_split(data.root, sets, split, val_fraction=data.val_fraction, seed=seed)
    if ids is not None:
        wanted = set(ids)
        pairs = [p for p in pairs if p[1] in wanted]
    return load_records(pairs, split, classes=classes, unknown=data.unknown_classes, origin=data.box_origin)


def class_list(setting: object, train_pairs: Sequence[tuple[Path, str]] | None = None) -> list[str]:
    """``data.classes`` as a list of names: ``voc`` (the 20 VOC names, standard order), ``auto`` (the sorted set of
    ``<name>`` values in ``train_pairs``' XML) or a list of names (stripped, unique, non-empty)."""
    if setting is None or setting == "voc":
        return list(VOC_CLASSES)
    if setting == "auto":
        if train_pairs is None:
            raise VocdetError("data.classes=auto needs the training split to read the class names from")
        names = scan_names(train_pairs)
        if not names:
            raise VocdetError(
                "data.classes=auto found no objects in the training split's XML; check data.root, or list the "
                "classes (data.classes=[name, ...])"
            )
        return sorted(names)
    names = check_classes(setting)
    if names is None:
        raise VocdetError(f"data.classes={setting!r} must be voc, auto or a list of class names")
    return names


def scan_names(pairs: Sequence[tuple[Path, str]]) -> Counter[str]:
    """How many objects of each ``<name>`` the XML of ``pairs`` hold (unreadable files skipped)."""

    def one(pair: tuple[Path, str]) -> list[str]:
        try:
            root = ET.parse(_files(*pair)[0]).getroot()
        except (OSError, ET.ParseError):
            return []
        return [(o.findtext("name") or "").strip() for o in root.iter("object")]

    counts: Counter[str] = Counter()
    with ThreadPoolExecutor(8) as ex:
        for names in ex.map(one, pairs):
            counts.update(n for n in names if n)
    return counts


def xyxy_to_xywhn(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """(N, 4) xyxy pixels -> (N, 4) normalised centre xywh (Ultralytics' label format)."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    xywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], axis=1)
    return xywh / scale
