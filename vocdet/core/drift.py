"""Data drift: what a model's inputs and outputs looked like on its validation split (the *reference profile*), and
two-sample tests of a window of served requests against it.

Features of one image (:func:`image_features`), all computed on the decoded RGB image (and the file's bytes, for
the JPEG quality):

- ``brightness``, ``contrast``, ``saturation``: mean and standard deviation of the grey image, mean HSV saturation;
- ``sharpness``: log variance of the Laplacian (falls with blur); ``noise``: Immerkær's noise estimate (rises with
  sensor or transmission noise; a blur lowers it too);
- ``width``, ``height``, ``aspect``; ``jpeg_quality``: the IJG quality that the file's luminance quantisation
  table implies (absent for PNG and other formats);
- ``embedding``: a 16×16 RGB thumbnail (768 values) under a fixed random projection to 16 dimensions (stored in
  the profile);

and of the model's answer, at the profile's confidence threshold: ``detections`` (per image), ``top_score`` (the
best detection's score, 0 without one) and ``classes`` (class frequencies over the window).

Tests (:func:`compare`): Kolmogorov–Smirnov for each scalar feature, a chi-square test of the class frequencies
(one effective observation per image, so correlated detections within one image do not inflate it), and a kernel
two-sample test (MMD with a Gaussian kernel at the reference's median distance, permutation p-value) for the
embedding. A feature drifts when its p-value is under ``alpha / number of tests`` (Bonferroni: the chance that an
in-distribution window raises any alarm stays under ``alpha``). The image features are model-agnostic and cost ~0.6
ms on a decoding thread, so every backend (PyTorch, ONNX fp32/int8, NMS in the graph) carries the same profile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

PROFILE_VERSION = 1
IMAGE_FEATURES = (
    "brightness",
    "contrast",
    "saturation",
    "sharpness",
    "noise",
    "width",
    "height",
    "aspect",
    "jpeg_quality",
)
OUTPUT_FEATURES = ("detections", "top_score")
SCALARS = IMAGE_FEATURES + OUTPUT_FEATURES
THUMB = 16  # thumbnail side: 16 x 16 x 3 = 768 values
EMBED_DIMS = 16
MMD_SAMPLES = 300  # at most this many points a side in the kernel test
# IJG's standard luminance quantisation table (quality 50); any order works, only sums are compared.
_STD_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float64,
)  # fmt: skip
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def jpeg_quality(data: bytes | None) -> float:
    """The IJG quality (1-100) of a baseline/progressive JPEG's luminance table; NaN for other formats."""
    if not data or data[:2] != b"\xff\xd8":
        return math.nan
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return math.nan
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDB:  # DQT: the first table in it (the luminance table, id 0, in every common encoder)
            pq_tq = data[i + 4]
            size = 128 if pq_tq >> 4 else 64
            raw = data[i + 5 : i + 5 + size]
            if len(raw) < size:
                return math.nan
            q = np.frombuffer(raw, ">u2" if size == 128 else np.uint8).astype(np.float64)
            scale = 100.0 * q.sum() / _STD_LUMA.sum()
            quality = (200.0 - scale) / 2.0 if scale <= 100 else 5000.0 / scale
            return float(min(max(quality, 1.0), 100.0))
        if marker == 0xDA:  # start of scan: no table before it
            return math.nan
        i += 2 + length
    return math.nan


def _nearest(img: np.ndarray, side: int) -> np.ndarray:
    """``img`` with its long side at most ``side``, by dropping pixels (no averaging: noise stays noise)."""
    h, w = img.shape[:2]
    if max(h, w) <= side:
        return img
    scale = side / max(h, w)
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_NEAREST)


