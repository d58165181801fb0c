"""Detection metrics for PASCAL VOC: COCO-style mAP50 / mAP50-95 and VOC07 11-point AP50.

One implementation serves training-time validation and ``vocdet eval``. The numbers are meant to be *exact*
reproductions of two reference implementations, not approximations of them:

* **COCO-style AP** is what ``pycocotools`` ``COCOeval(iouType="bbox")`` computes with its default parameters
  (IoU thresholds .50:.05:.95, 101 recall points, at most 100 detections per image and class, area range
  "all"), where every VOC ``difficult`` object is handed to pycocotools as ``iscrowd=1``: it is an *ignore*
  ground truth, its IoU is intersection / detection area, several detections may match it, and detections that
  match it count as neither true nor false positives. Image ids are ordered with Python's ``sorted()``.
* **VOC07 AP50** is what the devkit's ``voc_eval.py`` (the py-faster-rcnn transcription) computes with
  ``use_07_metric=True``: +1 inclusive pixel areas, ``IoU > 0.5``, difficult objects ignored, each object
  matched at most once, 11-point interpolated precision. The devkit reads one detection file per class; this
  module lists a class's detections image by image (sorted image ids), each image's in array order, and sorts
  them with the same ``np.argsort(-confidence)`` call, so even ties are broken the same way.

The reference implementations loop over images, classes, thresholds and detections in Python. Here all images
and classes are evaluated together with numpy: detections and ground truths are sorted once into
(class, image) groups, the greedy matching runs as one vectorised step per detection rank (the k-th best
detection of every group at once, all 10 IoU thresholds at once), and the accumulation runs per class.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

# Exactly pycocotools' Params.setDetParams values (linspace, not arange: IoUs are compared with ``<``).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETS = 100
HEADLINE = ("map50", "map50_95", "voc07_map50")  # the summary numbers (W&B summary, DVC metrics, artifacts)
AREA_RANGE = (0.0**2, 1e5**2)
# pycocotools never accepts an IoU threshold of exactly 1.
_MATCH_THRESHOLDS = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)
# The devkit's 11 recall points come from arange, including its rounding (0.30000000000000004, ...).
_VOC07_RECALL_POINTS = np.arange(0.0, 1.1, 0.1)


class GroundTruth(NamedTuple):
    """Ground truth of one image.

    boxes: float (N, 4) xyxy in the annotation's pixel coordinates; labels: int (N,) class ids;
    difficult: bool (N,) the VOC ``difficult`` flag.
    """

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


class Predictions(NamedTuple):
    """Detections of one image.

    boxes: float (M, 4) xyxy in the same pixel coordinates as the ground truth; scores: float (M,);
    labels: int (M,) class ids.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


class _Flat(NamedTuple):
    """All images concatenated, image by image in sorted-id order, each image's rows in their given order."""

    num_images: int
    gt_boxes: np.ndarray  # (G, 4) xyxy float64
    gt_labels: np.ndarray  # (G,) int64
    gt_difficult: np.ndarray  # (G,) bool
    gt_image: np.ndarray  # (G,) int64 rank of the image id in sorted order
    dt_boxes: np.ndarray  # (D, 4) xyxy float64
    dt_scores: np.ndarray  # (D,) float64
    dt_labels: np.ndarray  # (D,) int64
    dt_image: np.ndarray  # (D,) int64


def _check_rows(name: str, image_id: str, boxes: np.ndarray, *columns: np.ndarray) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} boxes of image {image_id!r} must have shape (N, 4), got {boxes.shape}")
    for column in columns:
        if column.shape != (boxes.shape[0],):
            raise ValueError(
                f"{name} of image {image_id!r}: {boxes.shape[0]} boxes but a column of shape {column.shape}"
            )


