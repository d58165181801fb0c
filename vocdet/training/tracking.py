"""Weights & Biases during training: the logger, validation images with boxes, and the end-of-run summary.

The API key comes from ``wandb login`` or ``WANDB_API_KEY``, never from a config; modes and artifacts are in
``vocdet.core.artifacts``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import DictConfig

from vocdet.config import run_sections
from vocdet.core.artifacts import log_model_artifact, wandb_mode

log = logging.getLogger("vocdet")

IMAGE_SIDE = 320  # longest side of the logged validation images


def wandb_logger(cfg: DictConfig, out_dir: Path, run_id: str | None = None) -> Any:
    """Lightning's ``WandbLogger`` for a run in ``out_dir/wandb``; ``run_id`` continues that run (``--resume``)."""
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(cfg)
    logger = WandbLogger(
        project=cfg.logging.wandb_project,
        name=cfg.run.name,
        group=cfg.logging.wandb_group,
        save_dir=str(out_dir),
        offline=mode == "offline",
        config=run_sections(cfg),
        id=run_id,
        resume="allow" if run_id else None,
    )
    logger._wandb_init.pop("anonymous", None)  # Lightning always passes it; wandb warns it is obsolete
    return logger


def boxes_payload(
    boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray | None, names: list[str], scale: float
) -> dict[str, Any]:
    """W&B's bounding-box format in pixels of the logged (resized) image."""
    rows = []
    for i, (b, c) in enumerate(zip(boxes, labels)):
        x1, y1, x2, y2 = (float(v) * scale for v in b)
        row: dict[str, Any] = {
            "position": {"minX": x1, "minY": y1, "maxX": x2, "maxY": y2},
            "domain": "pixel",
            "class_id": int(c),
            "box_caption": names[int(c)] if scores is None else f"{names[int(c)]} {float(scores[i]):.2f}",
        }
        if scores is not None:
            row["scores"] = {"score": float(scores[i])}
        rows.append(row)
    return {"box_data": rows, "class_labels": dict(enumerate(names))}


class ValidationImages(L.Callback):
    """After each validation, log the first ``n`` validation images (sorted ids) with predicted boxes (above
    the plotting threshold) and true boxes as ``val/predictions``; rank 0 only."""

    def __init__(self, logger: Any, n: int):
        self.logger, self.n = logger, n

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.n <= 0 or not pl_module.last_metrics:
            return
        import cv2
        import wandb

        from vocdet.core.images import read_image
        from vocdet.training.plots import displayed, image_pixels

        records = {r.id: r for r in trainer.datamodule.val_set.records}
        names = pl_module.class_names
        images = []
        for image_id in sorted(records)[: self.n]:
            img = read_image(records[image_id].image)
            scale = min(IMAGE_SIDE / max(img.shape[:2]), 1.0)
            if scale < 1:
                size = (round(img.shape[1] * scale), round(img.shape[0] * scale))
                img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            gt = pl_module.last_ground_truth.get(image_id)
            pred = pl_module.last_predictions.get(image_id)
            boxes = {}
            if pred is not None:
                shown = displayed(pred, pl_module.cfg.data.box_origin)
                boxes["predictions"] = boxes_payload(shown.boxes, shown.labels, shown.scores, names, scale)
            if gt is not None:
                boxes["ground_truth"] = boxes_payload(
                    image_pixels(gt.boxes, pl_module.cfg.data.box_origin), gt.labels, None, names, scale
                )
            images.append(wandb.Image(img, boxes=boxes, caption=image_id))
        self.logger.experiment.log({"val/predictions": images, "trainer/global_step": trainer.global_step})


def finish_run(trainer: L.Trainer, cfg: DictConfig, best: Path, result: dict[str, Any] | None) -> None:
    """End of training: the final metrics into the run summary, the best checkpoint as a model artifact, then
    close the run (so a notebook's next ``train()`` starts its own). Rank 0; nothing without a W&B logger."""
    from lightning.pytorch.loggers import WandbLogger

    from vocdet.core.metrics import HEADLINE

    logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    if logger is None or not trainer.is_global_zero:
        return
    run = logger.experiment
    final = {k: result[k] for k in HEADLINE} if result else {}
    run.summary.update({f"final/{k}": v for k, v in final.items()})
    if cfg.logging.wandb_artifacts:
        log_model_artifact(run, best, aliases=["best", "latest"], metadata=final)
    run.finish()


__all__ = [
    "ValidationImages",
    "boxes_payload",
    "finish_run",
    "wandb_logger",
]
