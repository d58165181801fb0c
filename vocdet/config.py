"""The one config tree every subcommand reads.

The dataclasses below are the schema: every default and its one-line help live here, once. ``configs/default.yaml``
is generated from them (``vocdet config --defaults``, :func:`defaults_yaml`; a test keeps the file current).
``load_config`` merges, in order: the schema (or a checkpoint's saved config), each ``--config`` file, then dotted
overrides (``data.imgsz=320``). Unknown keys, wrong types and missing files become a
:class:`~vocdet.errors.VocdetError` naming the key and the closest valid ones.
"""

from __future__ import annotations

import difflib
import inspect
import textwrap
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from vocdet.errors import VocdetError

ARCHS = ("yolov8", "yolo11")
VARIANTS = ("n", "s", "m", "l", "x")
EXPORT_FORMATS = ("onnx", "torchscript", "ultralytics")
PROFILERS = ("simple", "advanced", "pytorch")
# train.precision: auto (vocdet decides, see TrainConfig.amp) or one of Lightning's precision names, passed as is.
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")


def opt(default: Any, help: str) -> Any:
    """A schema field with an immutable default and its one-line ``help`` (the key's comment in
    ``configs/default.yaml``). Lists, dicts and nested sections use ``field(default_factory=..., metadata=...)``."""
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Where a run writes: <dir>/<name>/ holds checkpoints/{best,last}.ckpt, config.yaml, metrics.json, csv/, plots/."""

    name: str = opt("voc", "outputs go to <dir>/<name>; a name already holding a run becomes <name>-2, <name>-3, ...")
    dir: str = opt("runs", "parent folder of all runs")
    seed: int = opt(0, "seeds Python, NumPy and torch, also in the dataloader workers (Lightning's seed_everything)")
    exist_ok: bool = opt(False, "true: write into <dir>/<name> even if a run is there (its checkpoints are replaced)")


@dataclass
class SynthConfig:
    """Synthetic VOC-format data generated when ``data.root`` does not exist yet (``data.synthesize``)."""

    images: int = opt(600, "number of images generated")
    val_fraction: float = opt(0.2, "share of the images in the val split (val.txt)")
    seed: int = opt(0, "random seed: same seed, same files")
    size: int = opt(256, "longest image side in pixels")


@dataclass
class DataConfig:
    """The dataset (a VOCdevkit or a flat VOC folder), the loaders, and Ultralytics' augmentation recipe
    (default.yaml of ultralytics 8.4)."""

    root: str = opt(
        "data/VOCdevkit",
        "VOCdevkit, flat VOC folder (Annotations/, JPEGImages/), or images with .xml beside them (+ train/ valid/)",
    )
    train_sets: list[str] = field(
        default_factory=lambda: ["2007/trainval", "2012/trainval"],
        metadata={"help": "VOCdevkit: <year>/<ImageSets/Main file>; flat roots use train.txt (or trainval.txt)"},
    )
    val_sets: list[str] = field(
        default_factory=lambda: ["2007/test"],
        metadata={"help": "as train_sets, for validation and `vocdet eval`; flat roots use val.txt (or test.txt)"},
    )
    classes: Any = field(
        default="voc",
        metadata={
            "help": "voc (20 VOC names), auto (sorted <name>s of the training split) or a list; the run stores its list"
        },
    )
    unknown_classes: str = opt("error", "objects whose class is not in data.classes: error (one line) or ignore")
    box_origin: int = opt(1, "1: the VOC devkit's 1-based corners (LabelImg, CVAT); 0: 0-based (Albumentations)")
    val_fraction: float = opt(
        0.2, "data without a split of its own: share held out for validation, by run.seed (0: none)"
    )
    imgsz: int = opt(640, "square training/validation size in pixels, a multiple of 32 (the network stride)")
    batch_size: int = opt(64, "global batch, split across devices")
    num_workers: int = opt(8, "dataloader workers per device")
    pin_memory: bool = opt(True, "page-locked batches for faster copies to the GPU (CUDA only)")
    cache: bool = opt(False, "keep decoded, resized images in RAM (decoded once, shared by the workers)")
    synthesize: bool = opt(False, "generate a synthetic VOC set at data.root when it does not exist (quickstart)")
    synth: SynthConfig = field(
        default_factory=SynthConfig, metadata={"help": "the synthetic set data.synthesize generates"}
    )
    mosaic: float = opt(1.0, "probability of a 4-image mosaic")
    close_mosaic: int = opt(10, "last N epochs without mosaic")
    degrees: float = opt(0.0, "random rotation (+/- degrees)")
    translate: float = opt(0.1, "random translation (+/- fraction of the image size)")
    scale: float = opt(0.5, "random scale (+/- gain)")
    shear: float = opt(0.0, "random shear (+/- degrees)")
    perspective: float = opt(0.0, "random perspective (+/- fraction, 0-0.001)")
    fliplr: float = opt(0.5, "probability of a left-right flip")
    flipud: float = opt(0.0, "probability of an up-down flip")
    hsv_h: float = opt(0.015, "HSV hue jitter (fraction)")
    hsv_s: float = opt(0.7, "HSV saturation jitter (fraction)")
    hsv_v: float = opt(0.4, "HSV value (brightness) jitter (fraction)")


@dataclass
class ModelConfig:
    """The network: a YOLOv8 or YOLO11 variant with a head for data.classes, optionally started from Ultralytics
    weights."""

    arch: str = opt("yolov8", "yolov8 or yolo11 (same DetectionModel and v8DetectionLoss)")
    variant: str = opt("n", "n, s, m, l or x (<arch><variant>.yaml, e.g. yolov8n, yolo11s)")
    weights: str | None = opt(
        None,
        "optional Ultralytics .pt to start from (shape-matched; class head kept only if its names match)",
    )


@dataclass
class TrainConfig:
    """Ultralytics' training recipe made explicit: optimiser, schedule, warmup, loss gains, EMA, precision."""

    epochs: int = opt(100, "training epochs (Lightning's max_epochs)")
    lr0: float = opt(0.01, "initial lr; SGD, groups: weights (decay), norm weights and biases (no decay)")
    lrf: float = opt(0.01, "final lr = lr0 * lrf, linear decay")
    momentum: float = opt(0.937, "SGD momentum")
    nesterov: bool = opt(True, "Nesterov momentum")
    weight_decay: float = opt(0.0005, "on weights only; scaled by batch_size * accumulate / nbs")
    nbs: int = opt(64, "nominal batch: gradients are accumulated up to it, weight decay scaled by it")
    warmup_epochs: float = opt(3.0, "warmup: bias lr warmup_bias_lr -> lr0, momentum warmup_momentum -> momentum")
    warmup_bias_lr: float = opt(0.1, "bias lr at the start of warmup")
    warmup_momentum: float = opt(0.8, "momentum at the start of warmup")
    box: float = opt(7.5, "box (CIoU) loss gain, as v8DetectionLoss")
    cls: float = opt(0.5, "classification (BCE) loss gain")
    dfl: float = opt(1.5, "distribution focal loss gain")
    ema: bool = opt(True, "validate and save an EMA of the weights")
    ema_decay: float = opt(0.9999, "EMA decay, ramped up as decay * (1 - exp(-updates / ema_tau))")
    ema_tau: float = opt(2000.0, "EMA ramp-up, in optimizer updates")
    grad_clip: float = opt(10.0, "max gradient norm (clipped after fp16 gradients are unscaled)")
    amp: bool = opt(True, "with precision auto: 16-mixed (fp16 + GradScaler, as Ultralytics) on CUDA, else 32-true")
    precision: str = opt("auto", "auto (see amp) or a Lightning precision as is: 32-true, 16-mixed, bf16-mixed, ...")
    val_every: int = opt(1, "validate every N epochs (and always after the last)")
    # On the CPU (oneDNN) NHWC trains faster but gave measurably worse models at the default recipe (README,
    # make bench-fidelity), so null means CUDA only.
    channels_last: bool | None = opt(
        None, "NHWC activations and weights; null = on CUDA only (on the CPU: ~20% faster, worse models)"
    )
    resume: bool = opt(False, "continue <run>/checkpoints/last.ckpt: weights, EMA, optimizer, epoch, step (--resume)")
    stop_timeout_s: float = opt(
        60.0, "after SIGTERM/SIGINT the run saves and exits; after this many seconds it exits whatever it is doing"
    )