def _flatten(gts: Mapping[str, GroundTruth], preds: Mapping[str, Predictions], num_classes: int) -> _Flat:
    image_ids = sorted(gts)
    unknown = set(preds) - set(gts)
    if unknown:
        examples = sorted(unknown)[:3]
        raise ValueError(f"predictions for {len(unknown)} image(s) without ground truth, e.g. {examples}")
    g_boxes, g_labels, g_diff, g_count = [], [], [], []
    d_boxes, d_scores, d_labels, d_count = [], [], [], []
    for image_id in image_ids:
        gt = gts[image_id]
        boxes = np.asarray(gt.boxes, dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(gt.labels).reshape(-1).astype(np.int64)
        difficult = np.asarray(gt.difficult).reshape(-1).astype(bool)
        _check_rows("ground truth", image_id, boxes, labels, difficult)
        g_boxes.append(boxes)
        g_labels.append(labels)
        g_diff.append(difficult)
        g_count.append(len(labels))
        pred = preds.get(image_id)
        if pred is None:
            d_count.append(0)
            continue
        boxes = np.asarray(pred.boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(pred.scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(pred.labels).reshape(-1).astype(np.int64)
        _check_rows("predictions", image_id, boxes, scores, labels)
        d_boxes.append(boxes)
        d_scores.append(scores)
        d_labels.append(labels)
        d_count.append(len(labels))

    def cat(parts: list[np.ndarray], shape: tuple[int, ...], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(shape, dtype=dtype)

    flat = _Flat(
        num_images=len(image_ids),
        gt_boxes=cat(g_boxes, (0, 4), np.float64),
        gt_labels=cat(g_labels, (0,), np.int64),
        gt_difficult=cat(g_diff, (0,), bool),
        gt_image=np.repeat(np.arange(len(image_ids), dtype=np.int64), g_count),
        dt_boxes=cat(d_boxes, (0, 4), np.float64),
        dt_scores=cat(d_scores, (0,), np.float64),
        dt_labels=cat(d_labels, (0,), np.int64),
        dt_image=np.repeat(np.arange(len(image_ids), dtype=np.int64), d_count),
    )
    for name, labels in (("ground-truth", flat.gt_labels), ("predicted", flat.dt_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            lo, hi = int(labels.min()), int(labels.max())
            raise ValueError(f"{name} class ids must lie in [0, {num_classes}), got {lo}..{hi}")
    # NaN would make every comparison below silently false (and the references' sorts undefined).
    if not (np.isfinite(flat.gt_boxes).all() and np.isfinite(flat.dt_boxes).all()):
        raise ValueError("boxes must be finite")
    if not np.isfinite(flat.dt_scores).all():
        raise ValueError("scores must be finite")
    return flat


def _segment_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Start offsets of the runs of equal values in a sorted 1-D array."""
    if sorted_keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))


def _coco_iou(dt_xywh: np.ndarray, gt_xywh: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """pycocotools' ``bbIou`` (maskApi.c) on paired rows, operation for operation: identical doubles.

    dt_xywh, gt_xywh: (P, 4) xywh; crowd: (P,) bool. Crowd IoU is intersection / detection area.
    """
    dx, dy, dw, dh = dt_xywh.T
    gx, gy, gw, gh = gt_xywh.T
    da = dw * dh
    ga = gw * gh
    # The C code recomputes the right/bottom edges as x + w; keep that rounding.
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = w * h
    union = np.where(crowd, da, da + ga - inter)
    overlap = (w > 0) & (h > 0)
    out = np.zeros(len(inter), dtype=np.float64)
    np.divide(inter, union, out=out, where=overlap)
    return out


def _voc_iou(dt_xyxy: np.ndarray, gt_xyxy: np.ndarray) -> np.ndarray:
    """The devkit's overlap (+1 inclusive pixel areas) on paired rows, (P, 4) xyxy each, same operations."""
    ixmin = np.maximum(gt_xyxy[:, 0], dt_xyxy[:, 0])
    iymin = np.maximum(gt_xyxy[:, 1], dt_xyxy[:, 1])
    ixmax = np.minimum(gt_xyxy[:, 2], dt_xyxy[:, 2])
    iymax = np.minimum(gt_xyxy[:, 3], dt_xyxy[:, 3])
    iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
    ih = np.maximum(iymax - iymin + 1.0, 0.0)
    inters = iw * ih
    uni = (
        (dt_xyxy[:, 2] - dt_xyxy[:, 0] + 1.0) * (dt_xyxy[:, 3] - dt_xyxy[:, 1] + 1.0)
        + (gt_xyxy[:, 2] - gt_xyxy[:, 0] + 1.0) * (gt_xyxy[:, 3] - gt_xyxy[:, 1] + 1.0)
        - inters
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        return inters / uni


def _coco_precision(
    flat: _Flat,
    num_classes: int,
    d_sorted: np.ndarray,
    g_sorted: np.ndarray,
    d_rank: np.ndarray,
    pair_det: np.ndarray,
    pair_gt: np.ndarray,
    g_start: np.ndarray,
    g_count: np.ndarray,
) -> np.ndarray:
    """pycocotools' evaluateImg + accumulate for area "all", maxDets 100: precision of shape (T, R, K).

    Detections are indexed in ``d_sorted`` order (class, image, score desc, input order); ground truths in
    ``g_sorted`` order (class, image, ignored last, input order); the two members of a pair (pair_det[i],
    pair_gt[i]) share a (class, image) group. g_start, g_count: per detection, its group's slice of the gts.
    Entries stay -1 for classes that pycocotools leaves at -1 (no non-ignored ground truth).
    """
    num_t, num_r = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
    n_det = len(d_sorted)
    dt_xyxy = flat.dt_boxes[d_sorted]
    gt_xyxy = flat.gt_boxes[g_sorted]
    # Boxes go through xywh exactly as they would in a COCO json (w = x2 - x1, area = w * h).
    dt_xywh = np.concatenate([dt_xyxy[:, :2], dt_xyxy[:, 2:] - dt_xyxy[:, :2]], axis=1)
    gt_xywh = np.concatenate([gt_xyxy[:, :2], gt_xyxy[:, 2:] - gt_xyxy[:, :2]], axis=1)
    dt_area = dt_xywh[:, 2] * dt_xywh[:, 3]
    gt_area = gt_xywh[:, 2] * gt_xywh[:, 3]
    gt_crowd = flat.gt_difficult[g_sorted]
    gt_ignore = gt_crowd | (gt_area < AREA_RANGE[0]) | (gt_area > AREA_RANGE[1])

    dt_matched = np.zeros((n_det, num_t), dtype=bool)
    dt_ignore = np.zeros((n_det, num_t), dtype=bool)

    # Only the top MAX_DETS detections of each (image, class) exist for pycocotools.
    keep_pair = d_rank[pair_det] < MAX_DETS
    p_det, p_gt = pair_det[keep_pair], pair_gt[keep_pair]
    if len(p_det):
        iou = _coco_iou(dt_xywh[p_det], gt_xywh[p_gt], gt_crowd[p_gt])
        # The greedy rule picks, among still-available gts with IoU >= t, the best regular one, else the best
        # ignored one; among equal IoUs the *last* in gt order wins (the loop updates on ``>=``). One integer
        # key per pair orders exactly that way: (regular, IoU rank, gt position within the group).
        _, iou_rank = np.unique(iou, return_inverse=True)
        n_levels = int(iou_rank.max()) + 2
        g_local = p_gt - g_start[p_det]
        width = int(g_count.max()) + 1
        pair_key = ((~gt_ignore[p_gt]).astype(np.int64) * n_levels + iou_rank.reshape(-1)) * width + g_local

        # Detection k of a group only depends on detections 0..k-1 of the same group, so step over the rank k
        # and handle every group's k-th detection at once. A stable sort keeps pairs det-major, gt-minor.
        step_order = np.argsort(d_rank[p_det], kind="stable")
        p_det, p_gt, iou, pair_key = (
            p_det[step_order],
            p_gt[step_order],
            iou[step_order],
            pair_key[step_order],
        )
        p_step = d_rank[p_det]
        bounds = np.searchsorted(p_step, np.arange(int(p_step.max()) + 2), side="left")
        iou_ok = iou[:, None] >= _MATCH_THRESHOLDS[None, :]
        gt_taken = np.zeros((len(g_sorted), num_t), dtype=bool)
        for lo, hi in itertools.pairwise(bounds):
            if lo == hi:
                continue
            dets, gts_ = p_det[lo:hi], p_gt[lo:hi]
            # Crowd (difficult) gts stay available after a match; any other gt is used up.
            available = ~gt_taken[gts_] | gt_crowd[gts_][:, None]
            keys = np.where(iou_ok[lo:hi] & available, pair_key[lo:hi, None], -1)
            starts = _segment_starts(dets)
            best = np.maximum.reduceat(keys, starts, axis=0)  # (dets in this step, T)
            det_idx, t_idx = np.nonzero(best >= 0)
            step_dets = dets[starts][det_idx]
            chosen_gt = g_start[step_dets] + best[det_idx, t_idx] % width
            dt_matched[step_dets, t_idx] = True
            dt_ignore[step_dets, t_idx] = gt_ignore[chosen_gt]
            gt_taken[chosen_gt, t_idx] = True

    dt_out_of_range = (dt_area < AREA_RANGE[0]) | (dt_area > AREA_RANGE[1])
    dt_ignore |= ~dt_matched & dt_out_of_range[:, None]

    precision = -np.ones((num_t, num_r, num_classes))
    d_labels = flat.dt_labels[d_sorted]
    g_labels = flat.gt_labels[g_sorted]
    npig_per_class = np.bincount(g_labels[~gt_ignore], minlength=num_classes)
    class_bounds = np.searchsorted(d_labels, np.arange(num_classes + 1), side="left")
    for k in range(num_classes):
        npig = int(npig_per_class[k])
        if npig == 0:
            continue
        sel = np.arange(class_bounds[k], class_bounds[k + 1])
        sel = sel[d_rank[sel] < MAX_DETS]
        # Same concatenation order (image by image, score desc) and the same stable sort as accumulate().
        order = sel[np.argsort(-flat.dt_scores[d_sorted[sel]], kind="mergesort")]
        matched, ignored = dt_matched[order].T, dt_ignore[order].T  # (T, nd)
        tps = matched & ~ignored
        fps = ~matched & ~ignored
        tp_sum = np.cumsum(tps, axis=1).astype(dtype=float)
        fp_sum = np.cumsum(fps, axis=1).astype(dtype=float)
        nd = tp_sum.shape[1]
        if nd == 0:
            precision[:, :, k] = 0.0
            continue
        rc = tp_sum / npig
        pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
        # The backwards "if pr[i] > pr[i-1]" sweep is a suffix maximum.
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
        for t in range(num_t):
            inds = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
            # pycocotools leaves 0 where the recall level is never reached (its IndexError is swallowed).
            precision[t, :, k] = np.where(inds < nd, pr[t, np.minimum(inds, nd - 1)], 0.0)
    return precision


def _voc07_ap(
    flat: _Flat,
    num_classes: int,
    d_sorted: np.ndarray,
    g_sorted: np.ndarray,
    pair_det: np.ndarray,
    pair_gt: np.ndarray,
    g_count: np.ndarray,
) -> list[float | None]:
    """The devkit's voc_eval(use_07_metric=True) AP per class; None where a class has no non-difficult gt.

    Same detection / gt / pair indexing as ``_coco_precision``, but every detection takes part (no maxDets).
    """
    n_det = len(d_sorted)
    ovmax = np.full(n_det, -np.inf)
    jmax = np.full(n_det, -1, dtype=np.int64)  # index into the flat (input-order) gt arrays
    if len(pair_det):
        ov = _voc_iou(flat.dt_boxes[d_sorted[pair_det]], flat.gt_boxes[g_sorted[pair_gt]])
        has_gt = np.flatnonzero(g_count > 0)
        # Pairs are det-major, so each detection with gts owns one contiguous, non-empty run.
        starts = np.concatenate(([0], np.cumsum(g_count[has_gt])[:-1]))
        seg_max = np.maximum.reduceat(ov, starts)
        ovmax[has_gt] = seg_max
        # np.argmax takes the first maximum in the devkit's gt order, which is the input order.
        gt_input_index = g_sorted[pair_gt]
        is_max = ov == np.repeat(seg_max, g_count[has_gt])
        candidates = np.where(is_max, gt_input_index, np.iinfo(np.int64).max)
        jmax[has_gt] = np.minimum.reduceat(candidates, starts)

    # Back to input order: per class that is the devkit's detection-file order (image by image, sorted ids).
    ovmax_in = np.empty(n_det)
    jmax_in = np.empty(n_det, dtype=np.int64)
    ovmax_in[d_sorted] = ovmax
    jmax_in[d_sorted] = jmax

    npos_per_class = np.bincount(flat.gt_labels[~flat.gt_difficult], minlength=num_classes)
    by_class = np.argsort(flat.dt_labels, kind="stable")
    class_bounds = np.searchsorted(flat.dt_labels[by_class], np.arange(num_classes + 1), side="left")
    aps: list[float | None] = []
    for k in range(num_classes):
        npos = int(npos_per_class[k])
        if npos == 0:
            aps.append(None)
            continue
        idx = by_class[class_bounds[k] : class_bounds[k + 1]]
        confidence = flat.dt_scores[idx]
        # The devkit's own (unstable, default-kind) sort on the same array: identical tie order.
        idx = idx[np.argsort(-confidence)]
        hit = ovmax_in[idx] > 0.5
        best = jmax_in[idx]
        on_difficult = np.zeros(len(idx), dtype=bool)
        on_difficult[hit] = flat.gt_difficult[best[hit]]
        claims = np.flatnonzero(hit & ~on_difficult)
        tp = np.zeros(len(idx))
        # Only the first (highest-ranked) claim on an object is a TP; the devkit has no second choice.
        _, first = np.unique(best[claims], return_index=True)
        tp[claims[first]] = 1.0
        fp = np.where(on_difficult, 0.0, 1.0 - tp)
        fp = np.cumsum(fp)
        tp = np.cumsum(tp)
        rec = tp / float(npos)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap = 0.0
        for t in _VOC07_RECALL_POINTS:
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        aps.append(float(ap))
    return aps


def evaluate_detections(
    gts: Mapping[str, GroundTruth],
    preds: Mapping[str, Predictions],
    class_names: Sequence[str],
    *,
    curves: bool = False,
) -> dict[str, Any]:
    """Evaluate detections against VOC ground truth with COCO-style and VOC07 metrics.

    gts: image id -> GroundTruth (boxes (N, 4) xyxy pixels, labels (N,), difficult (N,)); every evaluated
    image must be here, also images without objects. preds: image id -> Predictions (boxes (M, 4) xyxy,
    scores (M,), labels (M,)); a missing image id means no detections. class_names: index = class id.

    Returns a JSON-serialisable dict::

        {"map50", "map50_95", "voc07_map50": float,
         "per_class": {name: {"ap50", "ap50_95", "voc07_ap50": float | None,
                              "num_gt" (non-difficult), "num_difficult", "num_pred": int}},
         "num_images": int}

    Classes without non-difficult ground truth get None and are left out of the means (pycocotools' -1);
    the means are 0.0 when no class has ground truth. ``curves=True`` adds ``"pr_curve": {"recall": [101],
    "precision": {name: [101] | None}}``: the interpolated precision at IoU 0.5 behind AP50.
    """
    num_classes = len(class_names)
    flat = _flatten(gts, preds, num_classes)
    n_img = max(flat.num_images, 1)

    # One (class, image) key per row; class-major so that a class is one contiguous block after sorting.
    g_key = flat.gt_labels * n_img + flat.gt_image
    d_key = flat.dt_labels * n_img + flat.dt_image
    g_area = (flat.gt_boxes[:, 2] - flat.gt_boxes[:, 0]) * (flat.gt_boxes[:, 3] - flat.gt_boxes[:, 1])
    g_ignore = flat.gt_difficult | (g_area < AREA_RANGE[0]) | (g_area > AREA_RANGE[1])
    # As pycocotools: gts ignored-last, dets by score desc, both by stable sorts (input order on ties).
    g_sorted = np.lexsort((np.arange(len(g_key)), g_ignore, g_key))
    d_sorted = np.lexsort((np.arange(len(d_key)), -flat.dt_scores, d_key))
    g_key_s, d_key_s = g_key[g_sorted], d_key[d_sorted]
    d_group_start = _segment_starts(d_key_s)
    # Rank of each detection within its (class, image) group; pycocotools keeps ranks 0..MAX_DETS-1.
    d_group_size = np.diff(np.append(d_group_start, len(d_key_s)))
    d_rank = np.arange(len(d_key_s)) - np.repeat(d_group_start, d_group_size)

    # Every (detection, gt) pair of a (class, image) group: det-major, gts in sorted order within a det.
    g_start = np.searchsorted(g_key_s, d_key_s, side="left")
    g_count = np.searchsorted(g_key_s, d_key_s, side="right") - g_start
    n_pairs = int(g_count.sum())
    pair_det = np.repeat(np.arange(len(d_key_s)), g_count)
    pair_gt = np.repeat(g_start - (np.cumsum(g_count) - g_count), g_count) + np.arange(n_pairs)

    precision = _coco_precision(
        flat,
        num_classes,
        d_sorted,
        g_sorted,
        d_rank,
        pair_det,
        pair_gt,
        g_start,
        g_count,
    )
    voc07 = _voc07_ap(flat, num_classes, d_sorted, g_sorted, pair_det, pair_gt, g_count)

    # Means over the flattened (T, R, K) entries in C order, exactly like COCOeval.summarize().
    valid = precision > -1
    map50_95 = float(np.mean(precision[valid])) if valid.any() else 0.0
    p50 = precision[0]
    map50 = float(np.mean(p50[p50 > -1])) if (p50 > -1).any() else 0.0
    voc_valid = [ap for ap in voc07 if ap is not None]
    voc07_map50 = float(np.mean(np.array(voc_valid))) if voc_valid else 0.0

    num_gt = np.bincount(flat.gt_labels[~flat.gt_difficult], minlength=num_classes)
    num_difficult = np.bincount(flat.gt_labels[flat.gt_difficult], minlength=num_classes)
    num_pred = np.bincount(flat.dt_labels, minlength=num_classes)
    per_class: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(class_names):
        pk = precision[:, :, k]
        per_class[name] = {
            "ap50": float(np.mean(pk[0][pk[0] > -1])) if (pk[0] > -1).any() else None,
            "ap50_95": float(np.mean(pk[pk > -1])) if (pk > -1).any() else None,
            "voc07_ap50": voc07[k],
            "num_gt": int(num_gt[k]),
            "num_difficult": int(num_difficult[k]),
            "num_pred": int(num_pred[k]),
        }
    result: dict[str, Any] = {
        "map50": map50,
        "map50_95": map50_95,
        "voc07_map50": voc07_map50,
        "per_class": per_class,
        "num_images": flat.num_images,
    }
    if curves:
        result["pr_curve"] = {
            "recall": RECALL_THRESHOLDS.tolist(),
            "precision": {
                name: p50[:, k].tolist() if (p50[:, k] > -1).all() else None for k, name in enumerate(class_names)
            },
        }
    return result


def fitness(result: Mapping[str, Any]) -> float:
    """Model-selection score of an ``evaluate_detections`` result: 0.1 * mAP50 + 0.9 * mAP50-95."""
    return 0.1 * float(result["map50"]) + 0.9 * float(result["map50_95"])


def format_table(result: Mapping[str, Any]) -> str:
    """A fixed-width per-class table of an ``evaluate_detections`` result, with an "all" row at the bottom.

    Columns: class, #gt (non-difficult), #difficult, #pred, AP50, AP50-95, VOC07 AP50; "-" where a class has
    no ground truth to score against.
    """

    def ap(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    per_class: Mapping[str, Mapping[str, Any]] = result["per_class"]
    count_keys = ("num_gt", "num_difficult", "num_pred")
    ap_keys = ("ap50", "ap50_95", "voc07_ap50")

    def cells(name: str, counts: Sequence[int], aps: Sequence[float | None]) -> list[str]:
        return [name, *(str(int(n)) for n in counts), *(ap(v) for v in aps)]

    titles = ["class", "#gt", "#difficult", "#pred", "AP50", "AP50-95", "VOC07 AP50"]
    table = [cells(n, [c[k] for k in count_keys], [c[k] for k in ap_keys]) for n, c in per_class.items()]
    totals = [sum(int(c[k]) for c in per_class.values()) for k in count_keys]
    all_row = cells("all", totals, [result["map50"], result["map50_95"], result["voc07_map50"]])
    widths = [max(len(row[i]) for row in [titles, *table, all_row]) for i in range(len(titles))]

    def line(row: list[str]) -> str:
        # Class names left-aligned, numbers right-aligned so that the decimal points line up.
        rest = (cell.rjust(width) for cell, width in zip(row[1:], widths[1:]))
        return "  ".join([row[0].ljust(widths[0]), *rest])

    rule = "-" * len(line(titles))
    return "\n".join([line(titles), rule, *(line(row) for row in table), rule, line(all_row)])
