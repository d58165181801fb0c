"""Box formats and NMS (no Ultralytics import, so ONNX-only inference stays light).

Box formats: ``xyxy`` = (x1, y1, x2, y2) corners in pixels; ``xywh`` = (cx, cy, w, h) centre and size.
"""

from __future__ import annotations

import torch
import torchvision


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
