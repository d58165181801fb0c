"""The ``lightning.Trainer`` vocdet trains and evaluates with: precision, profiler, checkpoints (best, last, on a
stop signal; written atomically), CSV and W&B loggers; and the run-directory layout they write into."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from vocdet import stopping
from vocdet.config import to_dict
from vocdet.core.files import atomic_open

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


class _CheckpointOnStop(L.Callback):
    """A stop signal (SIGTERM from a scheduler before preemption, SIGINT/Ctrl-C) ends the run at a training-batch
    boundary with ``last.ckpt`` where the run stands.

    The signal is only recorded where it lands (``vocdet.stopping``); at the end of each training batch the ranks
    agree (an all-reduce of "has any rank been signalled") and all of them then raise Lightning's
    ``SIGTERMException`` at that same batch, so no rank waits in a collective the others left. The checkpoint holds
    the loop position, so ``--resume`` continues mid-epoch. A signal during validation takes effect after it.
    """

    def __init__(self, path: Path):
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        stop = stopping.received() is not None
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(stop)], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException after this batch

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A loader worker that was still starting when the process group was signalled can die of it (before its
        # init ignores SIGTERM); that surfaces as a failed batch fetch, between two steps: save there too.
        worker_died = stopping.received() is not None and "DataLoader worker" in str(exception)
        if isinstance(exception, SIGTERMException) or trainer.received_sigterm or worker_died:
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state, for --resume


class _PhaseMarkers(L.Callback):
    """``VOCDET_PAUSE_AT`` points inside the training loop (see ``vocdet.stopping.pause_at``)."""

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stopping.pause_at("sanity")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stopping.pause_at("workers")  # the training loader's workers start right after this hook

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        stopping.pause_at("step")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            stopping.pause_at("validation")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the same folder, fsynced, then renamed over the old one: a kill
    while writing leaves the previous ``last.ckpt`` whole. Remote (fsspec URL) paths keep Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_open(path, "wb") as f:
            torch.save(checkpoint, f)
            # test hooks (VOCDET_PAUSE_AT): a signal or a kill while a checkpoint is being written
            stopping.pause_at("checkpoint-write")
            stopping.pause_at(f"checkpoint-write:{Path(path).name}")


def _stop_without_collectives(trainer: L.Trainer) -> None:
    """Lightning's SIGTERM handler broadcasts from inside the signal handler: ranks signalled together enter that
    broadcast from wherever they were interrupted and the job hangs. Here the handler only records the signal
    and forwards it to the processes Lightning started; ``_CheckpointOnStop`` acts on it at a batch boundary."""
    connector = trainer._signal_connector

    def kill(signum: int) -> None:
        launcher = trainer.strategy.launcher
        if launcher is not None:
            launcher.kill(signum)

    def notify(signum: int, frame: Any) -> None:
        if stopping.record(signum):
            kill(signum)

    connector._sigterm_notifier_fn = notify  # type: ignore[method-assign]
    stopping.STATE["kill_children"] = kill


def build_trainer(
    cfg: DictConfig,
    out_dir: Path | None,
    *,
    evaluating: bool = False,
    wandb_id: str | None = None,
    callbacks: list[Any] | None = None,
) -> L.Trainer:
    """A ``lightning.Trainer`` from ``cfg.trainer`` plus vocdet's callbacks and loggers.

    Training gets ``best.ckpt`` (max fitness) and ``last.ckpt`` under ``<run>/checkpoints`` (also written on
    SIGTERM), a CSV logger and (unless ``logging.wandb=false``) W&B, offline unless configured online;
    ``wandb_id`` continues an existing W&B run (``--resume``); ``callbacks`` are added to vocdet's.
    """
    kwargs = dict(to_dict(cfg.trainer))
    kwargs["precision"] = _precision(cfg, kwargs)
    kwargs["profiler"] = _profiler(kwargs.get("profiler"), out_dir)
    kwargs["log_every_n_steps"] = cfg.logging.log_every_n_steps
    if evaluating:
        trainer = L.Trainer(logger=False, enable_checkpointing=False, **kwargs)
        _stop_without_collectives(trainer)
        return trainer
    # One validation batch before training: catches a broken val set early and forks the (persistent) validation
    # workers while the process is still small.
    kwargs.setdefault("num_sanity_val_steps", 1)
    assert out_dir is not None
    kwargs["max_epochs"] = cfg.train.epochs
    kwargs["check_val_every_n_epoch"] = cfg.train.val_every
    callbacks = [
        *(callbacks or []),
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
        _CheckpointOnStop(last_checkpoint(out_dir)),
    ]
    if os.environ.get("VOCDET_PAUSE_AT"):
        callbacks.append(_PhaseMarkers())
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
    trainer = L.Trainer(
        default_root_dir=str(out_dir),
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )
    _stop_without_collectives(trainer)
    return trainer