# trainer.*: keyword arguments of lightning.Trainer. The built-in keys and their help:
TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "num_nodes": 1,
    "strategy": "auto",
    "sync_batchnorm": False,
    "profiler": None,
}
TRAINER_HELP: dict[str, str] = {
    "accelerator": "auto|cpu|gpu|cuda|mps",
    "devices": "devices per node (DDP when > 1)",
    "num_nodes": "number of nodes (multi-node DDP)",
    "strategy": "auto|ddp (CLI/torchrun/SLURM)|ddp_notebook (Jupyter, CPU or CUDA)",
    "sync_batchnorm": "BatchNorm statistics over all ranks (DDP, CUDA only)",
    "profiler": "null|simple|advanced|pytorch: report (and a Chrome trace for pytorch) in <run>/profile",
}
# Trainer arguments vocdet derives from its own keys: refused under trainer.* (one key, one place).
TRAINER_DERIVED: dict[str, str] = {
    "max_epochs": "train.epochs",
    "check_val_every_n_epoch": "train.val_every",
    "log_every_n_steps": "logging.log_every_n_steps",
    "precision": "train.precision",
}
TRAINER_SECTION_HELP = (
    "Keyword arguments of lightning.Trainer (checked against its signature; other arguments may be added). "
    "Refused here, vocdet derives them: " + ", ".join(f"{k} (from {v})" for k, v in TRAINER_DERIVED.items()) + "."
)


