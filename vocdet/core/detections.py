"""What a detector returns (:class:`Detection`), and the detections JSON that ``vocdet predict`` writes and
``vocdet eval --detections`` scores.

A :class:`Detection`'s box is ``xyxy`` in continuous pixel coordinates of the original image (0 .. width), like
Ultralytics' ``Results.boxes.xyxy``; the detections JSON holds VOC XML pixels (1-based x1/y1).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vocdet.core.boxes import box_iou
from vocdet.core.files import write_json
from vocdet.core.metrics import Predictions
from vocdet.core.voc import VOC_CLASSES, box_offset
from vocdet.errors import VocdetError

log = logging.getLogger("vocdet")


@dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` (x1, y1, x2, y2) in original-image pixels, ``score`` in [0, 1]."""

    box: tuple[float, float, float, float]
    score: float
    class_id: int
    label: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box"] = list(self.box)
        return d


def detections_to_predictions(dets: list[Detection], origin: int = 1) -> Predictions:
    """Detector output -> the metric code's ``Predictions`` in the dataset's XML pixels (``data.box_origin``: 1-based
    x1/y1 for the VOC devkit's corners, as the detections JSON that ``vocdet eval --detections`` scores)."""
    boxes = np.asarray([d.box for d in dets], np.float64).reshape(-1, 4) + box_offset(origin)
    return Predictions(
        boxes=boxes,
        scores=np.asarray([d.score for d in dets], np.float64),
        labels=np.asarray([d.class_id for d in dets], np.int64),
    )


def match_detections(
    a: Sequence[Detection], b: Sequence[Detection], iou: float = 0.99, score_tol: float = 0.01
) -> tuple[int, int]:
    """How many of ``a`` have a partner in ``b`` (same class, IoU >= ``iou``, |score difference| <= ``score_tol``),
    one partner each; returns (matched, max(len(a), len(b)))."""
    total = max(len(a), len(b))
    if not a or not b:
        return 0, total
    ious = box_iou(np.asarray([d.box for d in a], np.float64), np.asarray([d.box for d in b], np.float64))
    used = np.zeros(len(b), bool)
    matched = 0
    for i, d in enumerate(a):
        ok = (ious[i] >= iou) & ~used
        ok &= np.array([e.class_id == d.class_id and abs(e.score - d.score) <= score_tol for e in b])
        if ok.any():
            used[int(np.argmax(np.where(ok, ious[i], -1)))] = True
            matched += 1
    return matched, total


def write_detections(path: str | Path, preds: dict[str, Predictions], class_names: list[str]) -> None:
    """The detections JSON: ``[{"image_id", "class", "score", "bbox": [x1, y1, x2, y2]}]`` in XML pixels."""
    rows = [
        {"image_id": image_id, "class": class_names[int(c)], "score": float(s), "bbox": [float(v) for v in b]}
        for image_id in sorted(preds)
        for b, s, c in zip(preds[image_id].boxes, preds[image_id].scores, preds[image_id].labels)
    ]
    write_json(path, rows)


def read_detections(
    path: str | Path, known_ids: set[str], class_names: Sequence[str] = VOC_CLASSES
) -> dict[str, Predictions]:
    """Parse a detections JSON file; malformed rows are a one-line error naming the row."""
    index = {name: i for i, name in enumerate(class_names)}
    path = Path(path)
    if not path.is_file():
        raise VocdetError(f"detections file not found: {path}")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VocdetError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(rows, list):
        raise VocdetError(f"{path} must hold a JSON list of detections")
    grouped: dict[str, list[tuple[list[float], float, int]]] = {}
    unknown = set()
    for n, row in enumerate(rows):
        try:
            image_id, cls, score, bbox = str(row["image_id"]), row["class"], float(row["score"]), row["bbox"]
            box = [float(v) for v in bbox]
            if len(box) != 4:
                raise ValueError("bbox needs 4 numbers")
        except (KeyError, TypeError, ValueError) as e:
            raise VocdetError(
                f"{path}: detection #{n} is malformed ({e}); expected "
                '{"image_id": str, "class": str, "score": float, "bbox": [x1, y1, x2, y2]}'
            ) from None
        if cls not in index:
            raise VocdetError(
                f"{path}: detection #{n} has unknown class '{cls}' (the classes: {', '.join(class_names)}; "
                "data.classes sets them)"
            )
        if image_id not in known_ids:
            unknown.add(image_id)
            continue
        grouped.setdefault(image_id, []).append((box, score, index[cls]))
    if unknown:
        log.warning("%d image ids in %s are not in the validation split and were ignored", len(unknown), path)
    return {
        k: Predictions(
            boxes=np.asarray([r[0] for r in v], np.float64).reshape(-1, 4),
            scores=np.asarray([r[1] for r in v], np.float64),
            labels=np.asarray([r[2] for r in v], np.int64),
        )
        for k, v in grouped.items()
    }
