"""``train(cfg)`` and ``evaluate(...)``: plain functions the CLI, notebooks and tests call; one ``build_trainer``."""

from __future__ import annotations

import json
import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from vocdet.config import Config, from_dict, load_config, save_config, to_dict
from vocdet.data import CLASS_INDEX, VOC_CLASSES, VOCDataModule, load_records, require_root, resolve_split
from vocdet.errors import TrainingStopped, VocdetError
from vocdet.metrics import HEADLINE, GroundTruth, Predictions, evaluate_detections, format_table
from vocdet.module import DetectionModule, NonFiniteLoss
from vocdet.yolo import load_pretrained

log = logging.getLogger("vocdet")

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
    if "precision" in trainer_kwargs:
        return str(trainer_kwargs.pop("precision"))
    accel = str(trainer_kwargs.get("accelerator", "auto"))
    cuda = torch.cuda.is_available() and accel in ("auto", "gpu", "cuda")
    # fp16 AMP with a GradScaler, as Ultralytics trains on CUDA. Not bf16: on the CPU, bf16 autocast trained models
    # 15-23 mAP50 points worse than fp32 in `make bench`; trainer.precision=bf16-mixed still selects it.
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
    kwargs.setdefault("log_every_n_steps", cfg.logging.log_every_n_steps)
    if evaluating:
        return L.Trainer(logger=False, enable_checkpointing=False, **kwargs)
    # One validation batch before training: catches a broken val set early and forks the (persistent) validation
    # workers while the process is still small.
    kwargs.setdefault("num_sanity_val_steps", 1)
    assert out_dir is not None
    kwargs.setdefault("max_epochs", cfg.train.epochs)
    kwargs.setdefault("check_val_every_n_epoch", cfg.train.val_every)
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
        from vocdet.tracking import ValidationImages, wandb_logger

        loggers.append(wandb_logger(cfg, out_dir, wandb_id))
        callbacks.append(ValidationImages(loggers[-1], cfg.logging.wandb_images))
    return L.Trainer(default_root_dir=str(out_dir), callbacks=callbacks, logger=loggers or False, **kwargs)


_RUN_NAME_ENV = "VOCDET_RUN_NAME"


def _holds_run(path: Path) -> bool:
    return (path / "metrics.json").exists() or any((path / "checkpoints").glob("*.ckpt"))


def resolve_run(cfg: DictConfig) -> DictConfig:
    """Never mix two runs in one directory: a taken ``run.name`` becomes ``<name>-2``, ``<name>-3``, ...

    The launcher decides and exports the name, so DDP processes that Lightning starts by re-running the command
    line write into the same directory instead of each picking the next free one.
    """
    name = os.environ.get(_RUN_NAME_ENV)
    if name is None:
        name = cfg.run.name
        if not cfg.run.exist_ok and not cfg.train.resume and _holds_run(run_dir(cfg)):
            n = 2
            while _holds_run(Path(cfg.run.dir) / f"{cfg.run.name}-{n}"):
                n += 1
            name = f"{cfg.run.name}-{n}"
            log.warning("%s already holds a run: writing to %s", run_dir(cfg), Path(cfg.run.dir) / name)
    if name == cfg.run.name:
        return cfg
    return load_config(None, [f"run.name={name}"], base=to_dict(cfg))


def train(cfg: DictConfig) -> Path:
    """Train, then evaluate the best checkpoint; writes ``<run>/metrics.json`` and returns the best checkpoint."""
    if not cfg.data.synthesize:
        require_root(cfg.data.root)  # fail before any logger starts
    cfg = resolve_run(cfg)
    launcher = _RUN_NAME_ENV not in os.environ
    os.environ[_RUN_NAME_ENV] = cfg.run.name
    try:
        return _train(cfg)
    finally:
        if launcher:  # a notebook's next train() call picks its own directory again
            os.environ.pop(_RUN_NAME_ENV, None)


def _resume_point(cfg: DictConfig) -> tuple[Path | None, str | None]:
    """``(last.ckpt, W&B run id)`` to continue from with ``train.resume``; a missing, corrupt or mismatched
    checkpoint is a one-line error before anything starts."""
    if not cfg.train.resume:
        return None, None
    last = last_checkpoint(run_dir(cfg))
    if not last.exists():
        raise VocdetError(
            f"nothing to resume: {last} does not exist (set run.name/run.dir to the run to continue, "
            "or train without --resume)"
        )
    ckpt = load_checkpoint(last)
    saved = ckpt["vocdet"]["config"]
    if saved["model"]["variant"] != cfg.model.variant:
        raise VocdetError(
            f"{last} holds a yolov8{saved['model']['variant']}, the config asks for yolov8{cfg.model.variant}: "
            "resume with the run's own config (its config.yaml)"
        )
    return last, ckpt["vocdet"].get("wandb_id")