@dataclass
class EvalConfig:
    """Validation during training and `vocdet eval`: the low score threshold mAP needs, as Ultralytics' validator."""

    conf: float = opt(0.001, "score threshold (low: mAP integrates over all scores)")
    iou: float = opt(0.7, "NMS IoU threshold")
    max_det: int = opt(300, "detections kept per image")
    multi_label: bool = opt(True, "as Ultralytics' validator: one box may score for several classes")


@dataclass
class PredictConfig:
    """`Detector`, `vocdet predict` and `vocdet serve`: Ultralytics' predictor defaults."""

    conf: float = opt(0.25, "score threshold")
    iou: float = opt(0.7, "NMS IoU threshold")
    max_det: int = opt(300, "detections kept per image")
    batch_size: int = opt(8, "images per forward pass")
    device: str = opt("cpu", "cpu|cuda|cuda:N|mps (checkpoints)")
    half: bool = opt(False, "fp16 inference (CUDA only)")
    threads: int = opt(0, "ONNX Runtime intra-op threads (0: one per physical core)")
    ort_optimization: str = opt("all", "ONNX Runtime graph optimisation: all|extended|basic|disable")
    ort_execution_mode: str = opt("sequential", "ONNX Runtime: sequential|parallel (independent operators at once)")
    ort_mem_arena: bool = opt(True, "ONNX Runtime: CPU memory arena (reuses buffers between calls)")
    ort_mem_pattern: bool = opt(True, "ONNX Runtime: plan buffers from the first call's allocation pattern")
    ort_prepacking: bool = opt(True, "ONNX Runtime: pre-pack constant weights for the CPU kernels at load")
    ort_spinning: bool = opt(True, "ONNX Runtime: intra-op threads spin briefly for work before sleeping")


