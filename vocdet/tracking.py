"""Weights & Biases: the logger, validation images with boxes, and model artifacts.

Offline by default (``logging.wandb_mode``; ``WANDB_MODE`` in the environment wins); ``wandb sync <run>/wandb``
uploads an offline run later. The API key comes from ``wandb login`` or ``WANDB_API_KEY``, never from a config.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import DictConfig

from vocdet.config import to_dict

log = logging.getLogger("vocdet")

IMAGE_SIDE = 320  # longest side of the logged validation images


def wandb_mode(cfg: DictConfig) -> str:
    """The mode in force; exported to ``WANDB_MODE`` so every process of the run (DDP ranks too) agrees."""
    mode = os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    return mode


def wandb_logger(cfg: DictConfig, out_dir: Path, run_id: str | None = None) -> Any:
    """Lightning's ``WandbLogger`` for a run in ``out_dir/wandb``; ``run_id`` continues that run (``--resume``)."""
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(cfg)
    logger = WandbLogger(
        project=cfg.logging.wandb_project,
        name=cfg.run.name,
        save_dir=str(out_dir),
        offline=mode == "offline",
        config=to_dict(cfg),
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

        from vocdet.detector import read_image
        from vocdet.plots import displayed, image_pixels

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
                shown = displayed(pred)
                boxes["predictions"] = boxes_payload(shown.boxes, shown.labels, shown.scores, names, scale)
            if gt is not None:
                boxes["ground_truth"] = boxes_payload(image_pixels(gt.boxes), gt.labels, None, names, scale)
            images.append(wandb.Image(img, boxes=boxes, caption=image_id))
        self.logger.experiment.log({"val/predictions": images, "trainer/global_step": trainer.global_step})


def log_model_artifact(
    run: Any, path: Path, *, suffix: str = "", aliases: list[str], metadata: dict[str, Any] | None = None
) -> None:
    """``path`` as a version of the model artifact ``model-<run id><suffix>`` (W&B's name for checkpoints)."""
    import wandb

    art = wandb.Artifact(f"model-{run.id}{suffix}", type="model", metadata=metadata or {})
    art.add_file(str(path), name=path.name)
    run.log_artifact(art, aliases=aliases)


def finish_run(trainer: L.Trainer, cfg: DictConfig, best: Path, result: dict[str, Any] | None) -> None:
    """End of training: the final metrics into the run summary, the best checkpoint as a model artifact, then
    close the run (so a notebook's next ``train()`` starts its own). Rank 0; nothing without a W&B logger."""
    from lightning.pytorch.loggers import WandbLogger

    from vocdet.metrics import HEADLINE

    logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    if logger is None or not trainer.is_global_zero:
        return
    run = logger.experiment
    final = {k: result[k] for k in HEADLINE} if result else {}
    run.summary.update({f"final/{k}": v for k, v in final.items()})
    if cfg.logging.wandb_artifacts:
        log_model_artifact(run, best, aliases=["best", "latest"], metadata=final)
    run.finish()


def log_export(checkpoint: Path, exported: Path, cfg: DictConfig, wandb_id: str | None, meta: dict[str, Any]) -> None:
    """Add an export to the W&B run that trained ``checkpoint`` (when it was tracked and lives in its run folder)."""
    run_dir = checkpoint.resolve().parent.parent
    if not wandb_id or not cfg.logging.wandb or not cfg.logging.wandb_artifacts or not (run_dir / "wandb").is_dir():
        return
    import wandb

    mode = wandb_mode(cfg)
    if mode == "disabled":
        return
    run = wandb.init(
        project=cfg.logging.wandb_project, id=wandb_id, resume="allow", dir=str(run_dir), mode=mode, reinit=True
    )
    try:
        fmt = str(meta.get("format", "export"))
        log_model_artifact(run, exported, suffix=f"-{fmt}", aliases=["latest"], metadata=meta)
    finally:
        run.finish()
    log.info("logged %s to W&B run %s (%s)", exported.name, wandb_id, mode)


__all__ = [
    "ValidationImages",
    "boxes_payload",
    "finish_run",
    "log_export",
    "log_model_artifact",
    "wandb_logger",
    "wandb_mode",
]
