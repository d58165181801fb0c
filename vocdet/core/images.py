"""Reading images the way users' files come: bytes, paths, PIL images, arrays, tensors -> (H, W, 3) uint8 RGB;
and finding image files in folders and globs."""

from __future__ import annotations

import glob
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
from PIL import Image, ImageOps

from vocdet.errors import VocdetError

# A path, a PIL image, an (H, W, 3) RGB array or a (3, H, W) torch tensor.
ImageInput = Union[str, Path, Image.Image, np.ndarray, Any]  # noqa: UP007 - a runtime alias


class ImageError(VocdetError):
    """An input that is not a usable image; ``kind`` is one of empty, truncated, undecodable, too_large."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


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
    if hasattr(image, "detach"):  # a torch tensor (duck-typed: no torch import for the other inputs)
        t = image.detach().cpu()
        if t.ndim == 3:
            t = t.permute(1, 2, 0)  # CHW -> HWC
        elif t.ndim != 2:
            raise VocdetError(f"expected an image tensor of shape (3, H, W), got {tuple(image.shape)}")
        return array_to_rgb(t.numpy())
    raise VocdetError(f"cannot read an image from {type(image).__name__} (use a path, PIL image, array or tensor)")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def find_images(sources: Iterable[str | Path]) -> list[Path]:
    """Files, globs and directories (searched recursively for image suffixes) -> sorted, de-duplicated paths."""
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