def image_features(rgb: np.ndarray, data: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the ``IMAGE_FEATURES`` as float64, the 768-value thumbnail as float32 in 0..1) of one HxWx3 uint8 image.

    About 0.5 ms for a 500 x 375 photo, bounded for any size: sharpness and noise on the image with its long side at
    most 256 px, the rest on at most 128 px (pixels dropped, not averaged, so noise stays visible)."""
    h, w = rgb.shape[:2]
    grey = cv2.cvtColor(_nearest(rgb, 256), cv2.COLOR_RGB2GRAY)
    gh, gw = grey.shape
    if gh > 2 and gw > 2:
        lap_std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))[1][0, 0]
        sharpness = math.log1p(float(lap_std) ** 2)
        response = cv2.filter2D(grey, cv2.CV_32F, _NOISE_KERNEL)[1:-1, 1:-1]
        noise = math.sqrt(math.pi / 2) * cv2.norm(response, cv2.NORM_L1) / response.size / 6.0
    else:
        sharpness = noise = 0.0
    small = _nearest(rgb, 128)
    small_grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    sat = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)[..., 1]
    mean, std = cv2.meanStdDev(small_grey)
    scalars = np.array(
        [mean[0, 0], std[0, 0], sat.mean(), sharpness, noise, w, h, w / h, jpeg_quality(data)], np.float64
    )
    thumb = cv2.resize(small, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32).reshape(-1) / 255.0
    return scalars, thumb


def output_features(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, conf: float, nc: int):
    """(detections, top score, class counts) of one image's detections at the threshold ``conf``."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, np.int64)
    keep = scores >= conf
    scores, labels = scores[keep], labels[keep]
    counts = np.bincount(labels[(labels >= 0) & (labels < nc)], minlength=nc).astype(np.float64)
    return float(len(scores)), float(scores.max()) if len(scores) else 0.0, counts


def evenly(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items spread evenly over ``items`` (deterministic), or all of them."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def file_features(path: str | Any) -> tuple[np.ndarray, np.ndarray]:
    """``image_features`` of an image file, decoded the way ``vocdet serve`` decodes an upload."""
    from pathlib import Path

    from vocdet.core.images import decode_image

    data = Path(path).read_bytes()
    return image_features(decode_image(data, str(path)), data)


# ----------------------------------------------------------------------------------------------- profile
def build_profile(
    images: Sequence[tuple[np.ndarray, np.ndarray]],
    outputs: Sequence[tuple[float, float, np.ndarray]],
    conf: float,
    class_names: Sequence[str],
    source: str,
) -> dict[str, Any]:
    """The reference profile of ``images`` (``image_features`` results) and the model's ``outputs`` on them
    (``output_features`` results): plain lists and numbers, so it fits a checkpoint and ONNX metadata alike."""
    if len(images) < 2:
        raise ValueError("a drift profile needs at least 2 images")
    scal = np.stack([s for s, _ in images])
    thumbs = np.stack([t for _, t in images]).astype(np.float64)
    values = {name: scal[:, i] for i, name in enumerate(IMAGE_FEATURES)}
    if outputs:
        values["detections"] = np.array([o[0] for o in outputs])
        values["top_score"] = np.array([o[1] for o in outputs])
    mean = thumbs.mean(0)
    # A fixed random projection, not PCA: components fitted on the reference itself overstate its spread along
    # them, and new images from the same distribution then look different (measured: 9 of 20 in-distribution windows
    # alarmed with an 8-component PCA, against 0 of 20 with this).
    comps = np.random.default_rng(0).standard_normal((EMBED_DIMS, thumbs.shape[1])) / math.sqrt(thumbs.shape[1])
    embedded = (thumbs - mean) @ comps.T
    classes = np.sum([o[2] for o in outputs], axis=0) if outputs else np.zeros(len(class_names))
    return {
        "version": PROFILE_VERSION,
        "source": source,
        "images": len(images),
        "conf": float(conf),
        "class_names": list(class_names),
        "scalars": {k: [round(float(v), 6) for v in vals if not math.isnan(v)] for k, vals in values.items()},
        "classes": [float(c) for c in classes],
        "class_images": int(sum(1 for o in outputs if o[0] > 0)),
        "embedding": {
            "mean": [round(float(v), 6) for v in mean],
            "components": [[round(float(v), 6) for v in row] for row in comps],
            "values": [[round(float(v), 5) for v in row] for row in embedded],
            "bandwidth": _median_distance(embedded),
        },
    }


def profile_of(
    records: Sequence[Any],
    detections: Callable[[Any], tuple[Any, Any] | None],
    conf: float,
    class_names: Sequence[str],
    source: str,
) -> dict[str, Any] | None:
    """The profile of ``records`` (each with an ``image`` path) and the model's ``detections(record)`` on each
    ((scores, labels), or None to leave the record out); None when fewer than 2 images are left."""
    images, outputs = [], []
    for r in records:
        dets = detections(r)
        if dets is None:
            continue
        images.append(file_features(r.image))
        outputs.append(output_features(*dets, conf, len(class_names)))
    if len(images) < 2:
        return None
    return build_profile(images, outputs, conf, class_names, f"{source} ({len(images)} images)")


def _median_distance(x: np.ndarray) -> float:
    d = np.sqrt(np.maximum(_sqdist(x, x), 0))
    iu = np.triu_indices(len(x), 1)
    med = float(np.median(d[iu])) if len(iu[0]) else 1.0
    return med if med > 0 else 1.0


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T


def check_profile(profile: Any) -> dict[str, Any] | None:
    """``profile`` when it is one this vocdet reads, else None (a model without one serves with drift unavailable)."""
    if isinstance(profile, dict) and profile.get("version") == PROFILE_VERSION and "scalars" in profile:
        return profile
    return None


# ----------------------------------------------------------------------------------------------- tests
@dataclass
class FeatureResult:
    test: str  # ks, chi2, mmd
    statistic: float
    p_value: float
    threshold: float  # the p-value under which the feature drifts
    samples: int

    @property
    def drifted(self) -> bool:
        return self.p_value < self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "statistic": round(self.statistic, 6),
            "p_value": float(f"{self.p_value:.6g}"),
            "threshold": float(f"{self.threshold:.6g}"),
            "samples": self.samples,
            "drifted": self.drifted,
        }


