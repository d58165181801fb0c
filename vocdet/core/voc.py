"""PASCAL VOC annotations: the class list, XML parsing, split discovery and record loading.

Boxes in a :class:`Record` are the XML's 1-based inclusive pixel corners; ``VOC_OFFSET`` turns them into
continuous coordinates (``boxes - VOC_OFFSET``: the object spans xmin-1 .. xmax).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

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


def parse_voc_xml(xml_path: str | Path, image_path: str | Path | None = None) -> Record:
    """Parse one VOC annotation file; unknown class names raise ``ValueError``."""
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    width = int(float(size.findtext("width")))  # type: ignore[union-attr, arg-type]
    height = int(float(size.findtext("height")))  # type: ignore[union-attr, arg-type]
    boxes, labels, difficult, truncated = [], [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip().lower()
        if name not in CLASS_INDEX:
            raise ValueError(f"unknown class '{name}'")
        bb = obj.find("bndbox")
        boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])  # type: ignore[union-attr, arg-type]
        labels.append(CLASS_INDEX[name])
        difficult.append(int(obj.findtext("difficult") or 0) == 1)
        truncated.append(int(obj.findtext("truncated") or 0) == 1)
    xml_path = Path(xml_path)
    if image_path is None:
        image_path = xml_path.parent.parent / "JPEGImages" / (root.findtext("filename") or f"{xml_path.stem}.jpg")
    return Record(
        id=xml_path.stem,
        image=str(image_path),
        width=width,
        height=height,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        difficult=np.asarray(difficult, bool),
        truncated=np.asarray(truncated, bool),
    )


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


def resolve_split(root: str | Path, sets: Sequence[str], split: str) -> list[tuple[Path, str]]:
    """(directory, image id) pairs of a split.

    ``root`` is either a VOCdevkit (``VOC2007/``, ``VOC2012/``; ``sets`` entries are ``"2007/trainval"``) or a flat
    VOC directory (``Annotations/``, ``JPEGImages/``, optional ``ImageSets/Main/{train,val}.txt``).
    """
    root = require_root(root)
    if (root / "Annotations").is_dir():  # flat layout
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if split_file.is_file():
            return [(root, i) for i in _read_ids(split_file)]
        log.warning("%s has no ImageSets/Main/%s.txt: using every annotated image for %s", root, split, split)
        return [(root, p.stem) for p in sorted((root / "Annotations").glob("*.xml"))]
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


def load_records(pairs: Sequence[tuple[Path, str]], what: str) -> list[Record]:
    """Parse the XML of every pair; unreadable or missing annotations/images are skipped with one warning."""
    records, bad = [], []

    def one(pair: tuple[Path, str]) -> Record | None:
        d, i = pair
        try:
            rec = parse_voc_xml(d / "Annotations" / f"{i}.xml", d / "JPEGImages" / f"{i}.jpg")
        except (OSError, ET.ParseError, ValueError, AttributeError, TypeError):
            return None
        if not (rec.width > 0 and rec.height > 0 and Path(rec.image).is_file()):
            return None
        # Decode at 1/8 scale (libjpeg scales in the DCT, so it is cheap): an undecodable image is skipped here,
        # never discovered mid-epoch.
        return rec if cv2.imread(rec.image, cv2.IMREAD_REDUCED_GRAYSCALE_8) is not None else None

    with ThreadPoolExecutor(8) as ex:
        for pair, rec in zip(pairs, ex.map(one, pairs)):
            (records.append(rec) if rec is not None else bad.append(pair[1]))
    if bad:
        log.warning("skipped %d %s images with a missing or corrupt image/XML (first: %s)", len(bad), what, bad[:3])
    return records


def xyxy_to_xywhn(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """(N, 4) xyxy pixels -> (N, 4) normalised centre xywh (Ultralytics' label format)."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    xywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], axis=1)
    return xywh / scale
