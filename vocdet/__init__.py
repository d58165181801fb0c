"""vocdet: YOLOv8 object detectors on PASCAL VOC with PyTorch Lightning.

The public API, the same functions the ``vocdet`` CLI calls::

    import vocdet
    cfg = vocdet.load_config(["configs/quickstart.yaml"], ["train.epochs=5"])
    best = vocdet.train(cfg)                      # -> Path of best.ckpt
    metrics = vocdet.evaluate(best)               # -> dict with map50, map50_95, voc07_map50, per_class
    detector = vocdet.Detector.from_checkpoint(best)
    detections = detector.predict("image.jpg")[0]  # -> list[vocdet.Detection]
    vocdet.plot("image.jpg", detections)          # -> PIL.Image
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "VOC_CLASSES",
    "Detection",
    "Detector",
    "VocdetError",
    "__version__",
    "evaluate",
    "export",
    "load_config",
    "plot",
    "synthesize_voc",
    "train",
]

from vocdet.config import load_config
from vocdet.errors import VocdetError

if TYPE_CHECKING:
    from vocdet.core.detections import Detection
    from vocdet.core.draw import plot
    from vocdet.core.voc import VOC_CLASSES
    from vocdet.data.synth import synthesize_voc
    from vocdet.infer.detector import Detector
    from vocdet.infer.export import export
    from vocdet.training.run import evaluate, train

_LAZY = {
    "VOC_CLASSES": "vocdet.core.voc",
    "Detection": "vocdet.core.detections",
    "plot": "vocdet.core.draw",
    "synthesize_voc": "vocdet.data.synth",
    "train": "vocdet.training.run",
    "evaluate": "vocdet.training.run",
    "Detector": "vocdet.infer.detector",
    "export": "vocdet.infer.export",
}


def __getattr__(name: str) -> Any:
    # torch/lightning/ultralytics load on first use, so `import vocdet` and `vocdet --help` stay fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vocdet' has no attribute {name!r}")
