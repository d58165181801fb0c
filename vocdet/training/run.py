"""``train(cfg)`` and ``evaluate(...)``: plain functions the CLI, notebooks and tests call (both through
``vocdet.training.trainer.build_trainer``), and the reports they write."""

from __future__ import annotations

import logging
import os
import pickle
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from vocdet import stopping
from vocdet.config import Config, load_config, run_yaml, to_dict
from vocdet.core.checkpoint import load_checkpoint
from vocdet.core.detections import read_detections, write_detections
from vocdet.core.files import staged_dir, write_json, write_text
from vocdet.core.metrics import HEADLINE, GroundTruth, Predictions, evaluate_detections, format_table
from vocdet.core.voc import VOC_CLASSES, class_list, layout, resolve_split, split_records
from vocdet.core.yolo import load_pretrained
from vocdet.data.datamodule import VOCDataModule
from vocdet.errors import TrainingStopped, VocdetError
from vocdet.training.module import DetectionModule, NonFiniteLoss
from vocdet.training.trainer import build_trainer, last_checkpoint, run_dir

log = logging.getLogger("vocdet")

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


def train(cfg: DictConfig, callbacks: list[Any] | None = None) -> Path:
    """Train, then evaluate the best checkpoint; writes ``<run>/metrics.json`` and returns the best checkpoint.
    ``callbacks``: Lightning callbacks added to vocdet's own (e.g. a pruning callback of ``vocdet tune``)."""
    if not cfg.data.synthesize or Path(cfg.data.root).exists():
        layout(cfg.data.root)  # fail before any logger starts: no folder, no VOC XML
    cfg = resolve_classes(resolve_run(cfg))
    launcher = _RUN_NAME_ENV not in os.environ
    os.environ[_RUN_NAME_ENV] = cfg.run.name
    try:
        return _train(cfg, callbacks)
    finally:
        if launcher:  # a notebook's next train() call picks its own directory again
            os.environ.pop(_RUN_NAME_ENV, None)


def resolve_classes(cfg: DictConfig) -> DictConfig:
    """``data.classes=auto`` becomes the sorted class names of the training split (printed, and stored in the run's
    config and checkpoint); ``voc`` and lists are checked and kept as they are."""
    setting = cfg.data.classes
    if setting != "auto":
        class_list(setting if isinstance(setting, str) else list(setting))  # one-line errors: duplicates, empties
        return cfg
    if cfg.data.synthesize and not Path(cfg.data.root).exists():
        names = list(VOC_CLASSES)  # the synthetic set is drawn with VOC's names
    else:
        d = cfg.data
        names = class_list(
            "auto", resolve_split(d.root, d.train_sets, "train", val_fraction=d.val_fraction, seed=cfg.run.seed)
        )
    if rank_zero_only.rank == 0:
        print(f"data.classes=auto: {len(names)} classes in the training split: {', '.join(names)}")
    return load_config(None, [], base={**to_dict(cfg), "data": {**to_dict(cfg)["data"], "classes": names}})


def _resume_point(cfg: DictConfig) -> tuple[Path | None, str | None, int]:
    """``(last.ckpt, W&B run id, its global step)`` to continue from with ``train.resume``; a missing, corrupt or mismatched
    checkpoint is a one-line error before anything starts."""
    if not cfg.train.resume:
        return None, None, 0
    last = last_checkpoint(run_dir(cfg))
    if not last.exists():
        raise VocdetError(
            f"nothing to resume: {last} does not exist (set run.name/run.dir to the run to continue, "
            "or train without --resume)"
        )
    ckpt = load_checkpoint(last)
    saved = ckpt["vocdet"]["config"]
    held = f"{saved['model'].get('arch', 'yolov8')}{saved['model']['variant']}"
    if held != f"{cfg.model.arch}{cfg.model.variant}":
        raise VocdetError(
            f"{last} holds a {held}, the config asks for {cfg.model.arch}{cfg.model.variant}: "
            "resume with the run's own config (its config.yaml)"
        )
    if list(ckpt["vocdet"]["class_names"]) != class_list(cfg.data.classes):
        raise VocdetError(
            f"{last} was trained for the classes {', '.join(ckpt['vocdet']['class_names'])}, the config gives "
            f"{', '.join(class_list(cfg.data.classes))}: resume with the run's own config (its config.yaml)"
        )
    return last, ckpt["vocdet"].get("wandb_id"), int(ckpt.get("global_step", 0))


