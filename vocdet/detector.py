"""``Detector``: the one inference path for notebooks, ``vocdet predict``, ``vocdet export`` checks and serving.

A detector is a backend (PyTorch checkpoint, ONNX Runtime or TorchScript) plus what the artefact says about
itself: class names, image size, stride and thresholds. Every backend shares the same steps, and those steps are
the ones validation uses: ``data.letterbox`` → network → ``yolo.non_max_suppression`` → ``data.unletterbox_boxes``.

Boxes in a :class:`Detection` are ``xyxy`` in continuous pixel coordinates of the original image (0 .. width),
like Ultralytics' ``Results.boxes.xyxy``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from vocdet.boxes import letterbox, non_max_suppression, unletterbox_boxes
from vocdet.errors import VocdetError

ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]  # noqa: UP007 - a runtime alias

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


class ImageError(VocdetError):
    """An input that is not a usable image; ``kind`` is one of empty, truncated, undecodable, too_large."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` (x1, y1, x2, y2) in original-image pixels, ``score`` in [0, 1]."""

    box: tuple[float, float, float, float]
    score: float
    class_id: int
    label: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box"] = list(self.box)
        return d


@dataclass(frozen=True)
class Letterboxed:
    """An image ready for the network: ``image`` (h, w, 3) uint8 RGB, letterboxed; and how to map boxes back."""

    image: np.ndarray
    orig_size: tuple[int, int]  # (height, width) of the original image
    ratio: float
    pad: tuple[int, int]  # (left, top)


# ----------------------------------------------------------------------------------------------- reading images


