"""A synthetic, VOC-format detection set a small model can learn in minutes on a CPU (the quickstart's data).

Each VOC class is drawn as one (shape, colour) pair over a textured background, so the task needs both shape and
colour, boxes are exact, and the files are real JPEG + VOC XML in the flat layout with train/val split files.
Deterministic for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import cv2
import numpy as np

from vocdet.core.voc import VOC_CLASSES
from vocdet.errors import VocdetError

LAYOUTS = ("flat", "roboflow", "folder")
SHAPES = ("rectangle", "ellipse", "triangle", "diamond", "cross")
# Well separated BGR colours, so colour is learnable through Ultralytics' HSV jitter.
COLOURS = ((40, 40, 220), (40, 200, 40), (220, 80, 30), (30, 210, 230))


def class_style(class_id: int) -> tuple[str, tuple[int, int, int]]:
    """The (shape, BGR colour) that stands for VOC class ``class_id``."""
    return SHAPES[class_id % len(SHAPES)], COLOURS[class_id // len(SHAPES)]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.integers(70, 180, 3)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = (gx / w * rng.uniform(-40, 40) + gy / h * rng.uniform(-40, 40))[..., None]
    noise = rng.normal(0, 12, (h, w, 1))
    img = np.clip(base[None, None, :] * 0.6 + 50 + grad + noise, 0, 255)
    return img.astype(np.uint8)


def _draw(img: np.ndarray, shape: str, colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> None:
    x1, y1, x2, y2 = box
    cx, cy, w, h = (x1 + x2) // 2, (y1 + y2) // 2, x2 - x1, y2 - y1
    c = tuple(int(v) for v in colour)
    if shape == "rectangle":
        cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), c, -1)
    elif shape == "ellipse":
        cv2.ellipse(img, (cx, cy), (max(w // 2, 1), max(h // 2, 1)), 0, 0, 360, c, -1)
    elif shape == "triangle":
        cv2.fillPoly(img, [np.array([(cx, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], np.int32)], c)
    elif shape == "diamond":
        cv2.fillPoly(img, [np.array([(cx, y1), (x2 - 1, cy), (cx, y2 - 1), (x1, cy)], np.int32)], c)
    else:  # cross
        t = max(min(w, h) // 3, 2)
        cv2.rectangle(img, (x1, cy - t // 2), (x2 - 1, cy + t // 2), c, -1)
        cv2.rectangle(img, (cx - t // 2, y1), (cx + t // 2, y2 - 1), c, -1)


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _overlap_of_smaller(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller if smaller else 1.0


def _visible_box(shape: str, box: tuple[int, int, int, int], h: int, w: int) -> tuple[int, int, int, int] | None:
    """The tight box of the shape's pixels inside the h x w image (exclusive end); None if nothing is visible."""
    mask = np.zeros((h, w), np.uint8)
    _draw(mask, shape, (255,), box)
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _xml(
    image_id: str,
    w: int,
    h: int,
    objects: list[tuple[int, tuple[int, int, int, int], bool, bool]],
    names: Sequence[str] = VOC_CLASSES,
    origin: int = 1,
) -> str:
    objs = "".join(
        f"<object><name>{escape(names[c])}</name><pose>Unspecified</pose><truncated>{int(t)}</truncated>"
        f"<difficult>{int(d)}</difficult><bndbox><xmin>{b[0] + origin}</xmin><ymin>{b[1] + origin}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for c, b, t, d in objects
    )
    return (
        f"<annotation><folder>synthetic</folder><filename>{image_id}.jpg</filename>"
        f"<source><database>vocdet synthetic</database></source>"
        f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size><segmented>0</segmented>"
        f"{objs}</annotation>\n"
    )


def synthesize_voc(
    out: str | Path,
    images: int = 600,
    seed: int = 0,
    size: int = 256,
    val_fraction: float = 0.2,
    classes: int = len(VOC_CLASSES),
    names: Sequence[str] | None = None,
    layout: str = "flat",
    box_origin: int = 1,
) -> Path:
    """Write ``images`` JPEG + XML pairs under ``out``; returns ``out``.

    ``layout``: ``flat`` (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/{train,val}.txt``), ``roboflow``
    (``train/`` and ``valid/``, each image beside its XML) or ``folder`` (every image beside its XML, no split).
    ``names``: the class names written (default: the first ``classes`` VOC names). Boxes follow VOC's convention,
    1-based inclusive pixel corners, unless ``box_origin=0`` (0-based corners, as Albumentations' pascal_voc).
    Objects smaller than 12 px on a side are marked ``difficult`` (as VOC annotators did for tiny objects);
    objects cut by the border are ``truncated``.
    """
    if layout not in LAYOUTS:
        raise VocdetError(f"unknown synthetic layout '{layout}' (one of {', '.join(LAYOUTS)})")
    names = list(names) if names is not None else list(VOC_CLASSES[:classes])
    classes = len(names)
    if not 1 <= classes <= len(SHAPES) * len(COLOURS):
        raise VocdetError(f"the synthetic set draws 1 to {len(SHAPES) * len(COLOURS)} classes, not {classes}")
    out = Path(out)
    n_val = max(1, round(images * val_fraction)) if images > 1 else 0
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    ids = [f"synth_{i:06d}" for i in range(images)]
    for k, image_id in enumerate(ids):
        aspect = rng.uniform(0.75, 1.33)
        w, h = (size, int(size / aspect)) if aspect >= 1 else (int(size * aspect), size)
        img = _background(rng, h, w)
        objects: list[tuple[int, tuple[int, int, int, int], bool, bool]] = []
        for _ in range(int(rng.integers(1, 5))):
            for _try in range(20):  # rejection-sample boxes that do not overlap much
                side = rng.uniform(0.15, 0.5) * min(w, h)
                bw, bh = int(side * rng.uniform(0.7, 1.4)), int(side * rng.uniform(0.7, 1.4))
                x1, y1 = int(rng.integers(-bw // 4, w - 3 * bw // 4)), int(rng.integers(-bh // 4, h - 3 * bh // 4))
                cls = pyrng.randrange(classes)
                shape, colour = class_style(cls)
                box = _visible_box(shape, (x1, y1, x1 + bw, y1 + bh), h, w)  # VOC boxes bound the visible part
                # IoU alone lets a large shape hide a small one: also bound the overlap relative to the smaller box.
                if box is not None and all(
                    _iou(box, o[1]) < 0.1 and _overlap_of_smaller(box, o[1]) < 0.25 for o in objects
                ):
                    truncated = min(x1, y1) < 0 or x1 + bw > w or y1 + bh > h
                    _draw(img, shape, colour, (x1, y1, x1 + bw, y1 + bh))
                    difficult = min(box[2] - box[0], box[3] - box[1]) < 12
                    objects.append((cls, box, truncated, difficult))
                    break
        if layout == "flat":
            jpg, xml = out / "JPEGImages" / f"{image_id}.jpg", out / "Annotations" / f"{image_id}.xml"
        else:
            folder = out if layout == "folder" else out / ("valid" if k < n_val else "train")
            jpg, xml = folder / f"{image_id}.jpg", folder / f"{image_id}.xml"
        jpg.parent.mkdir(parents=True, exist_ok=True)
        xml.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(jpg), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        xml.write_text(_xml(image_id, w, h, objects, names, box_origin), encoding="utf-8")
    if layout == "flat":
        (out / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (out / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids[n_val:]) + "\n")
        (out / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids[:n_val]) + "\n")
    return out
