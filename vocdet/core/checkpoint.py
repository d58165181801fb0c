"""The vocdet checkpoint format, in one place: what training writes next to the weights, and the one reader that
eval, predict, export, serve and the benchmarks use.

A checkpoint is Lightning's ``.ckpt`` dict plus ``ckpt["vocdet"]``::

    {"format": 1, "version": <vocdet>, "ultralytics": <version>, "config": {run, data, model, train, trainer,
     eval, predict, export}, "class_names": [...], "imgsz": int, "wandb_id": str (when tracked)}

Checkpoints written before the ``format`` key existed are format 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vocdet.errors import VocdetError

FORMAT_VERSION = 1


def checkpoint_meta(config: dict[str, Any], class_names: list[str], imgsz: int) -> dict[str, Any]:
    """The ``ckpt["vocdet"]`` dict for a run with ``config`` (only its model sections are kept)."""
    import ultralytics

    from vocdet import __version__
    from vocdet.config import run_sections

    return {
        "format": FORMAT_VERSION,
        "version": __version__,
        "ultralytics": ultralytics.__version__,
        "config": run_sections(config),
        "class_names": list(class_names),
        "imgsz": int(imgsz),
    }


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a vocdet checkpoint on the CPU; a missing, corrupt, foreign or newer-format file is a one-line
    ``VocdetError``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise VocdetError(f"checkpoint not found: {path}")
    try:
        # weights_only: a checkpoint never gets to run code while it is being read.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise VocdetError(f"{path} is not a vocdet checkpoint ({_why_unreadable(path, e)})") from None
    if not isinstance(ckpt, dict) or "vocdet" not in ckpt or "state_dict" not in ckpt:
        raise VocdetError(f"{path} is not a vocdet checkpoint (train one with `vocdet train`)")
    meta = ckpt["vocdet"]
    if not isinstance(meta, dict) or not isinstance(ckpt["state_dict"], dict):
        raise VocdetError(f"{path} is not a vocdet checkpoint (train one with `vocdet train`)")
    fmt = meta.get("format", 1)
    if fmt != FORMAT_VERSION:
        raise VocdetError(
            f"{path} is in checkpoint format {fmt}, this vocdet reads format {FORMAT_VERSION}; "
            f"use the vocdet version that wrote it ({ckpt['vocdet'].get('version', 'unknown')})"
        )
    config = meta.get("config")
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict) and "variant" in config["model"]) or any(
        k not in meta for k in ("class_names", "imgsz")
    ):
        raise VocdetError(f"{path} is an incomplete vocdet checkpoint (no config, class names or image size)")
    return ckpt


def update_checkpoint_meta(path: str | Path, **items: Any) -> None:
    """Set ``ckpt["vocdet"][key] = value`` for each item, rewriting ``path`` atomically."""
    import torch

    from vocdet.core.files import atomic_open

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["vocdet"].update(items)
    with atomic_open(path, "wb") as f:
        torch.save(ckpt, f)


def _why_unreadable(path: Path, error: Exception) -> str:
    """One clause on why ``torch.load`` refused ``path`` (instead of PyTorch's paragraph about ``weights_only``)."""
    import pickle
    import zipfile

    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if head[:2] == b"PK" and not zipfile.is_zipfile(path):
        return "a truncated or damaged PyTorch file"
    if head[:2] != b"PK" and head[:1] != b"\x80":
        return "not a PyTorch file"
    if isinstance(error, pickle.UnpicklingError) and "weights_only" in str(error):
        return "it holds pickled Python objects, as an Ultralytics .pt does; start from one with model.weights="
    return "a truncated or damaged PyTorch file"


def network_from_checkpoint(ckpt: dict[str, Any]) -> Any:
    """The inference network (EMA weights when the run kept an EMA) of a loaded checkpoint, on the CPU."""
    from vocdet.core.yolo import build_model

    model = ckpt["vocdet"]["config"]["model"]
    variant, arch = model["variant"], model.get("arch", "yolov8")
    net = build_model(variant, len(ckpt["vocdet"]["class_names"]), arch)
    sd = ckpt["state_dict"]
    prefix = "ema_model." if any(k.startswith("ema_model.") for k in sd) else "model."
    weights = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise VocdetError(f"checkpoint weights do not fit {arch}{variant}: {str(e).splitlines()[0]}") from None
    return net.eval()