@dataclass
class ExportConfig:
    """`vocdet export`: the format, graph options, and the parity check of the export against PyTorch."""

    format: str = opt("onnx", "onnx|torchscript|ultralytics")
    output: str | None = opt(
        None, "default: next to the checkpoint, with the format's suffix (best.onnx, best.pt, ...)"
    )
    dynamic_batch: bool = opt(False, "ONNX: any batch size (else batch 1)")
    rect: bool = opt(True, "ONNX: any height/width, so images keep the minimal (rectangular) letterbox")
    nms: bool = opt(False, "ONNX: NMS inside the graph (thresholds from predict.*), outputs (N, 7) final boxes")
    half: bool = opt(False, "fp16 weights (needs export.device=cuda)")
    opset: int = opt(17, "ONNX opset version")
    device: str = opt("cpu", "where the model is exported and checked: cpu|cuda|cuda:N")
    parity_images: list[str] = field(
        default_factory=list,
        metadata={"help": "images the export is checked on against PyTorch; [] = 4 val images + bus.jpg, zidane.jpg"},
    )
    parity_conf: float = opt(0.05, "detections compared down to this score")
    parity_min_match: float = opt(0.99, "share of boxes that must agree (same class, IoU >= 0.99, |d score| <= 0.01)")
    int8: bool = opt(
        False, "ONNX: static int8 quantization (calibrated, head decoding in fp32), kept only if it passes"
    )
    calib_images: int = opt(200, "int8: calibration images, evenly spread over the training split (or calib_source)")
    calib_source: str | None = opt(
        None, "int8: a folder, glob or file of calibration images instead of the training split"
    )
    int8_val_images: int = opt(500, "int8: validation images the accuracy gate scores fp32 and int8 on")
    int8_max_map50_drop: float = opt(0.01, "int8: the largest mAP50 loss against fp32 that is kept (else exit 2)")


@dataclass
class ServeConfig:
    """`vocdet serve`: models by name, micro-batching, queue and upload limits, the admin API, graceful shutdown."""

    host: str = opt("127.0.0.1", "bind address")
    port: int = opt(8000, "TCP port")
    models: list[dict[str, str]] = field(
        default_factory=list,
        metadata={"help": "[{name: voc, path: best.onnx}] (.onnx, .ckpt, .torchscript); --onnx/--checkpoint add one"},
    )
    device: str = opt("cpu", "cpu|cuda|cuda:N, for checkpoints")
    max_batch_size: int = opt(8, "micro-batch size; 1 turns micro-batching off")
    max_wait_ms: float = opt(5.0, "how long the first request of a batch waits for others")
    max_queue: int = opt(64, "requests admitted per model (decoding, queued or running); beyond: 503 + Retry-After")
    decode_threads: int = opt(2, "threads that decode and letterbox uploads, off the event loop")
    max_upload_mb: float = opt(20.0, "request bodies above this: 413")
    max_pixels: int = opt(40_000_000, "images above this many pixels are refused from their header (413)")
    max_batch_images: int = opt(32, "images per POST /predict/batch")
    request_timeout_s: float = opt(30.0, "a request waiting longer for inference gets 503")
    admin_token: str | None = opt(None, "enables POST /models (Bearer); prefer the VOCDET_ADMIN_TOKEN env variable")
    admin_max_model_mb: float = opt(500.0, "largest model upload POST /models accepts (413 above)")
    model_dir: str | None = opt(None, "where uploaded models are stored; default: a temporary directory")
    graceful_timeout_s: float = opt(30.0, "on SIGTERM, in-flight requests get this long to finish; new ones get 503")
    drift: bool = opt(True, "compare served images and detections with the model's reference profile (GET /drift)")
    drift_window: int = opt(500, "drift: the last N images of each model are compared with its reference")
    drift_min_window: int = opt(100, "drift: no statistic before a model has served this many images")
    drift_interval_s: float = opt(10.0, "drift: seconds between two evaluations of a window (off the request path)")


@dataclass
class DriftConfig:
    """The reference profile a model carries (written at the end of training and by `vocdet export`) and the tests
    `vocdet serve` and `vocdet robustness` run against it."""

    profile: bool = opt(True, "compute the reference profile on the validation split (training end, export)")
    images: int = opt(500, "validation images the profile is computed on (at most, evenly spread)")
    alpha: float = opt(0.01, "chance that an in-distribution window raises any alarm (split over the features)")
    permutations: int = opt(2000, "permutations of the embedding's kernel test (at least 2 / its p-value threshold)")


@dataclass
class RobustnessConfig:
    """`vocdet robustness`: the validation split under ImageNet-C-style corruptions (deterministic, OpenCV/NumPy)."""

    corruptions: list[str] = field(
        default_factory=lambda: ["brightness", "contrast", "blur", "noise", "jpeg"],
        metadata={"help": "of brightness|dark|contrast|blur|noise|jpeg|saturate"},
    )
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5], metadata={"help": "each of 1..5"})
    images: int = opt(0, "validation images scored (0: all)")
    output: str | None = opt(None, "folder of robustness.json/.csv and the plot; default: <run of the checkpoint>")