def _train(cfg: DictConfig) -> Path:
    out = run_dir(cfg)
    resume_from, wandb_id = _resume_point(cfg)
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    if rank_zero_only.rank == 0:
        save_config(cfg, out / "config.yaml")
    datamodule = VOCDataModule(cfg.data)
    module = DetectionModule(to_dict(cfg))
    if cfg.model.weights:
        matched, total = load_pretrained(module.model, cfg.model.weights)
        if module.ema_model is not None:
            module.ema_model.load_state_dict(module.model.state_dict())
        log.info("transferred %d/%d tensors from %s", matched, total, cfg.model.weights)
    trainer = build_trainer(cfg, out, wandb_id=wandb_id)
    _sigterm_without_collectives(trainer)
    if resume_from is not None and rank_zero_only.rank == 0:
        log.info("resuming from %s", resume_from)
    last = last_checkpoint(out)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except NonFiniteLoss as e:
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved yet"
        raise NonFiniteLoss(f"{e}; {kept} (lower train.lr0 or check the data, then --resume)") from None
    except BaseException:
        if not trainer.received_sigterm:
            raise
        raise TrainingStopped(
            f"SIGTERM at epoch {trainer.current_epoch}, global step {trainer.global_step}; checkpoint saved to "
            f"{last}; continue with the same command plus --resume"
        ) from None
    ckpt_cb = trainer.checkpoint_callback
    best = Path(ckpt_cb.best_model_path) if ckpt_cb and ckpt_cb.best_model_path else last
    _validate(trainer, module, datamodule, best, out)
    result = _module_report(module, datamodule, cfg, best, output=out / "metrics.json", plots=out / "plots")
    from vocdet.tracking import finish_run

    finish_run(trainer, cfg, best, result)
    return best


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


def _validate(trainer: L.Trainer, module: DetectionModule, datamodule: VOCDataModule, ckpt: Path, out: Path) -> None:
    """Score ``ckpt`` with ``trainer``. Under ddp_notebook/ddp_spawn the ranks are child processes, so rank 0
    hands its full result (metrics, detections, ground truth) back through a file; the notebook process never
    touches CUDA itself."""
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

    if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        trainer.validate(module, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False)
        return
    handoff = out / "checkpoints" / ".validation.pkl"
    module.handoff = handoff
    try:
        trainer.validate(module, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False)
        with handoff.open("rb") as f:
            module.last_metrics, module.last_predictions, module.last_ground_truth = pickle.load(f)
    finally:
        module.handoff = None
        handoff.unlink(missing_ok=True)
    if datamodule.val_set is None:  # set up in the children only
        datamodule.setup("validate")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a vocdet checkpoint on the CPU; a missing, corrupt or foreign file is a one-line ``VocdetError``."""
    path = Path(path)
    if not path.is_file():
        raise VocdetError(f"checkpoint not found: {path}")
    try:
        # weights_only: a checkpoint never gets to run code while it is being read.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise VocdetError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or "vocdet" not in ckpt or "state_dict" not in ckpt:
        raise VocdetError(f"{path} is not a vocdet checkpoint (train one with `vocdet train`)")
    return ckpt


def evaluate(
    checkpoint: str | Path | None = None,
    *,
    config_files: list[str | Path] | None = None,
    overrides: list[str] | None = None,
    detections: str | Path | None = None,
    output: str | Path | None = None,
    predictions: str | Path | None = None,
    plots: str | Path | None = None,
    summary: str | Path | None = None,
) -> dict[str, Any]:
    """Score a checkpoint on the validation split (``data.val_sets``), or score a detections JSON file.

    With a checkpoint the config stored in it is the base and ``config_files``/``overrides`` apply on top
    (e.g. ``data.root=...``). Returns the metrics dict (also written to ``output`` when given); ``plots`` is a
    folder for the reports of ``vocdet.plots`` (PR curves, confusion matrix, per-class AP, prediction grid);
    ``summary`` a JSON file of just the headline numbers (what ``dvc metrics show`` tabulates).
    """
    if (checkpoint is None) == (detections is None):
        raise VocdetError("give exactly one of --checkpoint or --detections")
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        base = dict(ckpt["vocdet"]["config"])
        # How the model was trained (devices, DDP, max_epochs, ...) is not how to evaluate it: one device unless
        # the overrides say otherwise.
        base["trainer"] = Config().trainer
        cfg = load_config(config_files, overrides, base=base)
        module = DetectionModule(to_dict(cfg))
        module.load_state_dict(ckpt["state_dict"])
        trainer = build_trainer(cfg, None, evaluating=True)
        datamodule = VOCDataModule(cfg.data)
        trainer.validate(module, datamodule=datamodule, verbose=False)
        return _module_report(
            module,
            datamodule,
            cfg,
            Path(checkpoint),
            output=output,
            predictions=predictions,
            plots=plots,
            summary=summary,
        )
    cfg = load_config(config_files, overrides)
    records = load_records(resolve_split(cfg.data.root, cfg.data.val_sets, "val"), "val")
    gts = {r.id: GroundTruth(r.boxes, r.labels, r.difficult) for r in records}
    preds = read_detections(detections, set(gts))  # type: ignore[arg-type]
    result = evaluate_detections(gts, preds, list(VOC_CLASSES), curves=True)
    result["image_ids"] = sorted(gts)
    images = {r.id: r.image for r in records}
    return _report(result, gts, preds, images, list(VOC_CLASSES), cfg, output=output, plots=plots, summary=summary)


def _module_report(
    module: DetectionModule, datamodule: VOCDataModule, cfg: DictConfig, ckpt: Path, **outputs: Any
) -> dict[str, Any]:
    """``_report`` of the module's last validation."""
    images = {r.id: r.image for r in datamodule.val_set.records} if datamodule.val_set is not None else {}
    result = dict(module.last_metrics or {})
    result["checkpoint"] = str(ckpt)
    gts, preds = module.last_ground_truth, module.last_predictions
    return _report(result, gts, preds, images, module.class_names, cfg, **outputs)


