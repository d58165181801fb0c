"""Evaluation reports in ``<run>/plots``: PR curves, confusion matrix, per-class AP, a grid of predictions.

``write_plots`` is called after training and by ``vocdet eval``. ``pr_curve.csv`` (class, recall, precision)
is the data behind ``pr_curve.png`` and what ``dvc plots show`` draws. The confusion matrix is Ultralytics'
own (``ultralytics.utils.metrics.ConfusionMatrix``: greedy class-agnostic matching at IoU 0.45, detections
above conf 0.25), fed with the same detections the metrics score, VOC ``difficult`` objects left out.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vocdet.core.metrics import GroundTruth, Predictions

log = logging.getLogger("vocdet")

GRID_IMAGES = 16
GRID_TILE = 320
PLOT_CONF = 0.25  # detections drawn and counted in the confusion matrix (Ultralytics' plotting threshold)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def write_pr_curve(pr: Mapping[str, Any], result: Mapping[str, Any], out: Path) -> list[Path]:
    """``pr_curve.csv`` and ``pr_curve.png``: precision over recall at IoU 0.5 per class, and the class mean."""
    recall = np.asarray(pr["recall"])
    curves = {k: np.asarray(v) for k, v in pr["precision"].items() if v is not None}
    with (out / "pr_curve.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "recall", "precision"])
        for name, prec in curves.items():
            w.writerows([name, f"{r:.2f}", f"{p:.6f}"] for r, p in zip(recall, prec))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    colours = plt.get_cmap("tab20")
    for i, (name, prec) in enumerate(curves.items()):
        ap = result["per_class"][name]["ap50"]
        ax.plot(recall, prec, linewidth=1, color=colours(i % 20), label=f"{name} {ap:.3f}")
    if curves:
        mean = np.mean(np.stack(list(curves.values())), axis=0)
        ax.plot(recall, mean, linewidth=3, color="blue", label=f"all classes {result['map50']:.3f} mAP@0.5")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-Recall (IoU 0.5)")
    ax.grid(alpha=0.3)
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pr_curve.png")
    plt.close(fig)
    return [out / "pr_curve.csv", out / "pr_curve.png"]


def write_per_class_ap(result: Mapping[str, Any], out: Path) -> Path:
    """Horizontal bars of AP50 and AP50-95 per class, best first (classes without ground truth left out)."""
    rows = [(n, c["ap50"], c["ap50_95"]) for n, c in result["per_class"].items() if c["ap50"] is not None]
    rows.sort(key=lambda r: r[1])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(rows), 4) + 1.2), dpi=120)
    y = np.arange(len(rows))
    ax.barh(y + 0.2, [r[1] for r in rows], height=0.4, label="AP50", color="#1f77b4")
    ax.barh(y - 0.2, [r[2] for r in rows], height=0.4, label="AP50-95", color="#ff7f0e")
    for yi, r in zip(y, rows):
        ax.text(r[1] + 0.01, yi + 0.2, f"{r[1]:.3f}", va="center", fontsize=7)
    ax.set_yticks(y, [r[0] for r in rows])
    ax.set(xlim=(0, 1.1), xlabel="AP")
    ax.set_title(f"Per-class AP (mAP50 {result['map50']:.3f})", pad=22)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out / "per_class_ap.png")
    plt.close(fig)
    return out / "per_class_ap.png"


def write_confusion_matrix(
    gts: Mapping[str, GroundTruth], preds: Mapping[str, Predictions], class_names: Sequence[str], out: Path
) -> Path:
    import torch
    from ultralytics.utils.metrics import ConfusionMatrix

    cm = ConfusionMatrix(names=dict(enumerate(class_names)), task="detect")
    empty = Predictions(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    for image_id, gt in gts.items():
        p = preds.get(image_id, empty)
        keep = ~np.asarray(gt.difficult, bool)
        cm.process_batch(
            {
                "bboxes": torch.as_tensor(np.asarray(p.boxes, np.float32)).reshape(-1, 4),
                "conf": torch.as_tensor(np.asarray(p.scores, np.float32)),
                "cls": torch.as_tensor(np.asarray(p.labels, np.float32)),
            },
            {
                "bboxes": torch.as_tensor(np.asarray(gt.boxes, np.float32)[keep]).reshape(-1, 4),
                "cls": torch.as_tensor(np.asarray(gt.labels, np.float32)[keep]),
            },
            conf=PLOT_CONF,
        )
    _pyplot()
    cm.plot(normalize=True, save_dir=out)
    path = out / "confusion_matrix_normalized.png"
    if not path.exists():  # the file name is Ultralytics' choice; keep ours stable
        raise FileNotFoundError(path)
    return path.rename(out / "confusion_matrix.png")


def image_pixels(boxes: np.ndarray, origin: int = 1) -> np.ndarray:
    """(N, 4) boxes in the dataset's XML corners (``data.box_origin``) -> continuous image pixels, as images are
    drawn."""
    from vocdet.core.voc import box_offset

    return np.asarray(boxes, np.float32).reshape(-1, 4) - box_offset(origin)


def displayed(pred: Predictions | None, origin: int = 1) -> Predictions:
    """The predictions reports show (the plots here, W&B's validation images): score >= ``PLOT_CONF``, boxes in
    image pixels."""
    if pred is None:
        return Predictions(np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0, np.int64))
    keep = np.asarray(pred.scores) >= PLOT_CONF
    boxes = image_pixels(pred.boxes, origin)[keep]
    return Predictions(boxes, np.asarray(pred.scores)[keep], np.asarray(pred.labels)[keep])


def draw_ground_truth_and_predictions(
    image: np.ndarray,
    gt: GroundTruth | None,
    pred: Predictions | None,
    class_names: Sequence[str],
    origin: int = 1,
) -> Image.Image:
    """RGB image with true boxes (white, thin) under the predictions above ``PLOT_CONF`` (class colours, labelled)."""
    from vocdet.core.detections import Detection
    from vocdet.core.draw import plot

    shown = displayed(pred, origin)
    dets = [
        Detection(tuple(map(float, b)), float(s), int(c), class_names[int(c)])  # type: ignore[arg-type]
        for b, s, c in zip(shown.boxes, shown.scores, shown.labels)
    ]
    canvas = Image.fromarray(image)
    if gt is not None:
        draw = ImageDraw.Draw(canvas)
        lw = max(round(sum(canvas.size) / 2 * 0.002), 1)
        for x1, y1, x2, y2 in image_pixels(gt.boxes, origin).tolist():
            draw.rectangle((x1 - lw, y1 - lw, x2 + lw, y2 + lw), outline=(255, 255, 255), width=lw)
    return plot(canvas, dets)


def write_prediction_grid(
    images: Mapping[str, str],
    gts: Mapping[str, GroundTruth],
    preds: Mapping[str, Predictions],
    class_names: Sequence[str],
    out: Path,
    n: int = GRID_IMAGES,
    origin: int = 1,
) -> Path:
    """A 4-wide grid of the first ``n`` validation images (sorted ids): true boxes white, predictions coloured."""
    from vocdet.core.images import read_image

    ids = sorted(images)[:n]
    cols = min(4, max(len(ids), 1))
    rows = max((len(ids) + cols - 1) // cols, 1)
    grid = Image.new("RGB", (cols * GRID_TILE, rows * GRID_TILE), (114, 114, 114))
    for i, image_id in enumerate(ids):
        tile = draw_ground_truth_and_predictions(
            read_image(images[image_id]), gts.get(image_id), preds.get(image_id), class_names, origin
        )
        tile.thumbnail((GRID_TILE - 4, GRID_TILE - 4))
        x, y = (i % cols) * GRID_TILE, (i // cols) * GRID_TILE
        grid.paste(tile, (x + (GRID_TILE - tile.width) // 2, y + (GRID_TILE - tile.height) // 2))
        ImageDraw.Draw(grid).text((x + 4, y + 2), image_id, fill=(255, 255, 0))
    grid.save(out / "val_predictions.jpg", quality=90)
    return out / "val_predictions.jpg"


def write_plots(
    result: Mapping[str, Any],
    gts: Mapping[str, GroundTruth],
    preds: Mapping[str, Predictions],
    images: Mapping[str, str],
    class_names: Sequence[str],
    out: str | Path,
    origin: int = 1,
) -> list[Path]:
    """Every report into ``out``; returns the files written. ``result`` is ``evaluate_detections(..., curves=True)``;
    boxes are in the dataset's corners (``data.box_origin``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [*write_pr_curve(result["pr_curve"], result, out), write_per_class_ap(result, out)]
    written.append(write_confusion_matrix(gts, preds, class_names, out))
    written.append(write_prediction_grid(images, gts, preds, class_names, out, origin=origin))
    log.info("plots: %s", out)
    return written


__all__ = ["draw_ground_truth_and_predictions", "write_plots"]
