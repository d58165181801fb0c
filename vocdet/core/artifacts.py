"""Weights & Biases model artifacts: the best checkpoint at the end of training, and each export of it.

Offline by default (``logging.wandb_mode``; ``WANDB_MODE`` in the environment wins); ``wandb sync <run>/wandb``
uploads an offline run later. ``wandb`` is imported only when something is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
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


@contextlib.contextmanager
def _training_run(checkpoint: Path, cfg: DictConfig, wandb_id: str | None, artifacts: bool) -> Iterator[Any]:
    """The W&B run that trained ``checkpoint``, resumed (None when it was not tracked or is not in its run folder)."""
    run_dir = checkpoint.resolve().parent.parent
    mode = wandb_mode(cfg) if cfg.logging.wandb else "disabled"
    if not wandb_id or mode == "disabled" or (artifacts and not cfg.logging.wandb_artifacts):
        yield None
        return
    if not (run_dir / "wandb").is_dir():
        yield None
        return
    import wandb

    run = wandb.init(
        project=cfg.logging.wandb_project, id=wandb_id, resume="allow", dir=str(run_dir), mode=mode, reinit=True
    )
    try:
        yield run
    finally:
        run.finish()


def log_export(checkpoint: Path, exported: Path, cfg: DictConfig, wandb_id: str | None, meta: dict[str, Any]) -> None:
    """Add an export to the W&B run that trained ``checkpoint`` (when it was tracked and lives in its run folder)."""
    with _training_run(checkpoint, cfg, wandb_id, artifacts=True) as run:
        if run is None:
            return
        fmt = str(meta.get("format", "export"))
        log_model_artifact(run, exported, suffix=f"-{fmt}", aliases=["latest"], metadata=meta)
    log.info("logged %s to W&B run %s (%s)", exported.name, wandb_id, wandb_mode(cfg))


def log_robustness(
    checkpoint: Path, cfg: DictConfig, wandb_id: str | None, rows: list[dict[str, Any]], plot: Path
) -> bool:
    """The robustness table and plot in the W&B run that trained ``checkpoint``; True when logged."""
    with _training_run(checkpoint, cfg, wandb_id, artifacts=False) as run:
        if run is None:
            return False
        import wandb

        keys = list(dict.fromkeys(k for r in rows for k in r))
        table = wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows])
        run.log({"robustness/table": table, "robustness/plot": wandb.Image(str(plot))})
    log.info("logged the robustness report to W&B run %s (%s)", wandb_id, wandb_mode(cfg))
    return True
