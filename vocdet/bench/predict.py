"""Inference latency and throughput: ``Detector`` (PyTorch, ONNX Runtime) vs Ultralytics' ``YOLO.predict``.

``make bench-predict`` (``python -m vocdet.bench.predict``). One checkpoint is written as an Ultralytics ``.pt``
and a dynamic-batch ONNX file, so all three run the same weights; each call goes from an image path to final
boxes (decode -> letterbox -> forward -> NMS). Every runner uses the same number of threads: Ultralytics sets
torch to ``cpu_count - 1`` threads when its predictor starts, so the thread count is set again after its warm-up
(its own choice is measured too, for reference). Results go to ``runs/bench/predict.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vocdet.bench.common import SAMPLE
from vocdet.core.images import find_images
from vocdet.infer.detector import Detector

DEFAULT_CKPT = Path("runs/quickstart/checkpoints/best.ckpt")


def latency(runners: dict[str, Callable[[Path], Any]], images: list[Path], n: int, warmup: int = 5) -> dict[str, Any]:
    """Single-image end-to-end latency in ms (median, mean, p90) of each runner over ``n`` distinct images.

    The runners take turns on each image (rotating who goes first), so a noisy neighbour on the machine slows
    all of them alike instead of whichever happened to be running; each call starts after a short idle gap, as a
    single request would (ONNX Runtime's and torch's thread pools spin for a while after a call and would
    otherwise slow down whichever runner comes next).
    """
    names = list(runners)
    for p in images[:warmup]:
        for name in names:
            runners[name](p)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        p = images[(warmup + i) % len(images)]
        for name in names[i % len(names) :] + names[: i % len(names)]:
            time.sleep(0.05)  # an idle process between requests: no thread pool still spinning from the last call
            t = time.perf_counter()
            runners[name](p)
            times[name].append((time.perf_counter() - t) * 1000)
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = {"median_ms": statistics.median(ts), "mean_ms": statistics.mean(ts), "p90_ms": ts[int(0.9 * n)]}
    return out


def throughput(fn: Callable[[list[Path]], Any], images: list[Path], batch: int, n: int) -> float:
    """Images per second predicting ``n`` images ``batch`` at a time (after one warm-up batch)."""
    fn(images[:batch])
    t = time.perf_counter()
    for i in range(0, n, batch):
        fn([images[(i + j) % len(images)] for j in range(batch)])
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m vocdet.bench.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT, help="default: the `make train` model")
    p.add_argument(
        "--images", type=str, default=str(SAMPLE / "JPEGImages"), help="image folder (default: the real VOC sample)"
    )
    p.add_argument(
        "--real-checkpoint",
        type=Path,
        help="a model trained on real VOC photos: its PyTorch, ONNX and int8 variants are scored on the VOC sample",
    )
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--n", type=int, default=50, help="timed single-image calls per runner")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    s = p.parse_args(argv)
    from vocdet.errors import VocdetError
    from vocdet.infer.export import export

    if not s.checkpoint.is_file():
        raise SystemExit(f"error: checkpoint {s.checkpoint} not found (run `make train` or give --checkpoint)")
    images = find_images([s.images])
    torch.set_num_threads(s.threads)
    s.out.mkdir(parents=True, exist_ok=True)
    try:
        pt = export(s.checkpoint, overrides=["export.format=ultralytics", f"export.output={s.out / 'predict.pt'}"])
        onnx_path = export(
            s.checkpoint, overrides=["export.dynamic_batch=true", f"export.output={s.out / 'predict.onnx'}"]
        )
        int8_path = export(
            s.checkpoint,
            overrides=["export.dynamic_batch=true", "export.int8=true", f"export.output={s.out / 'predict-int8.onnx'}"],
        )
    except VocdetError as e:
        raise SystemExit(f"error: {e}") from None

    from ultralytics import YOLO

    yolo = YOLO(str(pt))

    def ultra(src: Any, **kw: Any) -> Any:
        return yolo.predict(src, imgsz=s.imgsz, verbose=False, **kw)

    results: dict[str, Any] = {"settings": {**{k: str(v) for k, v in vars(s).items()}, "images": len(images)}}
    ultra(images[0])
    own = latency({"ultralytics": ultra}, images, s.n)["ultralytics"]
    results["ultralytics_own_threads"] = {"threads": torch.get_num_threads(), **own}
    torch.set_num_threads(s.threads)  # Ultralytics' predictor set cpu_count - 1; compare at equal threads
    det_torch = Detector.from_checkpoint(s.checkpoint, imgsz=s.imgsz)
    det_onnx = Detector.from_onnx(onnx_path, imgsz=s.imgsz, threads=s.threads)
    det_int8 = Detector.from_onnx(int8_path, imgsz=s.imgsz, threads=s.threads)
    runners = {"ultralytics": ultra, "torch": det_torch.predict, "onnx": det_onnx.predict, "int8": det_int8.predict}
    results.update(latency(runners, images, s.n))
    n = 6 * s.batch
    for name, det in (("torch", det_torch), ("onnx", det_onnx), ("int8", det_int8)):
        results[name]["batch1_img_s"] = throughput(lambda b, d=det: d.predict(b, batch_size=1), images, 1, n)
        results[name][f"batch{s.batch}_img_s"] = throughput(
            lambda b, d=det: d.predict(b, batch_size=s.batch), images, s.batch, n
        )
    results["ultralytics"]["batch1_img_s"] = throughput(lambda b: ultra(b, batch=1), images, 1, n)
    results["ultralytics"][f"batch{s.batch}_img_s"] = throughput(lambda b: ultra(b, batch=s.batch), images, s.batch, n)
    ref = results["ultralytics"]["median_ms"]
    results["torch_latency_ratio"] = results["torch"]["median_ms"] / ref
    results["onnx_latency_ratio"] = results["onnx"]["median_ms"] / ref
    results["int8_latency_ratio"] = results["int8"]["median_ms"] / ref
    results["int8_batch_ratio"] = (
        results["int8"][f"batch{s.batch}_img_s"] / results["ultralytics"][f"batch{s.batch}_img_s"]
    )
    results["map50"] = {"val split": accuracy(s.checkpoint, {"torch": det_torch, "onnx": det_onnx, "int8": det_int8})}
    if s.real_checkpoint:
        results["map50"]["VOC sample"] = accuracy(s.real_checkpoint, variants(s.real_checkpoint, s.out), SAMPLE)
    print_table(results, s)
    (s.out / "predict.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {s.out / 'predict.json'}")
    return results


def variants(checkpoint: Path, out: Path) -> dict[str, Detector]:
    """``checkpoint`` as the three detectors the bench compares: PyTorch, ONNX fp32 and ONNX int8."""
    from vocdet.infer.export import export

    onnx = export(checkpoint, overrides=[f"export.output={out / 'real.onnx'}"])
    int8 = export(checkpoint, overrides=["export.int8=true", f"export.output={out / 'real-int8.onnx'}"])
    return {
        "torch": Detector.from_checkpoint(checkpoint),
        "onnx": Detector.from_onnx(onnx),
        "int8": Detector.from_onnx(int8),
    }


def accuracy(checkpoint: Path, detectors: dict[str, Detector], root: Path | None = None) -> dict[str, float]:
    """mAP50 (vocdet's metric, conf 0.001) of each detector at the checkpoint's training image size, on the
    checkpoint's validation split or on every image under ``root``."""
    from vocdet.config import load_config
    from vocdet.core.checkpoint import load_checkpoint
    from vocdet.infer import quantize

    base = load_checkpoint(checkpoint)["vocdet"]["config"]
    cfg = load_config(None, [f"data.root={root}"] if root else [], base=base)
    out: dict[str, float] = {}
    for name, det in detectors.items():
        size, det.imgsz = det.imgsz, int(base["data"]["imgsz"])
        out[name] = quantize.score(det, cfg, 500, split="all" if root else "val")[0]["map50"]
        det.imgsz = size
    return out


def print_table(r: dict[str, Any], s: argparse.Namespace) -> None:
    b = f"batch{s.batch}_img_s"
    print(
        f"\nyolov8n at {s.imgsz}, {s.threads} threads, {r['settings']['images']} real images, "
        f"decode -> letterbox -> forward -> NMS, median of {s.n} calls\n"
    )
    print(
        f"{'':24} {'median ms':>10} {'p90 ms':>8} {'÷ Ultralytics':>14} {'batch 1 img/s':>14} {'batch ' + str(s.batch) + ' img/s':>14}"
    )
    for name, label in (
        ("ultralytics", "Ultralytics YOLO.predict"),
        ("torch", "Detector (PyTorch)"),
        ("onnx", "Detector (ONNX Runtime)"),
        ("int8", "Detector (ONNX int8)"),
    ):
        x = r[name]
        ratio = x["median_ms"] / r["ultralytics"]["median_ms"]
        print(
            f"{label:24} {x['median_ms']:10.1f} {x['p90_ms']:8.1f} {ratio:14.2f} {x['batch1_img_s']:14.1f} {x[b]:14.1f}"
        )
    print("\nmAP50 (vocdet's metric, conf 0.001, at each model's training image size):")
    for where, scores in r["map50"].items():
        model = s.checkpoint if where == "val split" else s.real_checkpoint
        print(f"  {where:10} ({model}): " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    if "VOC sample" not in r["map50"]:
        print("  VOC sample: not scored (the quickstart model knows synthetic shapes; give --real-checkpoint)")
    own = r["ultralytics_own_threads"]
    print(f"(Ultralytics with its own thread choice, {own['threads']} threads: median {own['median_ms']:.1f} ms)")


if __name__ == "__main__":
    main()
