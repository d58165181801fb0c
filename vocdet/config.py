"""The one config tree every subcommand reads.

The dataclasses below are the schema and hold every default; they *are* the reference VOC run, which
``configs/default.yaml`` spells out (a test keeps the two equal). ``load_config`` merges, in order: the schema
(or a checkpoint's saved config), each ``--config`` file, then dotted overrides (``data.imgsz=320``). Unknown
keys, wrong types and missing files become a :class:`~vocdet.errors.VocdetError` naming the key and the closest
valid ones.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from vocdet.errors import VocdetError

VARIANTS = ("n", "s", "m", "l", "x")
EXPORT_FORMATS = ("onnx", "torchscript", "ultralytics")
PROFILERS = ("simple", "advanced", "pytorch")


@dataclass
class RunConfig:
    name: str = "voc"  # outputs go to <dir>/<name>; a name already holding a run becomes <name>-2, <name>-3, ...
    dir: str = "runs"
    seed: int = 0
    exist_ok: bool = False  # true: write into <dir>/<name> even if a run is there (its checkpoints are replaced)


@dataclass
class SynthConfig:
    """Synthetic VOC-format data generated when ``data.root`` does not exist yet (``data.synthesize``)."""

    images: int = 600
    val_fraction: float = 0.2
    seed: int = 0
    size: int = 256  # longest image side in pixels


@dataclass
class DataConfig:
    root: str = "data/VOCdevkit"
    # VOCdevkit roots: "<year>/<imageset>" entries; flat roots use "train"/"val" split files.
    train_sets: list[str] = field(default_factory=lambda: ["2007/trainval", "2012/trainval"])
    val_sets: list[str] = field(default_factory=lambda: ["2007/test"])
    imgsz: int = 640
    batch_size: int = 64  # global: split across devices
    num_workers: int = 8
    pin_memory: bool = True
    cache: bool = False  # keep decoded, resized images in RAM (decoded once, shared by the workers)
    synthesize: bool = False  # generate a synthetic VOC set at root if it is missing
    synth: SynthConfig = field(default_factory=SynthConfig)
    # Ultralytics' augmentation recipe (default.yaml of ultralytics 8.4)
    mosaic: float = 1.0
    close_mosaic: int = 10  # epochs at the end without mosaic
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    perspective: float = 0.0
    fliplr: float = 0.5
    flipud: float = 0.0
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4


@dataclass
class ModelConfig:
    variant: str = "n"  # yolov8{n,s,m,l,x}
    weights: str | None = None  # optional Ultralytics .pt to start from (shape-matched transfer)


@dataclass
class TrainConfig:
    epochs: int = 100
    lr0: float = 0.01
    lrf: float = 0.01  # final lr = lr0 * lrf, linear decay
    momentum: float = 0.937
    nesterov: bool = True
    weight_decay: float = 0.0005
    nbs: int = 64  # nominal batch: gradients are accumulated up to it, weight decay scaled by it
    warmup_epochs: float = 3.0
    warmup_bias_lr: float = 0.1
    warmup_momentum: float = 0.8
    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5
    ema: bool = True
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0
    grad_clip: float = 10.0
    amp: bool = True  # fp16 mixed precision (GradScaler) on CUDA, as Ultralytics; bf16: trainer.precision=bf16-mixed
    val_every: int = 1  # validate every N epochs (and always after the last)
    # NHWC activations and weights; null = on CUDA only (tensor cores). On the CPU (oneDNN) NHWC trains ~20% faster
    # but measurably worse models at the default recipe (README, make bench-fidelity), so it is off there.
    channels_last: bool | None = None
    resume: bool = False  # continue <run.dir>/<run.name>/checkpoints/last.ckpt (weights, EMA, optimizer, epoch, step)


@dataclass
class EvalConfig:
    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 300
    multi_label: bool = True  # as Ultralytics' validator: one box may score for several classes


@dataclass
class PredictConfig:
    # Ultralytics' predictor defaults; eval.* holds the low threshold that mAP needs.
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    batch_size: int = 8
    device: str = "cpu"  # cpu|cuda|cuda:N|mps
    half: bool = False  # fp16 inference (CUDA only)


@dataclass
class ExportConfig:
    format: str = "onnx"  # onnx|torchscript|ultralytics
    output: str | None = None  # default: next to the checkpoint, with the format's suffix
    dynamic_batch: bool = False  # ONNX: any batch size (else batch 1)
    rect: bool = True  # ONNX: any height/width, so images keep the minimal (rectangular) letterbox
    nms: bool = False  # ONNX: NMS inside the graph (thresholds from predict.*), outputs final boxes
    half: bool = False  # fp16 weights (needs export.device=cuda)
    opset: int = 17
    device: str = "cpu"
    # Images the exported model is checked on against PyTorch; empty = Ultralytics' bus.jpg and zidane.jpg.
    parity_images: list[str] = field(default_factory=list)
    parity_conf: float = 0.05  # detections compared down to this score
    parity_min_match: float = 0.99  # share of boxes that must agree (class, IoU >= 0.99, |d score| <= 0.01)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Models served by name: [{name: voc, path: runs/quickstart/checkpoints/best.onnx}] (.onnx, .ckpt, .torchscript)
    models: list[dict[str, str]] = field(default_factory=list)
    device: str = "cpu"  # for checkpoints
    max_batch_size: int = 8  # 1 turns micro-batching off
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_queue: int = 64  # requests admitted per model (decoding, queued or running); beyond: 503 + Retry-After
    decode_threads: int = 2  # threads that decode and letterbox uploads, off the event loop
    max_upload_mb: float = 20.0  # request bodies above this: 413
    max_pixels: int = 40_000_000  # images above this many pixels are refused from their header (413)
    max_batch_images: int = 32  # images per POST /predict/batch
    request_timeout_s: float = 30.0  # a request waiting longer for inference gets 503
    admin_token: str | None = None  # enables POST /models (Bearer); prefer the VOCDET_ADMIN_TOKEN env variable
    admin_max_model_mb: float = 500.0
    model_dir: str | None = None  # where uploaded models are stored; default: a temporary directory
    graceful_timeout_s: float = 30.0  # SIGTERM: time in-flight requests get to finish


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "vocdet"
    wandb_mode: str = "offline"  # offline|online|disabled; WANDB_MODE in the environment wins
    csv: bool = True
    log_every_n_steps: int = 10
    wandb_images: int = 16  # validation images logged with predicted and true boxes after each validation
    wandb_artifacts: bool = True  # the best checkpoint (training) and ONNX (`vocdet export`) as W&B model artifacts
    plots: bool = True  # <run>/plots: PR curves, confusion matrix, per-class AP, a grid of validation predictions


@dataclass
class DownloadConfig:
    base_url: str = "http://host.robots.ox.ac.uk/pascal/VOC/"
    # [{path: <relative to base_url>, md5: <hex>}]; empty = the three official VOC archives
    archives: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Passed as keyword arguments to lightning.Trainer (validated against its signature).
    trainer: dict[str, Any] = field(
        default_factory=lambda: {
            "accelerator": "auto",
            "devices": 1,
            "num_nodes": 1,
            "strategy": "auto",
            "sync_batchnorm": False,
            "profiler": None,
        }
    )
    eval: EvalConfig = field(default_factory=EvalConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
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
    """Checks OmegaConf's types cannot express: enums, ranges, and the Trainer's keyword arguments."""
    if cfg.model.variant not in VARIANTS:
        raise VocdetError(f"model.variant must be one of {', '.join(VARIANTS)}, got '{cfg.model.variant}'")
    if cfg.data.imgsz < 32 or cfg.data.imgsz % 32:
        raise VocdetError(f"data.imgsz must be a positive multiple of 32 (the network stride), got {cfg.data.imgsz}")
    if cfg.data.batch_size < 1:
        raise VocdetError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    if cfg.train.epochs < 1:
        raise VocdetError(f"train.epochs must be >= 1, got {cfg.train.epochs}")
    if cfg.logging.wandb_mode not in ("offline", "online", "disabled"):
        raise VocdetError(f"logging.wandb_mode must be offline, online or disabled, got '{cfg.logging.wandb_mode}'")
    if cfg.export.format not in EXPORT_FORMATS:
        raise VocdetError(f"export.format must be one of {', '.join(EXPORT_FORMATS)}, got '{cfg.export.format}'")
    if not 0 <= cfg.predict.conf <= 1 or not 0 <= cfg.predict.iou <= 1:
        raise VocdetError("predict.conf and predict.iou must be between 0 and 1")
    if cfg.serve.max_batch_size < 1 or cfg.serve.max_queue < 1 or cfg.serve.decode_threads < 1:
        raise VocdetError("serve.max_batch_size, serve.max_queue and serve.decode_threads must be >= 1")
    if cfg.model.weights and not Path(cfg.model.weights).is_file():
        raise VocdetError(f"model.weights file not found: {cfg.model.weights}")
    if cfg.trainer.get("profiler") not in (None, *PROFILERS):
        raise VocdetError(
            f"trainer.profiler must be one of {', '.join(PROFILERS)} or null, got '{cfg.trainer.profiler}'"
        )
    if any(cfg.trainer.get(k, object()) != v for k, v in Config().trainer.items()) or set(cfg.trainer) - set(
        Config().trainer
    ):
        validate_trainer(cfg)


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
RUN_SECTIONS = ("run", "data", "model", "train", "trainer", "eval", "predict", "export")


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


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """A run's ``config.yaml``: its ``RUN_SECTIONS`` (``vocdet train --config`` of it repeats the run)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(run_sections(cfg)), path)
