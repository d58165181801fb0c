"""``Detector``: the one inference path for notebooks, ``vocdet predict``, ``vocdet export`` checks and serving.

A detector is a backend (PyTorch checkpoint, ONNX Runtime or TorchScript, see ``vocdet.infer.backends``) plus
what the artefact says about itself: class names, image size, stride and thresholds. Every backend shares the
same steps, and those steps are the ones validation uses: ``core.boxes.letterbox`` → network →
``core.boxes.non_max_suppression`` → ``core.boxes.unletterbox_boxes``.

The ONNX path imports neither torch nor Ultralytics: ``Detector.from_onnx`` works in an install without them.
Boxes in a :class:`~vocdet.core.detections.Detection` are ``xyxy`` in continuous pixel coordinates of the
original image (0 .. width), like Ultralytics' ``Results.boxes.xyxy``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vocdet.core.boxes import letterbox, non_max_suppression, unletterbox_boxes
from vocdet.core.detections import Detection
from vocdet.core.images import ImageInput, load_image
from vocdet.errors import VocdetError


@dataclass(frozen=True)
class Letterboxed:
    """An image ready for the network: ``image`` (h, w, 3) uint8 RGB, letterboxed; and how to map boxes back."""

    image: np.ndarray
    orig_size: tuple[int, int]  # (height, width) of the original image
    ratio: float
    pad: tuple[int, int]  # (left, top)


def _as_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    if hasattr(images, "unbind"):  # a torch tensor: (3, H, W) or a (B, 3, H, W) batch
        return list(images.unbind(0)) if images.ndim == 4 else [images]
    return list(images)


class Detector:
    """Object detector over any backend; build it with :meth:`from_checkpoint`, :meth:`from_onnx` or :meth:`load`.

    ``predict`` takes one image or a list (paths, PIL images, HWC uint8 RGB arrays, CHW tensors) and returns one
    list of :class:`Detection` per image. Images are letterboxed like Ultralytics' predictor: the long side to
    ``imgsz``, the short side padded only to the next multiple of the stride when the backend takes any shape.
    """

    def __init__(
        self,
        backend: Callable[[np.ndarray], Any],
        class_names: Sequence[str],
        imgsz: int,
        *,
        stride: int = 32,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
        batch_size: int = 8,
        source: str = "",
        metadata: dict[str, Any] | None = None,
    ):
        self.backend = backend
        self.class_names = list(class_names)
        self.imgsz, self.stride = int(imgsz), int(stride)
        self.conf, self.iou, self.max_det, self.batch_size = conf, iou, max_det, batch_size
        self.source = source
        self.metadata = dict(metadata or {})
        self.rect = bool(getattr(backend, "dynamic_shape", True))
        self.nms_in_graph = bool(getattr(backend, "nms_in_graph", False))

    @property
    def precision(self) -> str:
        """fp32, fp16 or int8: what the model computes in (from the export's metadata; checkpoints: predict.half)."""
        if "precision" in self.metadata:
            return str(self.metadata["precision"])
        return (
            "fp16"
            if self.metadata.get("half") or str(getattr(self.backend, "dtype", "")) == "torch.float16"
            else "fp32"
        )

    @property
    def drift_profile(self) -> dict[str, Any] | None:
        """The reference profile the model carries (``vocdet.core.drift``), or None."""
        from vocdet.core.drift import check_profile

        return check_profile(self.metadata.get("drift"))

    @property
    def box_origin(self) -> int:
        """The training data's corner convention (``data.box_origin``): the frame of detections JSON boxes."""
        return int(self.metadata.get("box_origin", 1))

    def __repr__(self) -> str:
        kind = type(self.backend).__name__.strip("_").replace("Backend", "").lower()
        return f"Detector({kind}, {self.source!r}, imgsz={self.imgsz}, classes={len(self.class_names)})"

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, device: str | None = None, *, predict: Any = None) -> Detector:
        """Pick the loader from the file: ``.ckpt`` checkpoint, ``.onnx``, ``.torchscript`` (``device`` for the
        PyTorch ones; ONNX Runtime picks its provider; ``predict``: a ``predict.*`` section for its session)."""
        suffix = Path(path).suffix.lower()
        if suffix == ".onnx":
            return cls.from_onnx(path, predict=predict)
        if suffix in (".torchscript", ".ts"):
            return cls.from_torchscript(path, device or "cpu")
        return cls.from_checkpoint(path, device)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | None = None, *, half: bool | None = None, imgsz: int | None = None
    ) -> Detector:
        """A vocdet checkpoint (``vocdet train``'s best.ckpt/last.ckpt): the EMA weights, fused for inference.

        Class names, image size and thresholds (``predict.*``) come from the config stored in the checkpoint;
        ``device``/``half``/``imgsz`` override them.
        """
        from vocdet.core.checkpoint import load_checkpoint

        return cls.from_loaded_checkpoint(load_checkpoint(path), device, half=half, imgsz=imgsz, source=str(path))

    @classmethod
    def from_loaded_checkpoint(
        cls,
        ckpt: dict[str, Any],
        device: str | None = None,
        *,
        half: bool | None = None,
        imgsz: int | None = None,
        config: Any = None,
        source: str = "",
    ) -> Detector:
        """:meth:`from_checkpoint` for a checkpoint dict already read by ``core.checkpoint.load_checkpoint``; ``config``
        (a resolved config tree) replaces the stored one for the ``predict.*`` settings."""
        from vocdet.config import from_dict
        from vocdet.core.checkpoint import network_from_checkpoint
        from vocdet.infer.backends import TorchBackend, check_device

        meta = ckpt["vocdet"]
        cfg = config if config is not None else from_dict(meta["config"])
        net = network_from_checkpoint(ckpt)
        device = device or cfg.predict.device
        half = cfg.predict.half if half is None else half
        check_device(device, half)
        return cls(
            TorchBackend(net.fuse(), device, half),
            meta["class_names"],
            _check_imgsz(imgsz or meta["imgsz"], int(net.stride.max())),
            stride=int(net.stride.max()),
            conf=cfg.predict.conf,
            iou=cfg.predict.iou,
            max_det=cfg.predict.max_det,
            batch_size=cfg.predict.batch_size,
            source=source,
            metadata={
                **{k: v for k, v in meta.items() if k != "config"},
                "box_origin": int(cfg.data.get("box_origin", 1)),
            },
        )

    def with_backend(self, backend: Callable[[np.ndarray], Any], source: str = "") -> Detector:
        """Another detector over ``backend`` with this one's classes, image size, stride and thresholds."""
        return Detector(
            backend,
            self.class_names,
            self.imgsz,
            stride=self.stride,
            conf=self.conf,
            iou=self.iou,
            max_det=self.max_det,
            batch_size=self.batch_size,
            source=source,
            metadata=self.metadata,
        )

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        imgsz: int | None = None,
        threads: int | None = None,
        predict: Any = None,
    ) -> Detector:
        """An ONNX file from ``vocdet export``, run by ONNX Runtime (CUDA provider first when installed).

        ``threads`` sets ONNX Runtime's intra-op threads (default: ``predict.threads``, else one per physical core);
        ``predict`` (the config's ``predict`` section, or any object with its ``ort_*`` attributes) sets the rest of
        the session options; without it, vocdet's defaults (``vocdet config --defaults``)."""
        path = Path(path)
        if not path.is_file():
            raise VocdetError(f"ONNX model not found: {path}")
        try:
            import onnx

            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise VocdetError(f"cannot read ONNX model {path}: {str(e).splitlines()[0][:200]}") from None
        props = {p.key: p.value for p in proto.metadata_props}
        if "vocdet" not in props:
            raise VocdetError(f"{path} is not a vocdet ONNX export (no vocdet metadata); use `vocdet export`")
        meta = _read_meta(props["vocdet"], path)
        try:
            from vocdet.infer.backends import OnnxBackend

            backend = OnnxBackend(path, providers, bool(meta.get("nms")), threads, predict or _default_predict())
        except Exception as e:
            raise VocdetError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        return cls._from_meta(backend, meta, path, imgsz)

    @classmethod
    def from_torchscript(cls, path: str | Path, device: str = "cpu", *, imgsz: int | None = None) -> Detector:
        """A TorchScript file from ``vocdet export --format torchscript`` (fixed imgsz x imgsz input)."""
        import torch

        from vocdet.infer.backends import TorchScriptBackend, check_device

        path = Path(path)
        if not path.is_file():
            raise VocdetError(f"TorchScript model not found: {path}")
        extra = {"vocdet.json": ""}
        try:
            net = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as e:
            raise VocdetError(f"cannot read TorchScript model {path}: {str(e).splitlines()[0][:200]}") from None
        if not extra["vocdet.json"]:
            raise VocdetError(f"{path} is not a vocdet TorchScript export (no vocdet.json); use `vocdet export`")
        meta = _read_meta(extra["vocdet.json"], path)
        check_device(device, bool(meta.get("half")))
        return cls._from_meta(TorchScriptBackend(net, device), meta, path, imgsz)

    @classmethod
    def _from_meta(cls, backend: Any, meta: dict[str, Any], path: Path, imgsz: int | None) -> Detector:
        if not backend.dynamic_shape and imgsz not in (None, meta["imgsz"]):
            raise VocdetError(f"{path} takes {meta['imgsz']}x{meta['imgsz']} images only (exported without rect)")
        return cls(
            backend,
            meta["class_names"],
            _check_imgsz(imgsz or meta["imgsz"], meta["stride"]),
            stride=meta["stride"],
            conf=meta["conf"],
            iou=meta["iou"],
            max_det=meta["max_det"],
            batch_size=meta.get("batch_size", 8),
            source=str(path),
            metadata=meta,
        )

    # ------------------------------------------------------------------------------------------- inference
    def predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        conf: float | None = None,
        iou: float | None = None,
        max_det: int | None = None,
        batch_size: int | None = None,
    ) -> list[list[Detection]]:
        """Detect objects: one list of :class:`Detection` (sorted by score) per input image, in input order."""
        items = _as_list(images)
        bs = max(1, batch_size or self.batch_size)
        out: list[list[Detection]] = []
        for start in range(0, len(items), bs):
            preps = [self.prepare(load_image(x)) for x in items[start : start + bs]]
            out += self.infer(preps, conf, iou, max_det)
        return out

    __call__ = predict

    def prepare(self, image: np.ndarray) -> Letterboxed:
        """(H, W, 3) uint8 RGB -> letterboxed (the CPU half of inference; thread-safe)."""
        h, w = image.shape[:2]
        img, ratio, pad = letterbox(image, self.imgsz, stride=self.stride if self.rect else None)
        return Letterboxed(img, (h, w), ratio, pad)

    def infer(
        self,
        batch: Sequence[Letterboxed],
        conf: float | Sequence[float] | None = None,
        iou: float | Sequence[float] | None = None,
        max_det: int | Sequence[int] | None = None,
    ) -> list[list[Detection]]:
        """Run the network on prepared images and post-process; thresholds may differ per image."""
        if not batch:
            return []
        n = len(batch)
        confs, ious, dets = (
            _per_item(v, d, n) for v, d in ((conf, self.conf), (iou, self.iou), (max_det, self.max_det))
        )
        results: list[list[Detection]] = [[] for _ in batch]
        # One forward per letterboxed shape: extra padding would change the network's view of an image, so a
        # batch gives exactly the detections each image gets alone (and as Ultralytics' predictor).
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault(item.image.shape, []).append(i)
        for idx in groups.values():
            raw = self.backend(stack([batch[i] for i in idx]))
            for j, i in enumerate(idx):
                if self.nms_in_graph:
                    self.check_thresholds(confs[i], ious[i])
                    det = raw[raw[:, 0] == j][:, 1:]
                    det = det[det[:, 4] > confs[i]][: dets[i]]
                else:
                    det = non_max_suppression(_candidates(raw[j], confs[i]), confs[i], ious[i], dets[i])[0]
                results[i] = self._detections(det, batch[i])
        return results

    def check_thresholds(self, conf: float | None, iou: float | None) -> None:
        """A one-line error for thresholds this model cannot honour (a lower ``conf`` or another ``iou`` than an
        NMS-in-graph export was made with); callers that batch requests check each one before batching."""
        if self.nms_in_graph and ((conf is not None and conf < self.conf) or (iou is not None and iou != self.iou)):
            raise VocdetError(
                f"this model has NMS in its graph (conf {self.conf}, iou {self.iou}); a lower conf or "
                "another iou needs a re-export with those predict.* values"
            )

    def _detections(self, det: Any, item: Letterboxed) -> list[Detection]:
        det = np.asarray(det.float().cpu() if hasattr(det, "cpu") else det, np.float32)
        h, w = item.orig_size
        boxes = unletterbox_boxes(det[:, :4], item.ratio, item.pad, w, h).tolist()
        scores, classes = det[:, 4].tolist(), det[:, 5].astype(int).tolist()
        return [
            Detection((b[0], b[1], b[2], b[3]), s, c, self.class_names[c]) for b, s, c in zip(boxes, scores, classes)
        ]