class Reference:
    """A profile, unpacked once into arrays for the tests."""

    def __init__(self, profile: dict[str, Any]):
        self.profile = profile
        self.conf = float(profile["conf"])
        self.nc = len(profile["class_names"])
        self.scalars = {k: np.sort(np.asarray(v, np.float64)) for k, v in profile["scalars"].items() if len(v) >= 2}
        e = profile["embedding"]
        self.mean = np.asarray(e["mean"], np.float64)
        self.components = np.asarray(e["components"], np.float64)
        self.embedded = np.asarray(e["values"], np.float64)
        self.bandwidth = float(e["bandwidth"])
        self.classes = np.asarray(profile["classes"], np.float64)
        self.class_images = int(profile.get("class_images", 0))

    def embed(self, thumbs: np.ndarray) -> np.ndarray:
        return (np.asarray(thumbs, np.float64) - self.mean) @ self.components.T

    def tests(self) -> list[str]:
        names = [k for k in SCALARS if k in self.scalars]
        if self.class_images >= 2 and self.classes.sum() > 0:
            names.append("classes")
        if len(self.embedded) >= 2:
            names.append("embedding")
        return names


def compare(
    reference: Reference,
    scalars: dict[str, np.ndarray],
    thumbs: np.ndarray,
    class_counts: np.ndarray,
    alpha: float,
    permutations: int = 2000,
    seed: int = 0,
) -> dict[str, FeatureResult]:
    """Each feature of a window (``scalars`` by name, NaN = not available; ``thumbs`` (n, 768); ``class_counts``
    (n, nc) of the images whose detections count) against ``reference``; Bonferroni over the tests run."""
    from scipy import stats

    names = reference.tests()
    threshold = alpha / max(len(names), 1)
    out: dict[str, FeatureResult] = {}
    for name in names:
        if name == "classes":
            counts = np.asarray(class_counts, np.float64).reshape(-1, reference.nc)
            with_dets = counts[counts.sum(1) > 0]
            if len(with_dets) < 2:
                continue
            out[name] = _class_test(reference, with_dets, threshold, stats)
        elif name == "embedding":
            if len(thumbs) < 2:
                continue
            out[name] = _mmd_test(reference, reference.embed(thumbs), threshold, permutations, seed)
        else:
            window = np.asarray(scalars.get(name, ()), np.float64)
            window = np.round(window[~np.isnan(window)], 6)  # as the profile stores them: a constant stays equal
            if len(window) < 2:
                continue
            ks = stats.ks_2samp(window, reference.scalars[name], method="asymp")
            out[name] = FeatureResult("ks", float(ks.statistic), float(ks.pvalue), threshold, len(window))
    return out


def _class_test(reference: Reference, counts: np.ndarray, threshold: float, stats: Any) -> FeatureResult:
    """Chi-square on class frequencies, each side scaled to one observation per image that has detections."""
    window = counts.sum(0)
    ref = reference.classes
    keep = (window + ref) > 0
    a = window[keep] / window.sum() * len(counts)
    b = ref[keep] / ref.sum() * reference.class_images
    if keep.sum() < 2:
        return FeatureResult("chi2", 0.0, 1.0, threshold, len(counts))
    chi2, p, _, _ = stats.chi2_contingency(np.stack([a, b]), correction=False)
    return FeatureResult("chi2", float(chi2), float(p), threshold, len(counts))


