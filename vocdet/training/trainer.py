"""The ``lightning.Trainer`` vocdet trains and evaluates with: precision, profiler, checkpoints (best, last, on
SIGTERM), CSV and W&B loggers; and the run-directory layout they write into."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from vocdet.config import to_dict

# The EMA copy is deliberately in eval mode; Lightning's notice about it (and its own pytree deprecation) is noise.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# After a mid-epoch (SIGTERM) checkpoint the rest of that epoch draws a fresh shuffle; `resuming from` says where.
warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run.dir) / cfg.run.name


def last_checkpoint(out: Path) -> Path:
    """``<run>/checkpoints/last.ckpt``: written after every validation and on SIGTERM; what --resume reads."""
    return out / "checkpoints" / "last.ckpt"


def _precision(cfg: DictConfig, trainer_kwargs: dict[str, Any]) -> str:
    """Lightning's precision: ``train.precision`` as is, or for ``auto`` 16-mixed on CUDA with ``train.amp``."""
    if cfg.train.precision != "auto":
        return str(cfg.train.precision)
    accel = str(trainer_kwargs.get("accelerator", "auto"))
    cuda = torch.cuda.is_available() and accel in ("auto", "gpu", "cuda")
    # fp16 AMP with a GradScaler, as Ultralytics trains on CUDA. Not bf16: on the CPU, bf16 autocast trained models
    # 15-23 mAP50 points worse than fp32 in `make bench`; train.precision=bf16-mixed still selects it.
    return "16-mixed" if cfg.train.amp and cuda else "32-true"


def _profiler(name: Any, out_dir: Path | None) -> Any:
    """``trainer.profiler=simple|advanced|pytorch`` writing its report (and the PyTorch trace) to ``<run>/profile``."""
    if name is None or out_dir is None:
        return name
    from lightning.pytorch import profilers

    cls = {"simple": profilers.SimpleProfiler, "advanced": profilers.AdvancedProfiler}.get(name)
    if cls is not None:
        return cls(dirpath=out_dir / "profile", filename="profile")
    return profilers.PyTorchProfiler(dirpath=out_dir / "profile", filename="profile", export_to_chrome=True)


class _CheckpointOnSigterm(L.Callback):
    """On SIGTERM (what a cluster scheduler sends before preemption) save ``last.ckpt`` where the run stands.

    Lightning turns the signal into a ``SIGTERMException`` at the next batch boundary on every rank; the
    checkpoint holds the loop position, so ``--resume`` continues mid-epoch.
    """

    def __init__(self, path: Path):
        self.path = path

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) or trainer.received_sigterm:
            trainer.save_checkpoint(self.path)


def build_trainer(
    cfg: DictConfig, out_dir: Path | None, *, evaluating: bool = False, wandb_id: str | None = None
) -> L.Trainer:
    """A ``lightning.Trainer`` from ``cfg.trainer`` plus vocdet's callbacks and loggers.

    Training gets ``best.ckpt`` (max fitness) and ``last.ckpt`` under ``<run>/checkpoints`` (also written on
    SIGTERM), a CSV logger and (unless ``logging.wandb=false``) W&B, offline unless configured online;
    ``wandb_id`` continues an existing W&B run (``--resume``).
    """
    kwargs = dict(to_dict(cfg.trainer))
    kwargs["precision"] = _precision(cfg, kwargs)
    kwargs["profiler"] = _profiler(kwargs.get("profiler"), out_dir)
    kwargs["log_every_n_steps"] = cfg.logging.log_every_n_steps
    if evaluating:
        return L.Trainer(logger=False, enable_checkpointing=False, **kwargs)
    # One validation batch before training: catches a broken val set early and forks the (persistent) validation
    # workers while the process is still small.
    kwargs.setdefault("num_sanity_val_steps", 1)
    assert out_dir is not None
    kwargs["max_epochs"] = cfg.train.epochs
    kwargs["check_val_every_n_epoch"] = cfg.train.val_every
    callbacks = [
        ModelCheckpoint(
            dirpath=out_dir / "checkpoints",
            filename="best",
            monitor="fitness",
            mode="max",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,  # best.ckpt stays best.ckpt (a second run never shares the directory)
        ),
        # last.ckpt after every validation, for --resume. (ModelCheckpoint's own save_last only refreshes it when
        # a new best was saved, since Lightning 2.6: it would lag behind the run.)
        ModelCheckpoint(
            dirpath=out_dir / "checkpoints",
            filename="last",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        _CheckpointOnSigterm(last_checkpoint(out_dir)),
    ]
    loggers: list[Any] = []
    if cfg.logging.csv:
        from lightning.pytorch.loggers import CSVLogger

        # Lightning's CSV writer deletes an existing metrics.csv: a resumed run writes csv-resumed-<n>/ instead.
        version, n = "csv", 1
        while cfg.train.resume and (out_dir / version).exists():
            version, n = f"csv-resumed-{n}", n + 1
        loggers.append(CSVLogger(out_dir, name="", version=version))
    if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
        from vocdet.training.tracking import ValidationImages, wandb_logger

        loggers.append(wandb_logger(cfg, out_dir, wandb_id))
        callbacks.append(ValidationImages(loggers[-1], cfg.logging.wandb_images))
    return L.Trainer(default_root_dir=str(out_dir), callbacks=callbacks, logger=loggers or False, **kwargs)


def _sigterm_without_collectives(trainer: L.Trainer) -> None:
    """Lightning's SIGTERM handler broadcasts from inside the signal handler. When every rank is signalled (a
    scheduler signalling the job, or the process group), the ranks enter that broadcast from wherever they were
    interrupted and the job hangs. The handler here only records the signal (and forwards it to the processes
    Lightning started); the training loop already broadcasts rank 0's flag at each batch boundary, where every
    rank agrees."""
    connector = trainer._signal_connector

    def notify(signum: int, frame: Any) -> None:
        launcher = trainer.strategy.launcher
        if not connector.received_sigterm and launcher is not None:
            launcher.kill(signum)
        connector.received_sigterm = True

    connector._sigterm_notifier_fn = notify  # type: ignore[method-assign]
