"""The drift features and tests (``vocdet.core.drift``) on generated images: each feature moves with the corruption it
stands for, in-distribution windows stay quiet at the promised rate, shifted ones raise the alarm on the right
feature."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vocdet.core.drift import DriftWindow, build_profile, image_features, jpeg_quality, output_features


def scene(rng: np.random.Generator, h: int = 96, w: int = 128) -> np.ndarray:
    """A textured background with a few filled shapes (like the synthetic set, smaller)."""
    img = np.clip(rng.normal(rng.uniform(80, 170), 14, (h, w, 3)), 0, 255).astype(np.uint8)
    for _ in range(rng.integers(1, 4)):
        x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.rectangle(img, (x, y), (x + int(rng.integers(8, 20)), y + int(rng.integers(8, 20))), colour, -1)
    return img


def encoded(img: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def observe(img: np.ndarray, quality: int = 90) -> tuple[np.ndarray, np.ndarray]:
    data = encoded(img, quality)
    return image_features(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1], data)


def fake_outputs(rng: np.random.Generator) -> tuple[list[float], list[int]]:
    n = int(rng.integers(0, 4))
    return list(rng.uniform(0.1, 0.9, n)), list(rng.integers(0, 3, n))


@pytest.fixture(scope="module")
def profile() -> dict:
    rng = np.random.default_rng(0)
    images, outputs = [], []
    for _ in range(150):
        images.append(observe(scene(rng)))
        outputs.append(output_features(*fake_outputs(rng), 0.25, 3))
    return build_profile(images, outputs, 0.25, ["a", "b", "c"], "generated")


@pytest.mark.parametrize("quality", [30, 50, 75, 92, 100])
def test_jpeg_quality_is_read_from_the_quantisation_table(quality: int) -> None:
    img = scene(np.random.default_rng(1))
    assert jpeg_quality(encoded(img, quality)) == pytest.approx(quality, abs=1)
    png = cv2.imencode(".png", img)[1].tobytes()
    assert np.isnan(jpeg_quality(png)) and np.isnan(jpeg_quality(b"")) and np.isnan(jpeg_quality(b"\xff\xd8\xff"))


def test_each_feature_moves_with_its_corruption() -> None:
    img = scene(np.random.default_rng(2))
    names = ("brightness", "contrast", "saturation", "sharpness", "noise", "width", "height", "aspect")
    base = dict(zip(names, image_features(img)[0]))
    dark = dict(zip(names, image_features((img * 0.4).astype(np.uint8))[0]))
    blur = dict(zip(names, image_features(cv2.GaussianBlur(img, (0, 0), 2))[0]))
    noisy = dict(
        zip(
            names,
            image_features(np.clip(img + np.random.default_rng(3).normal(0, 30, img.shape), 0, 255).astype(np.uint8))[
                0
            ],
        )
    )
    grey = dict(zip(names, image_features(np.repeat(img.mean(2, keepdims=True), 3, 2).astype(np.uint8))[0]))
    assert dark["brightness"] < 0.5 * base["brightness"] and dark["contrast"] < base["contrast"]
    assert blur["sharpness"] < base["sharpness"] - 1 and blur["noise"] < base["noise"]
    assert noisy["noise"] > 1.5 * base["noise"] and noisy["sharpness"] > base["sharpness"]
    assert grey["saturation"] == 0 < base["saturation"]
    assert (base["width"], base["height"], base["aspect"]) == (128, 96, pytest.approx(128 / 96))


def test_output_features_count_at_the_threshold() -> None:
    n, top, counts = output_features([0.9, 0.3, 0.1], [2, 0, 1], 0.25, 3)
    assert (n, top, counts.tolist()) == (2, 0.9, [1, 0, 1])
    assert output_features([], [], 0.25, 3)[:2] == (0, 0.0)


def _window(profile: dict, images: list[np.ndarray], rng: np.random.Generator, **outputs) -> DriftWindow:
    w = DriftWindow(profile, size=len(images), alpha=0.01, permutations=500)
    for img in images:
        scores, labels = fake_outputs(rng)
        w.add(observe(img), outputs.get("scores", scores), outputs.get("labels", labels))
    return w


def test_in_distribution_windows_rarely_alarm(profile: dict) -> None:
    """20 disjoint windows of 100 new images from the reference's distribution: alarms at about the promised rate
    (alpha = 1 %: 0 expected; at most 1 accepted, the rate is a bound, not a guarantee for a few windows)."""
    rng = np.random.default_rng(10)
    alarms = [_window(profile, [scene(rng) for _ in range(100)], rng).evaluate()["alarm"] for _ in range(20)]
    assert sum(alarms) <= 1, alarms


@pytest.mark.parametrize(
    ("corruption", "feature"),
    [
        (lambda img, rng: (img * 0.5).astype(np.uint8), "brightness"),
        (lambda img, rng: cv2.GaussianBlur(img, (0, 0), 2), "sharpness"),
        (lambda img, rng: np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8), "noise"),
        (lambda img, rng: cv2.resize(img, (160, 90)), "aspect"),
        (lambda img, rng: np.repeat(img.mean(2, keepdims=True), 3, 2).astype(np.uint8), "saturation"),
    ],
    ids=["dark", "blur", "noise", "resized", "greyscale"],
)
def test_a_shifted_window_alarms_on_the_right_feature(profile: dict, corruption, feature: str) -> None:
    rng = np.random.default_rng(20)
    report = _window(profile, [corruption(scene(rng), rng) for _ in range(100)], rng).evaluate()
    assert report["alarm"] and feature in report["drifted"], report["drifted"]
    assert report["features"][feature]["p_value"] < report["features"][feature]["threshold"]


def test_the_embedding_and_the_outputs_drift(profile: dict) -> None:
    """Another layout (light from above: a vertical gradient, the same mean brightness) moves the embedding; a model
    that suddenly finds nothing moves the output features."""
    rng = np.random.default_rng(30)
    ramp = np.linspace(-40, 40, 96)[:, None, None]

    def lit(rng: np.random.Generator) -> np.ndarray:
        return np.clip(scene(rng) + ramp, 0, 255).astype(np.uint8)

    report = _window(profile, [lit(rng) for _ in range(100)], rng).evaluate()
    assert "embedding" in report["drifted"], report["features"]["embedding"]
    quiet = _window(profile, [scene(rng) for _ in range(100)], rng, scores=[], labels=[]).evaluate()
    assert {"detections", "top_score"} <= set(quiet["drifted"]), quiet["drifted"]