@dataclass
class TuneConfig:
    """`vocdet tune`: an Optuna study over config keys; each trial is an ordinary run under runs/<study>/trial-<n>."""

    study: str = opt("tune", "study name: trials go to <run.dir>/<study>/trial-<n>")
    trials: int = opt(
        20, "trials the study should hold in the end (finished, pruned or failed); shared storage counts all"
    )
    storage: str | None = opt(None, "Optuna storage URL; default: sqlite:///<run.dir>/<study>/study.db")
    space: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "KEY: uniform:A:B|loguniform:A:B|int:A:B[:STEP]|choice:X:Y, e.g. train.lr0: loguniform:1e-4:1e-1"
        },
    )
    enqueue: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "parameter sets tried first when the study is new, e.g. [{train.lr0: 0.01}] (a baseline)"},
    )
    sampler: str = opt("tpe", "tpe|random")
    pruner: str = opt("median", "median|none: stop a trial whose epoch fitness is under the median of earlier ones")
    warmup_epochs: int = opt(1, "epochs a trial always runs before it may be pruned")
    startup_trials: int = opt(2, "trials that complete before pruning and TPE start")
    seed: int = opt(0, "the sampler's seed")
    heartbeat_s: int = opt(10, "a running trial's heartbeat; after 3 missed, another process fails and repeats it")


@dataclass
class LoggingConfig:
    """Loggers: W&B (offline unless configured online; the API key comes from `wandb login`, never a config), CSV,
    and the reports written after validation."""

    wandb: bool = opt(True, "log to Weights & Biases")
    wandb_project: str = opt("vocdet", "W&B project")
    wandb_mode: str = opt("offline", "offline|online|disabled; WANDB_MODE in the environment wins")
    wandb_group: str | None = opt(None, "W&B run group (vocdet tune sets it to the study name)")
    csv: bool = opt(True, "metrics as CSV in <run>/csv")
    log_every_n_steps: int = opt(10, "training metrics logged every N steps (Lightning's log_every_n_steps)")
    wandb_images: int = opt(16, "validation images logged with predicted and true boxes after each validation")
    wandb_artifacts: bool = opt(
        True, "the best checkpoint (training) and ONNX (`vocdet export`) as W&B model artifacts"
    )
    plots: bool = opt(True, "<run>/plots: PR curves, confusion matrix, per-class AP, a grid of validation predictions")


@dataclass
class DownloadConfig:
    """`vocdet data download`: where the VOC archives come from."""

    base_url: str = opt("http://host.robots.ox.ac.uk/pascal/VOC/", "the archives' paths are relative to this URL")
    archives: list[dict[str, str]] = field(
        default_factory=list,
        metadata={
            "help": "[{path: voc2007/VOCtrainval_06-Nov-2007.tar, md5: <hex>}]; [] = the three official archives"
        },
    )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: dict[str, Any] = field(
        default_factory=lambda: dict(TRAINER_DEFAULTS), metadata={"help": TRAINER_SECTION_HELP}
    )
    eval: EvalConfig = field(default_factory=EvalConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)


def _closest(key: str, node: Any) -> str:
    """' (did you mean: a, b?)' for an unknown dotted key, from the valid keys at the same level."""
    parent, _, leaf = key.rpartition(".")
    try:
        container = OmegaConf.select(node, parent) if parent else node
        valid = list(container.keys()) if isinstance(container, DictConfig) else []
    except OmegaConfBaseException:
        valid = []
    close = difflib.get_close_matches(leaf, [str(v) for v in valid], n=3, cutoff=0.5)
    shown = close or [str(v) for v in valid][:8]
    if not shown:
        return ""
    prefix = f"{parent}." if parent else ""
    label = "did you mean" if close else "valid keys"
    return f" ({label}: {', '.join(prefix + s for s in shown)})"


