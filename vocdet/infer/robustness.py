"""``vocdet robustness``: how a model holds up when its inputs drift, in numbers.

The validation split is scored under each corruption at each severity (ImageNet-C's recipes and levels where it
has them, Hendrycks & Dietterich 2019; deterministic: the noise of image ``i`` at severity ``s`` is seeded by
``(i, s)``), with vocdet's metric, and the corrupted images go through the same drift tests ``vocdet serve`` runs
(one window of all of them against the model's reference profile). Each corrupted image is JPEG-encoded (at its
original's quality) and decoded back first: exactly the bytes a client would upload.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vocdet.core.detections import detections_to_predictions
from vocdet.core.drift import DriftWindow, evenly, image_features, jpeg_quality
from vocdet.core.files import staged_dir, write_json
from vocdet.core.images import decode_image
from vocdet.core.metrics import GroundTruth, evaluate_detections
from vocdet.core.voc import split_records
from vocdet.errors import VocdetError
from vocdet.infer.detector import Detector

log = logging.getLogger("vocdet")


def _brightness(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 2] = np.clip(hsv[..., 2] + 255 * (0.1, 0.2, 0.3, 0.4, 0.5)[s - 1], 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _dark(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    return (img.astype(np.float32) * (0.7, 0.5, 0.35, 0.25, 0.15)[s - 1]).round().astype(np.uint8)


def _contrast(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[s - 1]
    x = img.astype(np.float32)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - mean) * c + mean, 0, 255).round().astype(np.uint8)


def _blur(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    sigma = (1, 2, 3, 4, 6)[s - 1]
    return cv2.GaussianBlur(img, (0, 0), sigma)


def _noise(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    std = 255 * (0.08, 0.12, 0.18, 0.26, 0.38)[s - 1]
    return np.clip(img.astype(np.float32) + rng.normal(0, std, img.shape), 0, 255).round().astype(np.uint8)


def _saturate(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] * (0.3, 0.1, 2.0, 5.0, 20.0)[s - 1], 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


JPEG_QUALITY = (25, 18, 15, 10, 7)
CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray] | None] = {
    "brightness": _brightness,
    "dark": _dark,
    "contrast": _contrast,
    "blur": _blur,
    "noise": _noise,
    "jpeg": None,  # the encoding itself, at JPEG_QUALITY
    "saturate": _saturate,
}


def corrupt(data: bytes, name: str, severity: int, seed: int) -> bytes:
    """The JPEG bytes of image ``data`` under corruption ``name`` at ``severity`` (1-5; 0 = the image as it is)."""
    if severity == 0:
        return data
    img = decode_image(data)
    fn = CORRUPTIONS[name]
    quality = JPEG_QUALITY[severity - 1] if fn is None else _quality_of(data)
    if fn is not None:
        img = fn(img, severity, np.random.default_rng([seed, severity]))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise VocdetError(f"could not encode the corrupted image ({name}, severity {severity})")
    return buf.tobytes()


def _quality_of(data: bytes) -> int:
    q = jpeg_quality(data)
    return 95 if math.isnan(q) else round(q)


def parse_severities(text: str | list[int] | Any) -> list[int]:
    """'1-5', '1,3,5' or a list -> sorted severities, each 1..5."""
    if isinstance(text, str):
        out: set[int] = set()
        for part in text.split(","):
            part = part.strip()
            try:
                lo, _, hi = part.partition("-")
                out.update(range(int(lo), int(hi or lo) + 1))
            except ValueError:
                raise VocdetError(f"severities '{text}': give numbers 1-5 as '1-5' or '1,3,5'") from None
        values = sorted(out)
    else:
        values = sorted({int(v) for v in text})
    if not values or any(not 1 <= v <= 5 for v in values):
        raise VocdetError(f"severities {values}: each must be between 1 and 5 (e.g. --severities 1-5)")
    return values


def check_corruptions(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
        raise VocdetError(
            f"unknown corruption {', '.join(repr(n) for n in unknown) or '(none given)'}; choose from "
            f"{', '.join(CORRUPTIONS)}"
        )
    return list(dict.fromkeys(names))


def robustness(
    detector: Detector, cfg: Any, corruptions: list[str], severities: list[int], limit: int = 0
) -> list[dict[str, Any]]:
    """One row per (corruption, severity), plus the clean row (severity 0): mAP50, mAP50-95 and the drift test."""
    corruptions, severities = check_corruptions(corruptions), parse_severities(severities)
    records = evenly(split_records(cfg.data, "val", detector.class_names, cfg.run.seed), limit)
    if not records:
        raise VocdetError(f"no validation images under {cfg.data.root}; robustness scores the validation split")
    gts = {r.id: GroundTruth(r.boxes, r.labels, r.difficult) for r in records}
    originals = [Path(r.image).read_bytes() for r in records]
    profile = detector.drift_profile
    conf = max(cfg.eval.conf, detector.conf) if detector.nms_in_graph else cfg.eval.conf
    rows = []
    for name, severity in [("none", 0), *[(c, s) for c in corruptions for s in severities]]:
        window = DriftWindow(profile, len(records), cfg.drift.alpha, cfg.drift.permutations) if profile else None
        preds = {}
        for i, (r, data) in enumerate(zip(records, originals)):
            blob = corrupt(data, name, severity, i) if severity else data
            img = decode_image(blob, r.image)
            dets = detector.predict(img, conf=conf)[0]
            preds[r.id] = detections_to_predictions(dets, detector.box_origin)
            if window is not None:
                window.add(image_features(img, blob), [d.score for d in dets], [d.class_id for d in dets])
        result = evaluate_detections(gts, preds, detector.class_names)
        row: dict[str, Any] = {
            "corruption": name,
            "severity": severity,
            "map50": round(float(result["map50"]), 5),
            "map50_95": round(float(result["map50_95"]), 5),
            "images": len(records),
        }
        if window is not None:
            report = window.evaluate()
            strongest = min(report["features"].items(), key=lambda kv: kv[1]["p_value"], default=(None, None))
            row.update(
                drift_alarm=report["alarm"],
                drifted=" ".join(report["drifted"]),
                strongest_feature=strongest[0],
                strongest_statistic=strongest[1]["statistic"] if strongest[1] else None,
                strongest_p_value=strongest[1]["p_value"] if strongest[1] else None,
            )
        rows.append(row)
        log.info(
            "%s severity %d: mAP50 %.4f, mAP50-95 %.4f%s",
            name, severity, row["map50"], row["map50_95"],
            f", drift {'ALARM ' + row['drifted'] if row.get('drift_alarm') else 'none'}" if window else "",
        )  # fmt: skip
    return rows


def run_robustness(
    model: str | Path,
    *,
    config_files: list[str | Path] | None = None,
    overrides: list[str] | None = None,
) -> tuple[list[dict[str, Any]], list[Path]]:
    """``vocdet robustness``: score ``model`` (a checkpoint, whose config is the base, or an export, which needs
    ``data.root``) under ``robustness.*``; writes the report to ``robustness.output`` (default: the run's
    ``plots/`` for a checkpoint in its run folder, else ``robustness/`` beside the model) and logs it to the
    training run's W&B."""
    from vocdet.config import Config, load_config

    model = Path(model)
    ckpt = None
    if model.suffix.lower() == ".ckpt":
        from vocdet.core.checkpoint import load_checkpoint

        ckpt = load_checkpoint(model)
        base = dict(ckpt["vocdet"]["config"])
        base["trainer"] = Config().trainer
        cfg = load_config(config_files, overrides, base=base)
        detector = Detector.from_loaded_checkpoint(ckpt, config=cfg, source=str(model))
    else:
        cfg = load_config(config_files, overrides)
        detector = Detector.load(model, predict=cfg.predict)
    r = cfg.robustness
    rows = robustness(detector, cfg, list(r.corruptions), list(r.severities), r.images)
    in_run = ckpt is not None and model.resolve().parent.name == "checkpoints"
    folder = (
        Path(r.output)
        if r.output
        else model.resolve().parent.parent / "plots"
        if in_run
        else model.parent / "robustness"
    )
    paths = write_report(rows, folder, f"{model.name}: mAP under corruption ({rows[0]['images']} validation images)")
    if ckpt is not None:
        from vocdet.core.artifacts import log_robustness

        log_robustness(model, cfg, ckpt["vocdet"].get("wandb_id"), rows, paths[2])
    return rows, paths


