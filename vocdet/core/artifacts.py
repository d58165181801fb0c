"""Weights & Biases model artifacts: the best checkpoint at the end of training, and each export of it.

Offline by default (``logging.wandb_mode``; ``WANDB_MODE`` in the environment wins); ``wandb sync <run>/wandb``
uploads an offline run later. ``wandb`` is imported only when something is logged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger("vocdet")


def wandb_mode(cfg: DictConfig) -> str:
    """The mode in force; exported to ``WANDB_MODE`` so every process of the run (DDP ranks too) agrees."""
    mode = os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    return mode


def log_model_artifact(
    run: Any, path: Path, *, suffix: str = "", aliases: list[str], metadata: dict[str, Any] | None = None
) -> None:
    """``path`` as a version of the model artifact ``model-<run id><suffix>`` (W&B's name for checkpoints)."""
    import wandb

    art = wandb.Artifact(f"model-{run.id}{suffix}", type="model", metadata=metadata or {})
    art.add_file(str(path), name=path.name)
    run.log_artifact(art, aliases=aliases)


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