def _merge(base: DictConfig, other: DictConfig | dict, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise VocdetError(f"unknown config key '{key}' in {origin}{_closest(key, base)}") from None
    except ValidationError as e:
        key = e.full_key or str(e.key)
        raise VocdetError(f"invalid value for '{key}' in {origin}: {e.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise VocdetError(f"bad config in {origin}: {str(e).splitlines()[0]}") from None


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise VocdetError(f"override '{item}' is not KEY=VALUE (example: data.imgsz=320)")
    key, _, value = item.partition("=")
    key = key.strip()
    if not key:
        raise VocdetError(f"override '{item}' has an empty key (example: data.imgsz=320)")
    try:
        parsed = OmegaConf.from_dotlist([f"x={value}"]).x
    except OmegaConfBaseException:
        parsed = value
    return key, parsed


def load_config(
    files: list[str | Path] | tuple[str | Path, ...] | str | Path | None = None,
    overrides: list[str] | tuple[str, ...] | None = None,
    base: dict[str, Any] | None = None,
) -> DictConfig:
    """Build the typed, read-only config: schema defaults < ``base`` < each YAML file in order < dotted overrides."""
    cfg: DictConfig = OmegaConf.structured(Config)
    if base is not None:
        cfg = _merge(cfg, base, "checkpoint config")
    if isinstance(files, (str, Path)):
        files = [files]
    for f in files or []:
        path = Path(f)
        if not path.is_file():
            raise VocdetError(f"config file not found: {path} (see configs/ for the shipped ones)")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry their own line numbers
            raise VocdetError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, DictConfig):
            raise VocdetError(f"config file {path} must hold a mapping of sections, not a {type(loaded).__name__}")
        cfg = _merge(cfg, loaded, str(path))
    for item in overrides or []:
        key, value = _parse_override(item)
        nested: dict[str, Any] = {}
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        cfg = _merge(cfg, nested, f"override '{item}'")
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks OmegaConf's types cannot express: enums, ranges, and the Trainer's keyword arguments (those vocdet
    derives from its own keys are refused here; the rest are checked by ``validate_trainer`` only when they differ
    from the built-in section)."""
    if cfg.model.variant not in VARIANTS:
        raise VocdetError(f"model.variant must be one of {', '.join(VARIANTS)}, got '{cfg.model.variant}'")
    if cfg.data.imgsz < 32 or cfg.data.imgsz % 32:
        raise VocdetError(f"data.imgsz must be a positive multiple of 32 (the network stride), got {cfg.data.imgsz}")
    if cfg.data.batch_size < 1:
        raise VocdetError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    if cfg.model.arch not in ARCHS:
        raise VocdetError(f"model.arch must be one of {', '.join(ARCHS)}, got '{cfg.model.arch}'")
    check_classes(cfg.data.classes)
    if cfg.data.unknown_classes not in ("error", "ignore"):
        raise VocdetError(f"data.unknown_classes must be error or ignore, got '{cfg.data.unknown_classes}'")
    if cfg.data.box_origin not in (0, 1):
        raise VocdetError(
            f"data.box_origin must be 1 (the VOC devkit's 1-based corners) or 0 (0-based), got {cfg.data.box_origin}"
        )
    if not 0 <= cfg.data.val_fraction < 1:
        raise VocdetError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if not cfg.train.stop_timeout_s > 0:
        raise VocdetError(f"train.stop_timeout_s must be > 0 seconds, got {cfg.train.stop_timeout_s}")
    if cfg.train.epochs < 1:
        raise VocdetError(f"train.epochs must be >= 1, got {cfg.train.epochs}")
    if cfg.logging.wandb_mode not in ("offline", "online", "disabled"):
        raise VocdetError(f"logging.wandb_mode must be offline, online or disabled, got '{cfg.logging.wandb_mode}'")
    if cfg.export.format not in EXPORT_FORMATS:
        raise VocdetError(f"export.format must be one of {', '.join(EXPORT_FORMATS)}, got '{cfg.export.format}'")
    if not 0 <= cfg.predict.conf <= 1 or not 0 <= cfg.predict.iou <= 1:
        raise VocdetError("predict.conf and predict.iou must be between 0 and 1")
    for key, choices in (("ort_optimization", ORT_OPTIMIZATION), ("ort_execution_mode", ("sequential", "parallel"))):
        if cfg.predict[key] not in choices:
            raise VocdetError(f"predict.{key}={cfg.predict[key]!r} is not one of {'|'.join(choices)}")
    if cfg.predict.threads < 0:
        raise VocdetError("predict.threads must be >= 0 (0: one per physical core)")
    if cfg.serve.max_batch_size < 1 or cfg.serve.max_queue < 1 or cfg.serve.decode_threads < 1:
        raise VocdetError("serve.max_batch_size, serve.max_queue and serve.decode_threads must be >= 1")
    if cfg.model.weights and not Path(cfg.model.weights).is_file():
        raise VocdetError(f"model.weights file not found: {cfg.model.weights}")
    if cfg.train.precision not in PRECISIONS:
        raise VocdetError(f"train.precision must be one of {', '.join(PRECISIONS)}, got '{cfg.train.precision}'")
    for key in cfg.trainer:
        if key in TRAINER_DERIVED:  # here, not in validate_trainer: no Lightning import needed to refuse them
            use = TRAINER_DERIVED[key]
            raise VocdetError(f"trainer.{key} is set by vocdet from {use}; set {use} instead")
    if cfg.trainer.get("profiler") not in (None, *PROFILERS):
        raise VocdetError(
            f"trainer.profiler must be one of {', '.join(PROFILERS)} or null, got '{cfg.trainer.profiler}'"
        )
    if any(cfg.trainer.get(k, object()) != v for k, v in Config().trainer.items()) or set(cfg.trainer) - set(
        Config().trainer
    ):
        validate_trainer(cfg)


def check_classes(classes: Any) -> list[str] | None:
    """One-line errors for a bad ``data.classes``; returns the stripped list (None for voc/auto)."""
    if isinstance(classes, str):
        if classes not in ("voc", "auto"):
            raise VocdetError(
                f"data.classes must be voc, auto or a list of names, got '{classes}' (a list: data.classes=[a,b,c])"
            )
        return None
    if not isinstance(classes, (list, tuple, ListConfig)) or not classes:
        raise VocdetError(f"data.classes must be voc, auto or a non-empty list of names, got {classes!r}")
    names = [str(n).strip() for n in classes]
    if any(not n for n in names):
        raise VocdetError("data.classes has an empty class name; give each class a name")
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise VocdetError(
            f"data.classes lists {', '.join(repr(d) for d in dupes)} more than once; give each class once"
        )
    return names


def validate_trainer(cfg: DictConfig) -> None:
    """``trainer.*`` against ``lightning.Trainer``'s signature, when it differs from the built-in section. Only then
    is Lightning imported (and only where installed), so serving and ONNX inference never load it."""
    import importlib.util

    if importlib.util.find_spec("lightning") is None:
        return
    import lightning  # deferred: keeps `vocdet --help` and serving fast
    import torch

    if cfg.trainer.get("sync_batchnorm") and (cfg.trainer.get("accelerator") == "cpu" or not torch.cuda.is_available()):
        raise VocdetError(
            "trainer.sync_batchnorm needs CUDA (torch's SyncBatchNorm has no CPU implementation); "
            "drop --sync-batchnorm for CPU runs"
        )

    valid = set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}
    owned = {"callbacks", "logger", "default_root_dir", "enable_checkpointing"}  # vocdet builds these
    for key in cfg.trainer:
        if key in owned:
            raise VocdetError(f"trainer.{key} is set by vocdet itself; use the run.* / logging.* keys instead")
        if key not in valid:
            close = difflib.get_close_matches(str(key), sorted(valid), n=3, cutoff=0.5)
            hint = f" (did you mean: {', '.join('trainer.' + c for c in close)})" if close else ""
            raise VocdetError(f"unknown config key 'trainer.{key}': not a lightning.Trainer argument{hint}")


# The sections a trained model carries (its checkpoint, the run's config.yaml, the W&B run config): never
# ``serve`` (the admin token), ``logging`` or ``download`` (settings of the machine, not of the model).
ORT_OPTIMIZATION = ("all", "extended", "basic", "disable")
RUN_SECTIONS = ("run", "data", "model", "train", "trainer", "eval", "predict", "export", "drift")


def run_sections(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The ``RUN_SECTIONS`` of ``cfg`` as plain, resolved containers."""
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return {k: data[k] for k in RUN_SECTIONS if k in data}


def to_dict(cfg: DictConfig | ListConfig) -> dict[str, Any]:
    """Plain, resolved containers (for checkpoints, loggers and JSON)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(data: dict[str, Any]) -> DictConfig:
    """Rebuild a typed config from a checkpoint's plain dict (keys the schema no longer has are an error)."""
    cfg = _merge(OmegaConf.structured(Config), data, "checkpoint config")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def run_yaml(cfg: DictConfig) -> str:
    """A run's ``config.yaml``: its ``RUN_SECTIONS`` (``vocdet train --config`` of it repeats the run)."""
    return OmegaConf.to_yaml(OmegaConf.create(run_sections(cfg)))


def schema_help() -> dict[str, str]:
    """Every key of the schema, dotted (sections and ``data.synth`` included), with its one-line help: a section's
    is its class docstring, a field's its ``opt`` help, ``trainer.*``'s from ``TRAINER_HELP``."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in fields(node):
            value = getattr(node, f.name)
            help_ = f.metadata.get("help", "")
            if is_dataclass(value):
                out[prefix + f.name] = help_ or " ".join(inspect.getdoc(value).split())
                walk(value, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = help_

    walk(Config(), "")
    out.update({f"trainer.{k}": TRAINER_HELP[k] for k in TRAINER_DEFAULTS})
    return out


_COMMENT_COLUMN = 24  # trailing comments start here (or two spaces after a longer line)
_WIDTH = 120  # a trailing comment that would go past this goes on its own line above the key


def _yaml_scalar(value: Any) -> str:
    """``value`` as one line of YAML (flow style for lists and mappings), read back as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False, allow_unicode=True)
    return text.strip().removesuffix("\n...").strip()