def _mmd_test(
    reference: Reference, window: np.ndarray, threshold: float, permutations: int, seed: int
) -> FeatureResult:
    """Biased MMD² with a Gaussian kernel; p-value from random relabellings (seeded): ``permutations``, and at least
    enough for the smallest p-value to fall under ``threshold``."""
    rng = np.random.default_rng(seed)
    permutations = max(int(permutations), math.ceil(2 / threshold))
    ref = reference.embedded
    if len(ref) > MMD_SAMPLES:
        ref = ref[rng.choice(len(ref), MMD_SAMPLES, replace=False)]
    if len(window) > MMD_SAMPLES:
        window = window[rng.choice(len(window), MMD_SAMPLES, replace=False)]
    n, m = len(window), len(ref)
    z = np.concatenate([window, ref])
    k = np.exp(-np.maximum(_sqdist(z, z), 0) / (2 * reference.bandwidth**2)).astype(np.float32)
    base = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)]).astype(np.float32)
    observed = float(base @ k @ base)
    w = rng.permuted(np.tile(base, (permutations, 1)), axis=1).T  # (n + m, P): one relabelling per column
    null = np.einsum("ip,ip->p", k @ w, w)
    p = (1.0 + float((null >= observed - 1e-12).sum())) / (permutations + 1.0)
    return FeatureResult("mmd", max(observed, 0.0), p, threshold, n)


class DriftWindow:
    """The last ``size`` observations (image features and, when their detections count, outputs) of one model and
    their comparison with its reference. ``add`` is cheap and thread-safe; ``evaluate`` runs the tests."""

    def __init__(self, profile: dict[str, Any], size: int, alpha: float, permutations: int = 2000):
        import collections
        import threading

        import scipy.stats  # noqa: F401  (imported here, at model load, not at the first test on a serving thread)

        self.reference = Reference(profile)
        self.size, self.alpha, self.permutations = int(size), float(alpha), int(permutations)
        self._items: collections.deque = collections.deque(maxlen=self.size)
        self._lock = threading.Lock()
        self.seen = 0  # observations ever added

    def __len__(self) -> int:
        return len(self._items)

    def add(
        self,
        features: tuple[np.ndarray, np.ndarray],
        scores: Sequence[float] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        """One image: its ``image_features`` and, when its detections were taken at a threshold no higher than the
        reference's, their ``scores``/``labels`` (None: the outputs of this image are left out)."""
        out = None if scores is None else output_features(scores, labels, self.reference.conf, self.reference.nc)
        with self._lock:
            self._items.append((features[0], features[1], out))
            self.seen += 1

    def evaluate(self, seed: int = 0) -> dict[str, Any]:
        """``{"window", "alarm", "features": {name: FeatureResult.as_dict()}}`` for the current window."""
        with self._lock:
            items = list(self._items)
        results: dict[str, FeatureResult] = {}
        if items:
            scal = np.stack([i[0] for i in items])
            values = {name: scal[:, j] for j, name in enumerate(IMAGE_FEATURES)}
            outs = [i[2] for i in items if i[2] is not None]
            values["detections"] = np.array([o[0] for o in outs])
            values["top_score"] = np.array([o[1] for o in outs])
            counts = np.stack([o[2] for o in outs]) if outs else np.zeros((0, self.reference.nc))
            thumbs = np.stack([i[1] for i in items])
            results = compare(self.reference, values, thumbs, counts, self.alpha, self.permutations, seed)
        return {
            "window": len(items),
            "alarm": any(r.drifted for r in results.values()),
            "drifted": sorted(k for k, r in results.items() if r.drifted),
            "features": {k: r.as_dict() for k, r in results.items()},
        }


__all__ = [
    "IMAGE_FEATURES",
    "OUTPUT_FEATURES",
    "DriftWindow",
    "FeatureResult",
    "Reference",
    "build_profile",
    "check_profile",
    "compare",
    "evenly",
    "file_features",
    "image_features",
    "jpeg_quality",
    "output_features",
    "profile_of",
]