@rank_zero_only
def _report(
    result: dict[str, Any],
    gts: dict[str, GroundTruth],
    preds: dict[str, Predictions],
    images: dict[str, str],
    class_names: list[str],
    cfg: DictConfig,
    *,
    output: str | Path | None = None,
    predictions: str | Path | None = None,
    plots: str | Path | None = None,
    summary: str | Path | None = None,
) -> dict[str, Any]:
    """Write the metrics JSON, the detections JSON and the plots that were asked for; print the table."""
    if plots and cfg.logging.plots and "pr_curve" in result:
        from vocdet.plots import write_plots

        write_plots(result, gts, preds, images, class_names, plots)
    result.pop("pr_curve", None)  # in plots/pr_curve.csv; the metrics JSON stays a summary
    result["data_root"] = str(cfg.data.root)
    _write_json(output, result)
    _write_json(summary, {k: result[k] for k in (*HEADLINE, "num_images")})
    if predictions:
        write_detections(predictions, preds, class_names)
    print(format_table(result))
    return result


def _write_json(path: str | Path | None, data: Any) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)  # never a half-written file


def write_detections(path: str | Path, preds: dict[str, Predictions], class_names: list[str]) -> None:
    """The detections JSON: ``[{"image_id", "class", "score", "bbox": [x1, y1, x2, y2]}]`` in XML pixels."""
    rows = [
        {"image_id": image_id, "class": class_names[int(c)], "score": float(s), "bbox": [float(v) for v in b]}
        for image_id in sorted(preds)
        for b, s, c in zip(preds[image_id].boxes, preds[image_id].scores, preds[image_id].labels)
    ]
    _write_json(path, rows)


def read_detections(path: str | Path, known_ids: set[str]) -> dict[str, Predictions]:
    """Parse a detections JSON file; malformed rows are a one-line error naming the row."""
    path = Path(path)
    if not path.is_file():
        raise VocdetError(f"detections file not found: {path}")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VocdetError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(rows, list):
        raise VocdetError(f"{path} must hold a JSON list of detections")
    grouped: dict[str, list[tuple[list[float], float, int]]] = {}
    unknown = set()
    for n, row in enumerate(rows):
        try:
            image_id, cls, score, bbox = str(row["image_id"]), row["class"], float(row["score"]), row["bbox"]
            box = [float(v) for v in bbox]
            if len(box) != 4:
                raise ValueError("bbox needs 4 numbers")
        except (KeyError, TypeError, ValueError) as e:
            raise VocdetError(
                f"{path}: detection #{n} is malformed ({e}); expected "
                '{"image_id": str, "class": str, "score": float, "bbox": [x1, y1, x2, y2]}'
            ) from None
        if cls not in CLASS_INDEX:
            raise VocdetError(
                f"{path}: detection #{n} has unknown class '{cls}' (VOC classes: {', '.join(VOC_CLASSES)})"
            )
        if image_id not in known_ids:
            unknown.add(image_id)
            continue
        grouped.setdefault(image_id, []).append((box, score, CLASS_INDEX[cls]))
    if unknown:
        log.warning("%d image ids in %s are not in the validation split and were ignored", len(unknown), path)
    return {
        k: Predictions(
            boxes=np.asarray([r[0] for r in v], np.float64).reshape(-1, 4),
            scores=np.asarray([r[1] for r in v], np.float64),
            labels=np.asarray([r[2] for r in v], np.int64),
        )
        for k, v in grouped.items()
    }


__all__ = ["build_trainer", "evaluate", "from_dict", "load_checkpoint", "run_dir", "train"]