def _render(node: dict[str, Any], prefix: str, depth: int, helps: dict[str, str], lines: list[str]) -> None:
    indent = "  " * depth
    for key, value in node.items():
        help_ = helps.get(prefix + str(key), "")
        block = isinstance(value, dict) and bool(value)
        if depth == 0:  # a section: blank line, its help as a comment header
            if lines:
                lines.append("")
            lines += ["# " + line for line in textwrap.wrap(help_, _WIDTH - 2)]
            help_ = ""
        text = f"{indent}{key}:" + ("" if block else f" {_yaml_scalar(value)}")
        if help_:
            trailing = f"{text.ljust(_COMMENT_COLUMN - 1)} # {help_}" if len(text) < _COMMENT_COLUMN - 1 else ""
            trailing = trailing or f"{text}  # {help_}"
            if len(trailing) <= _WIDTH:
                lines.append(trailing)
            else:
                lines += [f"{indent}# {help_}", text]
        else:
            lines.append(text)
        if block:
            _render(value, f"{prefix}{key}.", depth + 1, helps, lines)


def to_yaml(cfg: DictConfig | dict[str, Any]) -> str:
    """A config tree as YAML with each known key's help as a comment, each section headed by its help."""
    lines: list[str] = []
    _render(cfg if isinstance(cfg, dict) else to_dict(cfg), "", 0, schema_help(), lines)
    return "\n".join(lines) + "\n"


DEFAULTS_HEADER = """\
# vocdet's built-in defaults, the reference VOC run: VOC07+12 trainval -> VOC07 test, yolov8n at 640, 100 epochs.
# GENERATED from the schema in vocdet/config.py (values and help) by `vocdet config --defaults > configs/default.yaml`:
# edit the schema, not this file (tests/test_config.py fails when they differ). An overlay only needs the keys it
# changes (--config); `vocdet config [--config F] [KEY=VALUE ...]` prints the tree a command would get.
"""


def defaults_yaml() -> str:
    """The full default tree as commented YAML: exactly what ``configs/default.yaml`` holds."""
    return DEFAULTS_HEADER + "\n" + to_yaml(OmegaConf.to_container(OmegaConf.structured(Config)))
