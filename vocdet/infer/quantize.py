"""int8 ONNX: static post-training quantization with ONNX Runtime's quantizer, and the accuracy gate it must pass.

QDQ format, per-channel int8 weights, uint8 activations calibrated (MinMax) on ``export.calib_images`` training
images letterboxed exactly as inference letterboxes them. What stays fp32, and why (measured on the quickstart
model and on a weakly trained one, mAP50 on their validation splits; README "Inference"):

* the Detect head's box decoding (the DFL, the anchor/stride arithmetic), its class-score sigmoid and an in-graph
  NMS: quantizing them makes every box collapse (ONNX Runtime issue 10787; measured: mAP50 0.000);
* the last conv of each box and class branch (the raw box distributions and class logits): quantizing them lost
  1.9 mAP50 points on the weak model (0.2098 against fp32 0.2292; 0.2457 with them in fp32) and nothing on the
  quickstart model.

Everything else (backbone, neck, the branches' first two convs, the SiLUs) is int8: the SiLUs in fp32 were
slower (31 ms against 22 ms at 640) for the same accuracy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vocdet.core.detections import detections_to_predictions
from vocdet.core.drift import evenly
from vocdet.core.images import find_images, read_image
from vocdet.core.metrics import GroundTruth, evaluate_detections
from vocdet.core.voc import class_list, split_records
from vocdet.errors import VocdetError
from vocdet.infer.detector import Detector, stack

log = logging.getLogger("vocdet")

MIN_CALIB_IMAGES = 16


def quantizable(model: Any) -> list[str]:
    """Names of the nodes that stay fp32: everything but the backbone, the neck and the head's conv branches
    (whose last convs stay fp32 too)."""
    keep_fp32 = []
    head_index = _head_index(model)
    for node in model.graph.node:
        name = node.name
        in_net = name.startswith("/net/model.")
        head = in_net and name.split("/")[2] == f"model.{head_index}"
        branch = head and ("/cv2." in name or "/cv3." in name) and not name.endswith(".2/Conv")
        if not in_net or (head and not branch):
            keep_fp32.append(name)
    return keep_fp32


def _head_index(model: Any) -> int:
    """The index of the Detect module: the last ``/net/model.<i>/`` in the graph."""
    return max(int(n.name.split("/")[2].split(".")[1]) for n in model.graph.node if n.name.startswith("/net/model."))


def calibration_images(cfg: Any) -> tuple[list[np.ndarray], str, int]:
    """(images, where they came from, how many were unreadable): ``export.calib_source`` (files, globs, folders) or
    the training split of ``data.*``; ``export.calib_images`` of them, evenly spread."""
    e = cfg.export
    if e.calib_source:
        paths = evenly(find_images([e.calib_source]), e.calib_images)
        source = str(e.calib_source)
    else:
        try:
            records = split_records(cfg.data, "train", class_list(cfg.data.classes), cfg.run.seed)
        except VocdetError as err:
            raise VocdetError(f"int8 calibration reads the training split: {err}") from None
        paths = [Path(r.image) for r in evenly(records, e.calib_images)]
        source = f"training split of {cfg.data.root}"
    images, bad = [], 0
    for p in paths:
        try:
            images.append(read_image(p))
        except VocdetError:
            bad += 1
    if bad:
        log.warning("int8 calibration: skipped %d unreadable images of %s", bad, source)
    if len(images) < min(MIN_CALIB_IMAGES, e.calib_images):
        raise VocdetError(
            f"int8 calibration needs at least {min(MIN_CALIB_IMAGES, e.calib_images)} readable images, found "
            f"{len(images)} in {source} (set export.calib_source to a folder of images like the ones you serve)"
        )
    return images, source, bad


def quantize(fp32: Path, out: Path, detector: Detector, images: list[np.ndarray]) -> list[str]:
    """Write the int8 QDQ model of ``fp32`` to ``out``; returns the nodes kept in fp32."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        """Each image letterboxed by ``detector.prepare``, as inference does."""

        def __init__(self) -> None:
            self.items = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            img = next(self.items, None)
            if img is None:
                return None
            return {"images": np.ascontiguousarray(stack([detector.prepare(img)]), dtype=np.float32) / 255}

    reader = Reader()
    model = onnx.load(str(fp32))
    keep = quantizable(model)
    with _quiet_quantizer():
        quantize_static(
            str(fp32),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=keep,
        )
    quantized = onnx.load(str(out))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)  # the quantizer drops vocdet's metadata
    onnx.save(quantized, str(out))
    return keep


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer warns on the root logger about the fp32 head (by design here) and pre-processing."""

    def drop(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def score(detector: Detector, cfg: Any, limit: int, split: str = "val") -> tuple[dict[str, float], int]:
    """vocdet's mAP of ``detector`` on up to ``limit`` images of ``split`` (evenly spread; ``all``: every image of data
    without a split of its own), at the eval thresholds."""
    records = evenly(split_records(cfg.data, split, detector.class_names, cfg.run.seed), limit)
    if not records:
        raise VocdetError(f"the int8 accuracy gate needs validation images; none found under {cfg.data.root}")
    gts = {r.id: GroundTruth(r.boxes, r.labels, r.difficult) for r in records}
    conf = max(cfg.eval.conf, detector.conf) if detector.nms_in_graph else cfg.eval.conf
    preds = {
        r.id: detections_to_predictions(
            detector.predict(read_image(r.image), conf=conf, iou=detector.iou)[0], detector.box_origin
        )
        for r in records
    }
    result = evaluate_detections(gts, preds, detector.class_names)
    return {"map50": float(result["map50"]), "map50_95": float(result["map50_95"])}, len(records)
