"""Ultralytics' YOLOv8 pieces vocdet builds on: network, loss, pretrained transfer, Ultralytics-format checkpoints.

Importing it configures Ultralytics to stay offline and out of the home directory."""

from __future__ import annotations

import os
import re
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from vocdet.config import ARCHS
from vocdet.errors import VocdetError

# Ultralytics must neither download nor pip-install at run time, nor write into the home directory.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_VERBOSE", "0")
if "YOLO_CONFIG_DIR" not in os.environ:
    _cfg_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vocdet" / "ultralytics"
    _cfg_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_CONFIG_DIR"] = str(_cfg_dir)

_threads = torch.get_num_threads()
from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils.loss import v8DetectionLoss  # noqa: E402

# Importing ultralytics can leave torch on one thread (measured 1.7x slower on CPU): restore it.
torch.set_num_threads(_threads)


def model_name(arch: str, variant: str) -> str:
    """``yolov8n``, ``yolo11s``, ...: Ultralytics' name of a model yaml (one-line error for an unknown one)."""
    if arch not in ARCHS or variant not in ("n", "s", "m", "l", "x"):
        raise VocdetError(
            f"model.arch={arch} model.variant={variant}: arch is one of {', '.join(ARCHS)}, variant n|s|m|l|x"
        )
    return f"{arch}{variant}"


def build_model(variant: str = "n", num_classes: int = 20, arch: str = "yolov8") -> DetectionModel:
    """A freshly initialised ``DetectionModel`` from ``<arch><variant>.yaml`` with ``num_classes`` outputs."""
    return DetectionModel(f"{model_name(arch, variant)}.yaml", nc=num_classes, verbose=False)


def load_pretrained(model: nn.Module, weights: str | Path, class_names: list[str] | None = None) -> tuple[int, int]:
    """Copy every shape-matching tensor of an Ultralytics ``.pt`` into ``model``; returns (matched, total).

    An 80-class COCO checkpoint transfers everything but the class-logit convolutions, which keep their fresh
    initialisation for ``len(class_names)`` classes; those transfer only when the checkpoint's class names are
    ``class_names`` (same count but other names: re-initialised, as a head for other classes must be).
    """
    try:
        # Ultralytics checkpoints pickle the whole model object, so weights_only=False is required here;
        # only load files you trust (the same rule Ultralytics applies).
        ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    except Exception as e:
        raise VocdetError(f"cannot read model.weights {weights}: {type(e).__name__}: {e}") from None
    src = ckpt
    if isinstance(ckpt, dict):
        src = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if src is None:
        raise VocdetError(f"model.weights {weights} is not an Ultralytics checkpoint (no 'model' or 'ema' entry)")
    src_sd = src.float().state_dict() if isinstance(src, nn.Module) else dict(src)
    dst_sd = model.state_dict()
    matched = {k: v for k, v in src_sd.items() if k in dst_sd and v.shape == dst_sd[k].shape}
    names = getattr(src, "names", None)
    names = list(names.values()) if isinstance(names, dict) else names
    if class_names is not None and names is not None and list(names) != list(class_names):
        head = len(model.model) - 1  # type: ignore[arg-type]
        logits = re.compile(rf"model\.{head}\.(one2one_)?cv3\.\d+\.2\.")  # the class-logit convs of Detect
        matched = {k: v for k, v in matched.items() if not logits.match(k)}
    model.load_state_dict(matched, strict=False)
    return len(matched), len(dst_sd)


def save_ultralytics_checkpoint(
    net: nn.Module, class_names: list[str], imgsz: int, path: str | Path, train_args: dict[str, Any] | None = None
) -> Path:
    """Write ``net`` as an Ultralytics ``.pt`` that ``ultralytics.YOLO(path)`` loads (predict, val, export)."""
    import datetime

    import ultralytics

    model = deepcopy(net).float().to(memory_format=torch.contiguous_format).eval()
    model.criterion = None  # training-only state
    model.names = dict(enumerate(class_names))
    args = {"task": "detect", "imgsz": imgsz, **(train_args or {})}
    model.args = args
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "model": model,
        "ema": None,
        "train_args": args,
        "date": datetime.datetime.now().isoformat(),
        "version": ultralytics.__version__,
    }
    torch.save(ckpt, path)
    return path


def build_loss(model: DetectionModel, box: float, cls: float, dfl: float) -> v8DetectionLoss:
    """Ultralytics' ``v8DetectionLoss`` for ``model`` (built on the model's current device).

    It reads the gains as attributes of ``model.args`` (a dict fails), so they are set as a namespace.
    Calling it returns ``(loss[3] * batch_size, loss[3].detach())`` for (box, cls, dfl).
    """
    model.args = SimpleNamespace(box=box, cls=cls, dfl=dfl)
    return v8DetectionLoss(model)
