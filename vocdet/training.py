"""``train(cfg)`` and ``evaluate(...)``: plain functions the CLI, notebooks and tests call; one ``build_trainer``."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from vocdet.config import Config, from_dict, load_config, save_config, to_dict
from vocdet.data import CLASS_INDEX, VOC_CLASSES, VOCDataModule, load_records, require_root, resolve_split
from vocdet.errors import VocdetError
from vocdet.metrics import GroundTruth, Predictions, evaluate_detections, format_table
from vocdet.module import DetectionModule
from vocdet.yolo import load_pretrained

log = logging.getLogger("vocdet")

# The EMA copy is deliberately in eval mode; Lightning's notice about it (and its own pytree deprecation) is noise.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run.dir) / cfg.run.name


def _precision(cfg: DictConfig, trainer_kwargs: dict[str, Any]) -> str:
    if "precision" in trainer_kwargs:
        return str(trainer_kwargs.pop("precision"))
    accel = str(trainer_kwargs.get("accelerator", "auto"))
    cuda = torch.cuda.is_available() and accel in ("auto", "gpu", "cuda")
    if cfg.train.amp and cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def build_trainer(cfg: DictConfig, out_dir: Path | None, *, evaluating: bool = False) -> L.Trainer:
    """A ``lightning.Trainer`` from ``cfg.trainer`` plus vocdet's callbacks and loggers.

    Training gets ``best.ckpt`` (max fitness) and ``last.ckpt`` under ``<run>/checkpoints``, a CSV logger and
    (unless ``logging.wandb=false``) W&B, offline unless configured online.
    """
    kwargs = dict(to_dict(cfg.trainer))
    kwargs["precision"] = _precision(cfg, kwargs)
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
            save_last=True,
            auto_insert_metric_name=False,
            enable_version_counter=False,  # best.ckpt stays best.ckpt (a second run never shares the directory)
        )
    ]
    loggers: list[Any] = []
    if cfg.logging.csv:
        from lightning.pytorch.loggers import CSVLogger

        loggers.append(CSVLogger(out_dir, name="", version="csv"))
    if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        # The environment wins so a user can go online without editing configs; never a key in code or config.
        mode = os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb_logger = WandbLogger(
            project=cfg.logging.wandb_project,
            name=cfg.run.name,
            save_dir=str(out_dir),
            offline=mode == "offline",
            config=to_dict(cfg),
        )
        wandb_logger._wandb_init.pop("anonymous", None)  # Lightning always passes it; wandb warns it is obsolete
        loggers.append(wandb_logger)
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
        if not cfg.run.exist_ok and _holds_run(run_dir(cfg)):
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


def _train(cfg: DictConfig) -> Path:
    out = run_dir(cfg)
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
    trainer = build_trainer(cfg, out)
    trainer.fit(module, datamodule=datamodule)
    ckpt_cb = trainer.checkpoint_callback
    best = Path(ckpt_cb.best_model_path) if ckpt_cb and ckpt_cb.best_model_path else out / "checkpoints" / "last.ckpt"
    trainer.validate(module, datamodule=datamodule, ckpt_path=str(best), verbose=False)
    _report(module, cfg, out / "metrics.json", None, best)
    return best


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
) -> dict[str, Any]:
    """Score a checkpoint on the validation split (``data.val_sets``), or score a detections JSON file.

    With a checkpoint the config stored in it is the base and ``config_files``/``overrides`` apply on top
    (e.g. ``data.root=...``). Returns the metrics dict (also written to ``output`` when given).
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
        trainer.validate(module, datamodule=VOCDataModule(cfg.data), verbose=False)
        return _report(module, cfg, output, predictions, Path(checkpoint))
    cfg = load_config(config_files, overrides)
    records = load_records(resolve_split(cfg.data.root, cfg.data.val_sets, "val"), "val")
    gts = {r.id: GroundTruth(r.boxes, r.labels, r.difficult) for r in records}
    preds = read_detections(detections, set(gts))  # type: ignore[arg-type]
    result = evaluate_detections(gts, preds, list(VOC_CLASSES))
    result["image_ids"] = sorted(gts)
    result["data_root"] = str(cfg.data.root)
    _write_json(output, result)
    print(format_table(result))
    return result


@rank_zero_only
def _report(
    module: DetectionModule, cfg: DictConfig, output: str | Path | None, predictions: str | Path | None, ckpt: Path
) -> dict[str, Any]:
    result = dict(module.last_metrics or {})
    result["data_root"] = str(cfg.data.root)
    result["checkpoint"] = str(ckpt)
    _write_json(output, result)
    if predictions:
        write_detections(predictions, module.last_predictions, module.class_names)
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