def run_seed(seed: int, resumed_step: int = 0) -> int:
    """The seed of the random streams (shuffles, augmentation, dataloader workers) of a run that starts at
    ``resumed_step``: ``seed`` itself for a new run, a new stream derived from both for a resumed one. Seeding a
    resumed run with ``seed`` again would replay the shuffles and augmentations of its first epochs batch for batch
    (the persistent workers restart from the same seeds), so the model would see fewer distinct samples than an
    uninterrupted run (measured once, 12 epochs killed after 4 and resumed: mAP50 0.301 replayed, 0.324 with a new
    stream, 0.374 uninterrupted; seed-to-seed spread of that set-up sd 0.026)."""
    if resumed_step <= 0:
        return int(seed)
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(resumed_step)]).generate_state(1)[0])


def _train(cfg: DictConfig, callbacks: list[Any] | None = None) -> Path:
    out = run_dir(cfg)
    last = last_checkpoint(out)
    stopping.STATE.update(timeout_s=float(cfg.train.stop_timeout_s), checkpoint=last)
    resume_from, wandb_id, resumed_step = _resume_point(cfg)
    L.seed_everything(run_seed(cfg.run.seed, resumed_step), workers=True, verbose=False)
    if rank_zero_only.rank == 0:
        write_text(out / "config.yaml", run_yaml(cfg))
    module = DetectionModule(to_dict(cfg))
    datamodule = VOCDataModule(cfg.data, module.class_names, seed=cfg.run.seed, splits_dir=out / "splits")
    if cfg.model.weights:
        matched, total = load_pretrained(module.model, cfg.model.weights, module.class_names)
        if module.ema_model is not None:
            module.ema_model.load_state_dict(module.model.state_dict())
        log.info("transferred %d/%d tensors from %s", matched, total, cfg.model.weights)
    trainer = build_trainer(cfg, out, wandb_id=wandb_id, callbacks=callbacks)
    if resume_from is not None and rank_zero_only.rank == 0:
        log.info("resuming from %s", resume_from)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except NonFiniteLoss as e:
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved yet"
        raise NonFiniteLoss(f"{e}; {kept} (lower train.lr0 or check the data, then --resume)") from None
    except BaseException:
        if stopping.received() is None and not trainer.received_sigterm:
            raise
        raise stopped(stopping.received() or signal.SIGTERM, trainer) from None
    _stop_if_signalled(trainer)
    ckpt_cb = trainer.checkpoint_callback
    best = Path(ckpt_cb.best_model_path) if ckpt_cb and ckpt_cb.best_model_path else last
    stopping.pause_at("final-eval")
    _validate(trainer, module, datamodule, best, out)
    _stop_if_signalled(trainer)
    stopping.pause_at("reports")
    result = _module_report(module, datamodule, cfg, best, output=out / "metrics.json", plots=out / "plots")
    _write_profile(cfg, module, datamodule, {best, last})
    from vocdet.training.tracking import finish_run

    stopping.pause_at("wandb")
    finish_run(trainer, cfg, best, result)
    return best


@rank_zero_only
def _write_profile(cfg: DictConfig, module: DetectionModule, datamodule: VOCDataModule, checkpoints: set[Path]) -> None:
    """The drift reference profile (``vocdet.core.drift``) of the best model on the validation split, from the final
    validation's detections, stored in the run's checkpoints (``ckpt["vocdet"]["drift"]``)."""
    from vocdet.core.checkpoint import update_checkpoint_meta
    from vocdet.core.drift import evenly, profile_of

    if not cfg.drift.profile or datamodule.val_set is None or not module.last_predictions:
        return

    def detections(r: Any) -> tuple[Any, Any] | None:
        p = module.last_predictions.get(r.id)
        return None if p is None else _single_label(p)

    records = evenly(datamodule.val_set.records, cfg.drift.images)
    conf = float(cfg.predict.conf)
    profile = profile_of(records, detections, conf, module.class_names, f"validation split of {cfg.data.root}")
    if profile is None:
        return
    for path in checkpoints:
        if path.is_file():
            update_checkpoint_meta(path, drift=profile)
    log.info(
        "drift reference profile of %d validation images stored in %s",
        profile["images"],
        ", ".join(sorted(p.name for p in checkpoints)),
    )


