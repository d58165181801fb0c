"""How well ``vocdet serve``'s drift detection works: ``python -m vocdet.bench.drift [--checkpoint C]``.

The model (default: the ``make train`` checkpoint, which carries its reference profile) sees a stream of new images
from the distribution it was trained on (its synthetic generator, another seed), then streams that drift. Features
and detections are taken exactly as the server takes them (``image_features`` of the uploaded bytes, the
``Detector`` at its default threshold), and windows are tested with the server's ``DriftWindow``.

* **false-alarm rate**: the share of in-distribution windows that raise the alarm — disjoint windows of 100
  images, and windows of ``serve.drift_window`` (500) sliding by 100 (what an operator sees every evaluation);
* **detection delay**: after in-distribution traffic fills the window, drifted images arrive (``vocdet robustness``'s
  corruptions at severity 2: darkened ×0.5, blurred σ 2, Gaussian noise σ 31; real VOC photos); the window is tested every 10 requests, and the delay is the
  number of drifted requests until the first alarm, with the features that raised it.

Writes ``<out>/drift.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vocdet.bench.common import SAMPLE
from vocdet.core.checkpoint import load_checkpoint
from vocdet.core.drift import DriftWindow, image_features
from vocdet.core.images import decode_image
from vocdet.infer.detector import Detector
from vocdet.infer.robustness import corrupt

DEFAULT_CKPT = Path("runs/quickstart/checkpoints/best.ckpt")
STEP = 10  # requests between two tests while measuring the delay
SEVERITY = 2  # of the corruptions the drifted streams use


def observe(detector: Detector, blobs: list[bytes]) -> list[tuple[Any, list[float], list[int]]]:
    """(features, scores, labels) of each upload, as the server computes them."""
    out = []
    for i, data in enumerate(blobs):
        img = decode_image(data, f"image {i}")
        dets = detector.predict(img)[0]
        out.append((image_features(img, data), [d.score for d in dets], [d.class_id for d in dets]))
    return out


def window_of(profile: dict, items: list, size: int, alpha: float, permutations: int) -> DriftWindow:
    w = DriftWindow(profile, size, alpha, permutations)
    for feats, scores, labels in items:
        w.add(feats, scores, labels)
    return w


def false_alarms(profile: dict, items: list, size: int, stride: int, alpha: float, perms: int) -> dict[str, Any]:
    starts = range(0, len(items) - size + 1, stride)
    reports = [window_of(profile, items[s : s + size], size, alpha, perms).evaluate() for s in starts]
    features: dict[str, int] = {}
    for r in reports:
        for f in r["drifted"]:
            features[f] = features.get(f, 0) + 1
    alarms = sum(r["alarm"] for r in reports)
    return {"window": size, "stride": stride, "windows": len(reports), "alarms": alarms,
            "rate": alarms / max(len(reports), 1), "features": features}  # fmt: skip


def delay(profile: dict, before: list, after: list, size: int, alpha: float, perms: int) -> dict[str, Any]:
    w = window_of(profile, before[-size:], size, alpha, perms)
    for n, (feats, scores, labels) in enumerate(after, 1):
        w.add(feats, scores, labels)
        if n % STEP == 0:
            r = w.evaluate()
            if r["alarm"]:
                return {"window": size, "delay_requests": n, "features": r["drifted"]}
    return {"window": size, "delay_requests": None, "features": []}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m vocdet.bench.drift", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT, help="model with a reference profile")
    p.add_argument("--images", type=int, default=3000, help="new in-distribution images (default 3000)")
    p.add_argument("--window", type=int, default=500, help="serve.drift_window (default 500)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    s = p.parse_args(argv)
    import vocdet
    from vocdet.config import from_dict

    ckpt = load_checkpoint(s.checkpoint)
    profile = ckpt["vocdet"].get("drift")
    if not profile:
        raise SystemExit(f"error: {s.checkpoint} carries no drift profile (train it with this vocdet)")
    cfg = from_dict(ckpt["vocdet"]["config"])
    alpha, perms = float(cfg.drift.alpha), int(cfg.drift.permutations)
    detector = Detector.from_loaded_checkpoint(ckpt, source=str(s.checkpoint))
    synth = cfg.data.synth
    start = time.perf_counter()
    root = vocdet.synthesize_voc(
        s.out / "drift-synth", images=s.images, seed=int(synth.seed) + 1000, size=int(synth.size), val_fraction=0.0
    )
    blobs = [f.read_bytes() for f in sorted((root / "JPEGImages").glob("*.jpg"))]
    print(f"{len(blobs)} new images from the training generator (seed {int(synth.seed) + 1000}); observing...")
    fresh = observe(detector, blobs)
    result: dict[str, Any] = {
        "checkpoint": str(s.checkpoint),
        "reference_images": profile["images"],
        "alpha": alpha,
        "false_alarms": [
            false_alarms(profile, fresh, 100, 100, alpha, perms),
            false_alarms(profile, fresh, s.window, 100, alpha, perms),
        ],
        "delay": {},
    }
    real = [f.read_bytes() for f in sorted((SAMPLE / "JPEGImages").glob("*.jpg"))]
    tail = blobs[-s.window :]
    streams = {how: [corrupt(d, how, SEVERITY, i) for i, d in enumerate(tail)] for how in ("dark", "blur", "noise")}
    streams["real VOC photos"] = (real * (s.window // max(len(real), 1) + 1))[: s.window]
    for how, stream in streams.items():
        after = observe(detector, stream)
        result["delay"][how] = [delay(profile, fresh, after, size, alpha, perms) for size in (100, s.window)]
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"\nreference: {profile['images']} validation images; alpha {alpha} (family-wise, per test)")
    for fa in result["false_alarms"]:
        print(
            f"false alarms, window {fa['window']} (stride {fa['stride']}): {fa['alarms']} of {fa['windows']} "
            f"windows ({100 * fa['rate']:.1f} %) {fa['features'] or ''}"
        )
    for how, rows in result["delay"].items():
        text = ", ".join(
            f"window {r['window']}: {r['delay_requests'] if r['delay_requests'] else 'none'}"
            + (f" ({', '.join(r['features'])})" if r["features"] else "")
            for r in rows
        )
        print(f"delay to alarm, {how}: {text}")
    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / "drift.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {s.out / 'drift.json'} ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
