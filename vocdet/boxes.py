"""Letterbox geometry, box formats and NMS: shared by validation, ``Detector`` and export.

Light on purpose (no Lightning, no Ultralytics import), so ONNX-only inference and serving stay small.
Box formats: ``xyxy`` = (x1, y1, x2, y2) corners in pixels; ``xywh`` = (cx, cy, w, h) centre and size.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torchvision

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
    boxes: torch.Tensor, ratio: tuple[float, float], pad: tuple[int, int], width: int, height: int
) -> torch.Tensor:
    """Inverse of ``letterbox`` for (N, 4) xyxy boxes, clipped to the original ``width`` x ``height``."""
    out = boxes.clone()
    out[:, [0, 2]] = ((out[:, [0, 2]] - pad[0]) / ratio[0]).clamp(0, width)
    out[:, [1, 3]] = ((out[:, [1, 3]] - pad[1]) / ratio[1]).clamp(0, height)
    return out


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre xywh -> (..., 4) xyxy, same units."""
    xy, wh = boxes[..., :2], boxes[..., 2:4] / 2
    return torch.cat((xy - wh, xy + wh), -1)


def non_max_suppression(
    preds: torch.Tensor,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    multi_label: bool = False,
    max_nms: int = 30000,
) -> list[torch.Tensor]:
    """Per-image class-aware NMS (torchvision ``batched_nms``) of raw YOLOv8 outputs.

    Args:
        preds: (B, 4 + nc, A) as the Detect head emits in eval mode: centre xywh in input pixels, then
            sigmoid class scores.
        multi_label: keep every (box, class) pair above ``conf`` (Ultralytics' validator does this), else only
            each box's best class (its predictor does this).

    Returns:
        B tensors of shape (n, 6): x1, y1, x2, y2, score, class_id, in input (letterboxed) pixels, sorted by score.
    """
    preds = preds.float().transpose(1, 2)  # (B, A, 4 + nc)
    out = []
    for p in preds:
        boxes, scores = xywh_to_xyxy(p[:, :4]), p[:, 4:]
        if multi_label:
            i, j = (scores > conf).nonzero(as_tuple=True)
            boxes, score, cls = boxes[i], scores[i, j], j
        else:
            score, cls = scores.max(1)
            keep = score > conf
            boxes, score, cls = boxes[keep], score[keep], cls[keep]
        if score.numel() > max_nms:  # bound NMS cost on a degenerate (untrained) model
            top = score.topk(max_nms).indices
            boxes, score, cls = boxes[top], score[top], cls[top]
        keep = torchvision.ops.batched_nms(boxes, score, cls, iou)[:max_det]
        out.append(torch.cat((boxes[keep], score[keep, None], cls[keep, None].float()), 1))
    return out