def write_report(rows: list[dict[str, Any]], folder: Path, title: str) -> list[Path]:
    """``robustness.json``, ``robustness.csv`` and ``robustness.png`` (mAP50 against severity) in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = ["robustness.json", "robustness.csv", "robustness.png"]
    with staged_dir(folder) as staging:
        write_json(staging / names[0], rows)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with (staging / names[1]).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        clean = next((r for r in rows if r["severity"] == 0), None)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, metric in zip(axes, ("map50", "map50_95")):
            for c in dict.fromkeys(r["corruption"] for r in rows if r["severity"]):
                pts = sorted((r["severity"], r[metric]) for r in rows if r["corruption"] == c)
                if clean:
                    pts = [(0, clean[metric]), *pts]
                ax.plot(*zip(*pts), marker="o", label=c)
            ax.set_xlabel("severity (0 = clean)")
            ax.set_ylabel(metric.replace("map", "mAP").replace("_", "-"))
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(staging / names[2], dpi=100)
        plt.close(fig)
    return [folder / n for n in names]


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The table ``vocdet robustness`` prints."""
    lines = [f"{'corruption':<12}{'sev':>4}{'mAP50':>9}{'mAP50-95':>10}  drift"]
    for r in rows:
        drift = (
            ("ALARM: " + r["drifted"]) if r.get("drift_alarm") else "none" if "drift_alarm" in r else "n/a (no profile)"
        )
        lines.append(f"{r['corruption']:<12}{r['severity']:>4}{r['map50']:>9.4f}{r['map50_95']:>10.4f}  {drift}")
    return "\n".join(lines)


__all__ = [
    "CORRUPTIONS",
    "corrupt",
    "format_rows",
    "parse_severities",
    "robustness",
    "run_robustness",
    "write_report",
]