def stack(batch: Sequence[Letterboxed]) -> np.ndarray:
    """Letterboxed images of one shape -> uint8 (B, 3, H, W), a view of channels-last memory (no copy for one
    image)."""
    arr = batch[0].image[None] if len(batch) == 1 else np.stack([b.image for b in batch])
    return arr.transpose(0, 3, 1, 2)


def _candidates(raw: Any, conf: float) -> Any:
    """One image's raw output (4 + nc, A) -> (1, 4 + nc, n) with only the anchors whose best score passes ``conf``.

    ONNX Runtime's output is filtered in numpy first, so NMS (OpenCV's) gets a few boxes.
    """
    if isinstance(raw, np.ndarray):
        raw = raw[:, raw[4:].max(0) > conf]
    return raw[None]


META_KEYS = ("class_names", "imgsz", "stride", "conf", "iou", "max_det")


def _read_meta(text: str, path: Path) -> dict[str, Any]:
    """An export's vocdet metadata; unreadable or incomplete metadata is a one-line error naming the file."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise VocdetError(
            f"{path} has unreadable vocdet metadata ({e.msg}); export it again with `vocdet export`"
        ) from None
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise VocdetError(f"{path} has incomplete vocdet metadata (no {', '.join(missing)}); export it again")
    return meta


def _per_item(value: Any, default: Any, n: int) -> list[Any]:
    if value is None:
        return [default] * n
    if isinstance(value, (list, tuple)):
        return [default if v is None else v for v in value]
    return [value] * n


def _check_imgsz(imgsz: int, stride: int) -> int:
    if imgsz < stride or imgsz % stride:
        raise VocdetError(f"imgsz must be a positive multiple of the stride {stride}, got {imgsz}")
    return int(imgsz)


__all__ = ["Detector", "Letterboxed", "stack"]


def _default_predict() -> Any:
    from vocdet.config import PredictConfig

    return PredictConfig()