def decode_image(data: bytes | np.ndarray, name: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB, the way users' files come.

    OpenCV applies the EXIF orientation, turns grayscale and palette images into 3 channels, drops alpha and
    scales 16-bit images to 8 bits; formats it cannot read (GIF, ...) go through Pillow. A truncated JPEG, a
    non-image or an image over ``max_pixels`` is a ``VocdetError`` naming ``name``.
    """
    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buf.size == 0:
        raise ImageError(f"{name} is empty, not an image", "empty")
    if max_pixels is not None:
        _check_pixels(buf, name, max_pixels)
    if buf[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in buf[-4096:].tobytes():
        raise ImageError(
            f"{name} is a truncated JPEG (no end-of-image marker); re-export or re-download it", "truncated"
        )
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is not None:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    try:
        with Image.open(io.BytesIO(buf.tobytes())) as pil:
            return pil_to_rgb(pil)
    except Exception:
        raise ImageError(
            f"cannot decode {name}: not an image, or a truncated one (JPEG, PNG, BMP, WebP, ...)",
            "undecodable",
        ) from None


def _check_pixels(buf: np.ndarray, name: str, max_pixels: int) -> None:
    """Reject decompression bombs from the header alone, before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(buf.tobytes())) as pil:
            w, h = pil.size
    except Image.DecompressionBombError:
        raise ImageError(f"{name} is too large to decode safely (limit {max_pixels} pixels)", "too_large") from None
    except Exception:
        return  # not something Pillow reads: decode_image reports it
    if w * h > max_pixels:
        raise ImageError(f"{name} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}", "too_large")


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB (see :func:`decode_image`); errors name the file."""
    path = Path(path)
    try:
        buf = np.fromfile(path, np.uint8)  # np.fromfile + imdecode: non-ASCII paths work too
    except (FileNotFoundError, IsADirectoryError):
        raise VocdetError(f"image not found: {path}") from None
    except OSError as e:
        raise VocdetError(f"cannot read image {path}: {e.strerror or e}") from None
    return decode_image(buf, str(path))


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image in any mode -> (H, W, 3) uint8 RGB, EXIF orientation applied, 16-bit scaled to 8 bits."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return array_to_rgb(np.asarray(img).astype(np.uint16 if img.mode != "I" else np.int64))
    if img.mode == "F":
        return array_to_rgb(np.asarray(img))
    return np.asarray(img.convert("RGB"))


def array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1|3|4) arrays -> (H, W, 3) uint8 RGB.

    uint8 is taken as is; 16-bit (and wider integers) are scaled by 1/257 like OpenCV's 16 -> 8 bit conversion;
    floats are taken as 0..1. A fourth (alpha) channel is dropped.
    """
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or 0 in arr.shape[:2]:
        raise VocdetError(f"expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype.kind in "ui":
        arr = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
    elif arr.dtype.kind == "f":
        arr = (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    else:
        raise VocdetError(f"unsupported image array dtype {arr.dtype} (use uint8 RGB)")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def load_image(image: ImageInput) -> np.ndarray:
    """Any supported input -> (H, W, 3) uint8 RGB.

    Paths (str/Path), PIL images, numpy arrays (H, W, 3) RGB, torch tensors (3, H, W) RGB (uint8 0..255 or float
    0..1, the torchvision convention).
    """
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return array_to_rgb(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3:
            t = t.permute(1, 2, 0)  # CHW -> HWC
        elif t.ndim != 2:
            raise VocdetError(f"expected an image tensor of shape (3, H, W), got {tuple(image.shape)}")
        return array_to_rgb(t.numpy())
    raise VocdetError(f"cannot read an image from {type(image).__name__} (use a path, PIL image, array or tensor)")


def _as_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    if isinstance(images, torch.Tensor):
        return list(images.unbind(0)) if images.ndim == 4 else [images]
    return list(images)


# ----------------------------------------------------------------------------------------------- backends


class _TorchBackend:
    """A vocdet/Ultralytics ``DetectionModel`` in eval mode: uint8 batch -> raw (B, 4 + nc, anchors)."""

    dynamic_shape = True
    nms_in_graph = False

    def __init__(self, net: torch.nn.Module, device: str, half: bool):
        self.device = torch.device(device)
        self.dtype = torch.float16 if half else torch.float32
        self.net = net.to(self.device, self.dtype).eval()
        # NHWC weights: oneDNN (CPU) and tensor cores run convolutions without layout conversions.
        self.net.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True).to(self.dtype).div_(255)
        return self.net(x.contiguous(memory_format=torch.channels_last))[0].float()


class _TorchScriptBackend:
    """A ``vocdet export --format torchscript`` module: float (B, 3, S, S) in 0..1 -> raw (B, 4 + nc, anchors)."""

    dynamic_shape = False
    nms_in_graph = False

    def __init__(self, net: torch.jit.ScriptModule, device: str):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch.to(self.device).float().div_(255).contiguous()).float()


class _OnnxBackend:
    """An ONNX Runtime session on an exported vocdet model (CUDA provider when present)."""

    def __init__(self, path: Path, providers: Sequence[str] | None, nms_in_graph: bool, threads: int | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.dynamic_shape = not all(isinstance(d, int) for d in inp.shape[2:])
        self.nms_in_graph = nms_in_graph

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        # numpy, not torch: waking torch's OpenMP threads here would compete with ONNX Runtime's for the cores.
        x = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        x *= 1 / 255
        if self.fixed_batch and len(x) != self.fixed_batch:  # a batch-1 export: one image at a time
            outs = [self.session.run(None, {self.input_name: x[i : i + 1]})[0] for i in range(len(x))]
            if self.nms_in_graph:
                for i, o in enumerate(outs):
                    o[:, 0] = i
            return np.concatenate(outs)
        return self.session.run(None, {self.input_name: x})[0]


# ----------------------------------------------------------------------------------------------- detector


class Detector:
    """Object detector over any backend; build it with :meth:`from_checkpoint`, :meth:`from_onnx` or :meth:`load`.

    ``predict`` takes one image or a list (paths, PIL images, HWC uint8 RGB arrays, CHW tensors) and returns one
    list of :class:`Detection` per image. Images are letterboxed like Ultralytics' predictor: the long side to
    ``imgsz``, the short side padded only to the next multiple of the stride when the backend takes any shape.
    """

    def __init__(
        self,
        backend: Callable[[torch.Tensor], torch.Tensor],
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

    def __repr__(self) -> str:
        kind = type(self.backend).__name__.strip("_").replace("Backend", "").lower()
        return f"Detector({kind}, {self.source!r}, imgsz={self.imgsz}, classes={len(self.class_names)})"

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> Detector:
        """Pick the loader from the file: ``.ckpt`` checkpoint, ``.onnx``, ``.torchscript`` (``device`` for the
        PyTorch ones; ONNX Runtime picks its provider)."""
        suffix = Path(path).suffix.lower()
        if suffix == ".onnx":
            return cls.from_onnx(path)
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
        from vocdet.training import load_checkpoint

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
        """:meth:`from_checkpoint` for a checkpoint dict already read by ``training.load_checkpoint``; ``config``
        (a resolved config tree) replaces the stored one for the ``predict.*`` settings."""
        from vocdet.config import from_dict

        meta = ckpt["vocdet"]
        cfg = config if config is not None else from_dict(meta["config"])
        net = network_from_checkpoint(ckpt)
        device = device or cfg.predict.device
        half = cfg.predict.half if half is None else half
        _check_device(device, half)
        return cls(
            _TorchBackend(net.fuse(), device, half),
            meta["class_names"],
            _check_imgsz(imgsz or meta["imgsz"], int(net.stride.max())),
            stride=int(net.stride.max()),
            conf=cfg.predict.conf,
            iou=cfg.predict.iou,
            max_det=cfg.predict.max_det,
            batch_size=cfg.predict.batch_size,
            source=source,
            metadata={k: v for k, v in meta.items() if k != "config"},
        )

    def with_backend(self, backend: Callable[[torch.Tensor], Any], source: str = "") -> Detector:
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
    ) -> Detector:
        """An ONNX file from ``vocdet export``, run by ONNX Runtime (CUDA provider first when installed).

        ``threads`` sets ONNX Runtime's intra-op threads (default: one per physical core)."""
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
        meta = json.loads(props["vocdet"])
        try:
            backend = _OnnxBackend(path, providers, bool(meta.get("nms")), threads)
        except Exception as e:
            raise VocdetError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        return cls._from_meta(backend, meta, path, imgsz)

    @classmethod
    def from_torchscript(cls, path: str | Path, device: str = "cpu", *, imgsz: int | None = None) -> Detector:
        """A TorchScript file from ``vocdet export --format torchscript`` (fixed imgsz x imgsz input)."""
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
        meta = json.loads(extra["vocdet.json"])
        _check_device(device, bool(meta.get("half")))
        return cls._from_meta(_TorchScriptBackend(net, device), meta, path, imgsz)

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
                    if confs[i] < self.conf or ious[i] != self.iou:
                        raise VocdetError(
                            f"this model has NMS in its graph (conf {self.conf}, iou {self.iou}); a lower conf or "
                            "another iou needs a re-export with those predict.* values"
                        )
                    det = torch.from_numpy(raw[raw[:, 0] == j][:, 1:])
                    det = det[det[:, 4] > confs[i]][: dets[i]]
                else:
                    det = non_max_suppression(_candidates(raw[j], confs[i]), confs[i], ious[i], dets[i])[0]
                results[i] = self._detections(det, batch[i])
        return results

    def _detections(self, det: torch.Tensor, item: Letterboxed) -> list[Detection]:
        h, w = item.orig_size
        boxes = unletterbox_boxes(det[:, :4].float(), item.ratio, item.pad, w, h).cpu().tolist()
        scores, classes = det[:, 4].cpu().tolist(), det[:, 5].cpu().int().tolist()
        return [
            Detection((b[0], b[1], b[2], b[3]), s, c, self.class_names[c]) for b, s, c in zip(boxes, scores, classes)
        ]


def stack(batch: Sequence[Letterboxed]) -> torch.Tensor:
    """Letterboxed images of one shape -> uint8 (B, 3, H, W) in channels-last memory (no copy for one image)."""
    arr = batch[0].image[None] if len(batch) == 1 else np.stack([b.image for b in batch])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def _candidates(raw: torch.Tensor | np.ndarray, conf: float) -> torch.Tensor:
    """One image's raw output (4 + nc, A) -> (1, 4 + nc, n) with only the anchors whose best score passes ``conf``.

    ONNX Runtime's output is filtered in numpy first, so NMS gets a few boxes and never wakes torch's OpenMP
    threads, whose spinning would slow the next ONNX Runtime call down by a third on a small CPU.
    """
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(raw[:, raw[4:].max(0) > conf])
    return raw[None]


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


def _check_device(device: str, half: bool) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise VocdetError(f"unknown device '{device}' (cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VocdetError(f"device '{device}' needs CUDA, which is not available here; use device=cpu")
    if half and dev.type != "cuda":
        raise VocdetError("half precision needs a CUDA device; drop half or use device=cuda")


def network_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """The inference network (EMA weights when the run kept an EMA) of a loaded vocdet checkpoint, on the CPU."""
    from vocdet.config import from_dict
    from vocdet.yolo import build_model

    cfg = from_dict(ckpt["vocdet"]["config"])
    net = build_model(cfg.model.variant, len(ckpt["vocdet"]["class_names"]))
    sd = ckpt["state_dict"]
    prefix = "ema_model." if any(k.startswith("ema_model.") for k in sd) else "model."
    weights = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise VocdetError(
            f"checkpoint weights do not fit yolov8{cfg.model.variant}: {str(e).splitlines()[0]}"
        ) from None
    return net.eval()


def match_detections(
    a: Sequence[Detection], b: Sequence[Detection], iou: float = 0.99, score_tol: float = 0.01
) -> tuple[int, int]:
    """How many of ``a`` have a partner in ``b`` (same class, IoU >= ``iou``, |score difference| <= ``score_tol``),
    one partner each; returns (matched, max(len(a), len(b)))."""
    import torchvision

    total = max(len(a), len(b))
    if not a or not b:
        return 0, total
    ious = torchvision.ops.box_iou(torch.tensor([d.box for d in a]), torch.tensor([d.box for d in b])).numpy()
    used = np.zeros(len(b), bool)
    matched = 0
    for i, d in enumerate(a):
        ok = (ious[i] >= iou) & ~used
        ok &= np.array([e.class_id == d.class_id and abs(e.score - d.score) <= score_tol for e in b])
        if ok.any():
            used[int(np.argmax(np.where(ok, ious[i], -1)))] = True
            matched += 1
    return matched, total


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def find_images(sources: Iterable[str | Path]) -> list[Path]:
    """Files, globs and directories (searched recursively for image suffixes) -> sorted, de-duplicated paths."""
    import glob

    found: dict[Path, None] = {}
    for src in sources:
        src = str(src)
        p = Path(src)
        if p.is_dir():
            hits = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not hits:
                raise VocdetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in directory {p}")
        elif p.is_file():
            hits = [p]
        elif glob.has_magic(src):
            hits = sorted(Path(f) for f in glob.glob(src, recursive=True) if Path(f).is_file())
            if not hits:
                raise VocdetError(f"no files match {src}")
        else:
            raise VocdetError(f"image source not found: {src}")
        found.update(dict.fromkeys(hits))
    return list(found)


# ----------------------------------------------------------------------------------------------- drawing

# Ultralytics' default palette, so plots look familiar.
_PALETTE = (
    "FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
    "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7",
)  # fmt: skip


def class_colour(class_id: int) -> tuple[int, int, int]:
    h = _PALETTE[class_id % len(_PALETTE)]
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def plot(image: ImageInput, detections: Sequence[Detection], *, line_width: int | None = None) -> Image.Image:
    """Draw labelled boxes on a copy of ``image``; returns an RGB PIL image.

    The label font is the FreeType font bundled with Pillow (no download, no system fonts needed).
    """
    canvas = Image.fromarray(load_image(image))
    draw = ImageDraw.Draw(canvas)
    lw = line_width or max(round(sum(canvas.size) / 2 * 0.003), 2)
    font = ImageFont.load_default(size=max(lw * 6, 12))
    for d in sorted(detections, key=lambda d: d.score):  # best on top
        colour = class_colour(d.class_id)
        x1, y1, x2, y2 = d.box
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=lw)
        text = f"{d.label} {d.score:.2f}"
        left, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - left + 2 * lw, b - t + 2 * lw
        ty = y1 - th if y1 - th >= 0 else y1  # above the box, or inside when at the top edge
        draw.rectangle((x1, ty, x1 + tw, ty + th), fill=colour)
        luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((x1 + lw - left, ty + lw - t), text, fill=(0, 0, 0) if luma > 150 else (255, 255, 255), font=font)
    return canvas


__all__ = [
    "Detection",
    "Detector",
    "Letterboxed",
    "decode_image",
    "find_images",
    "load_image",
    "match_detections",
    "plot",
    "read_image",
]