def _single_label(p: Any) -> tuple[Any, Any]:
    """Validation's multi-label detections as the predictor's single-label ones: one (best) class per box."""
    import numpy as np

    if len(p.scores) == 0:
        return p.scores, p.labels
    order = np.argsort(-p.scores, kind="stable")
    _, first = np.unique(np.round(p.boxes[order], 3), axis=0, return_index=True)
    keep = order[np.sort(first)]
    return p.scores[keep], p.labels[keep]


def stopped(signum: int, trainer: L.Trainer | None = None) -> TrainingStopped:
    """The one line for a run stopped by ``signum``: where it stopped and whether ``--resume`` has anything."""
    where = f" at epoch {trainer.current_epoch}, global step {trainer.global_step}" if trainer is not None else ""
    return TrainingStopped(stopping.message(signum, where, training=True), signum)


def _stop_if_signalled(trainer: L.Trainer) -> None:
    """A signal recorded while Lightning's loop (or its validation) ran, that the loop did not act on."""
    if stopping.received() is not None:
        raise stopped(stopping.received(), trainer)


def _validate(trainer: L.Trainer, module: DetectionModule, datamodule: VOCDataModule, ckpt: Path, out: Path) -> None:
    """Score ``ckpt`` with ``trainer``. Under ddp_notebook/ddp_spawn the ranks are child processes, so rank 0
    hands its full result (metrics, detections, ground truth) back through a file; the notebook process never
    touches CUDA itself."""
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

    if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        trainer.validate(module, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False, weights_only=True)
        return
    handoff = out / "checkpoints" / ".validation.pkl"
    module.handoff = handoff
    try:
        trainer.validate(module, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False, weights_only=True)
        with handoff.open("rb") as f:
            module.last_metrics, module.last_predictions, module.last_ground_truth = pickle.load(f)
    finally:
        module.handoff = None
        handoff.unlink(missing_ok=True)
    if datamodule.val_set is None:  # set up in the children only
        datamodule.setup("validate")


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
    folder for the reports of ``vocdet.training.plots`` (PR curves, confusion matrix, per-class AP, prediction grid);
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
        # A split drawn at training (data without one of its own) is scored on the same images, on the same data.
        same_data = str(cfg.data.root) == str(ckpt["vocdet"]["config"]["data"]["root"])
        val_ids = ckpt["vocdet"].get("val_ids") if same_data else None
        datamodule = VOCDataModule(cfg.data, module.class_names, seed=cfg.run.seed, val_ids=val_ids)
        trainer.validate(module, datamodule=datamodule, verbose=False)
        stopping.check()  # a signal during validation: nothing is written
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
    d = cfg.data
    pairs = resolve_split(d.root, d.train_sets, "train", val_fraction=d.val_fraction, seed=cfg.run.seed)
    classes = class_list(cfg.data.classes, pairs if cfg.data.classes == "auto" else None)
    records = split_records(cfg.data, "val", classes, cfg.run.seed)
    gts = {r.id: GroundTruth(r.boxes, r.labels, r.difficult) for r in records}
    preds = read_detections(detections, set(gts), classes)  # type: ignore[arg-type]
    result = evaluate_detections(gts, preds, classes, curves=True)
    result["image_ids"] = sorted(gts)
    images = {r.id: r.image for r in records}
    return _report(result, gts, preds, images, classes, cfg, output=output, plots=plots, summary=summary)


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
        from vocdet.training.plots import write_plots

        with staged_dir(plots) as staging:  # an interrupted report leaves no half-written plots folder
            write_plots(result, gts, preds, images, class_names, staging, origin=cfg.data.box_origin)
    result.pop("pr_curve", None)  # in plots/pr_curve.csv; the metrics JSON stays a summary
    result["data_root"] = str(cfg.data.root)
    write_json(output, result)
    write_json(summary, {k: result[k] for k in (*HEADLINE, "num_images")})
    if predictions:
        write_detections(predictions, preds, class_names)
    print(format_table(result))
    return result


__all__ = ["evaluate", "resolve_run", "train"]
