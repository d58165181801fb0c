"""Letterbox geometry, box formats and NMS: shared by validation, ``Detector`` and export.

No torch import at module level: ONNX-only inference and serving run on numpy arrays. Box formats: ``xyxy`` =
(x1, y1, x2, y2) corners in pixels; ``xywh`` = (cx, cy, w, h) centre and size.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

PAD_VALUE = 114  # grey used by Ultralytics for letterbox/mosaic/affine borders


def letterbox(
    img: np.ndarray, size: int, interpolation: int = cv2.INTER_LINEAR, stride: int | None = None
) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping aspect ratio and pad (centred, grey) to ``size`` x ``size``, as Ultralytics' ``LetterBox``.

    With ``stride`` the padding only reaches the next multiple of it (Ultralytics' ``auto`` mode: a 4:3 image
    becomes 640 x 480, not 640 x 640). Returns (image, (gain_x, gain_y), (pad_left, pad_top)); a box maps as
    ``x * gain_x + pad_left``, ``y * gain_y + pad_top`` (see ``unletterbox_boxes``). The gains are the exact ones
    of the rounded resize (``new_width / width``), as Ultralytics' ``scale_boxes`` uses.
    """
    h, w = img.shape[:2]
    r = min(size / h, size / w)
    nw, nh = max(round(w * r), 1), max(round(h * r), 1)
    if (nw, nh) != (w, h):
        img = cv2.resize(img, (nw, nh), interpolation=interpolation)
    dw, dh = size - nw, size - nh
    if stride:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return img, (nw / w, nh / h), (left, top)


def unletterbox_boxes(
    boxes: np.ndarray, ratio: tuple[float, float], pad: tuple[int, int], width: int, height: int
) -> np.ndarray:
    """Inverse of ``letterbox`` for (N, 4) xyxy boxes, clipped to the original ``width`` x ``height``."""
    out = np.array(boxes, copy=True)
    out[:, [0, 2]] = ((out[:, [0, 2]] - pad[0]) / ratio[0]).clip(0, width)
    out[:, [1, 3]] = ((out[:, [1, 3]] - pad[1]) / ratio[1]).clip(0, height)
    return out


def xywh_to_xyxy(boxes: Any) -> Any:
    """(..., 4) centre xywh -> (..., 4) xyxy, same units; a numpy array or a torch tensor."""
    xy, wh = boxes[..., :2], boxes[..., 2:4] / 2
    if isinstance(boxes, np.ndarray):
        return np.concatenate((xy - wh, xy + wh), -1)
    import torch

    return torch.cat((xy - wh, xy + wh), -1)


def non_max_suppression(
    preds: Any,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    multi_label: bool = False,
    max_nms: int = 30000,
) -> list[Any]:
    """Per-image class-aware NMS of raw YOLOv8 outputs.

    Args:
        preds: (B, 4 + nc, A) as the Detect head emits in eval mode: centre xywh in input pixels, then sigmoid
            class scores. A torch tensor (any device) runs torchvision's ``batched_nms`` where it lies; a numpy
            array (ONNX Runtime's output) runs OpenCV's ``NMSBoxesBatched`` and never imports torch.
        multi_label: keep every (box, class) pair above ``conf`` (Ultralytics' validator does this), else only
            each box's best class (its predictor does this).

    Returns:
        B arrays/tensors (as ``preds``) of shape (n, 6): x1, y1, x2, y2, score, class_id, in input (letterboxed)
        pixels, sorted by score.
    """
    is_np = isinstance(preds, np.ndarray)
    out = []
    for p in preds:
        p = p.T if is_np else p.float().T  # (A, 4 + nc)
        boxes, scores = xywh_to_xyxy(p[:, :4]), p[:, 4:]
        if multi_label:
            i, j = np.nonzero(scores > conf) if is_np else (scores > conf).nonzero().T
            boxes, score, cls = boxes[i], scores[i, j], j
        else:
            cls = scores.argmax(1)
            score = scores.max(1) if is_np else scores.amax(1)
            keep = score > conf
            boxes, score, cls = boxes[keep], score[keep], cls[keep]
        if len(score) > max_nms:  # bound NMS cost on a degenerate (untrained) model
            top = (-score).argsort(kind="stable")[:max_nms] if is_np else score.topk(max_nms).indices
            boxes, score, cls = boxes[top], score[top], cls[top]
        keep = _batched_nms(boxes, score, cls, iou)[:max_det]
        if is_np:
            det = np.concatenate((boxes[keep], score[keep, None], cls[keep, None]), 1, dtype=np.float32)
        else:
            import torch

            det = torch.cat((boxes[keep], score[keep, None], cls[keep, None].float()), 1)
        out.append(det)
    return out


def _batched_nms(boxes: Any, scores: Any, classes: Any, iou: float) -> Any:
    """Indices kept by class-aware NMS, by decreasing score (torchvision for tensors, OpenCV for arrays)."""
    if not isinstance(boxes, np.ndarray):
        import torchvision

        return torchvision.ops.batched_nms(boxes, scores, classes, iou)
    if not len(boxes):
        return np.zeros(0, np.int64)
    xywh = np.concatenate((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), 1)
    keep = cv2.dnn.NMSBoxesBatched(xywh, scores, classes.astype(np.int32), -np.inf, iou)
    return np.asarray(keep, np.int64).reshape(-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) xyxy boxes -> (N, M) intersection over union (continuous coordinates)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, np.finfo(np.float64).tiny)
