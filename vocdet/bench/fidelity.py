"""``make bench-fidelity``: does vocdet's *default* recipe train models as good as Ultralytics' trainer does?

Both trainers run vocdet's default recipe (nbs 64 -> gradient accumulation, warmup 3, close_mosaic 10, SGD lr0 0.01,
the schema's augmentation) from ``yolov8n.yaml`` on the same images, N training seeds each. Every model is scored
twice, by the same code for both sides: vocdet's metric (pycocotools-exact, on vocdet's validation pipeline) and
Ultralytics' validator (on each model converted to the other's format). Printed: mean +- std per side, the
difference of the means with a 95% confidence interval (Welch), and wall time.

Two datasets, made by two different generators, both written as standard 1-based VOC XML (and converted to YOLO
labels with the convention vocdet reads, so the race does not measure the conversion):

- ``synth``: vocdet's own synthetic set (``vocdet.data.synth``: 20 shape/colour classes on textured backgrounds);
- ``shapes2``: a second generator written for this check (``shapes2`` below): other shapes (rings, stars, outlined
  polygons, bars), wide size range with small objects, 0-8 objects per image, stripes/checkerboard/noise/photo-like
  backgrounds, images of 0.5-2 aspect ratio and several sizes.

``--ablate`` changes one recipe factor at a time (``nbs=16``, ``close_mosaic=0``, ``warmup_epochs=1``, ``imgsz=320``,
``mosaic=0``) so the factor behind a gap shows itself. Results go to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vocdet.bench.common import (
    BENCH_ENV,
    score_with_ultralytics,
    score_with_vocdet,
    synthetic_set,
    to_yolo,
    ultralytics_pt_to_vocdet,
    vocdet_ckpt_to_ultralytics,
)
from vocdet.bench.race import train_ultralytics, train_vocdet
from vocdet.core.voc import VOC_CLASSES

# One factor at a time against the default recipe: name -> (race setting, value), applied to both trainers.
ABLATIONS: dict[str, tuple[str, Any]] = {
    "nbs=16": ("nbs", 16),
    "close_mosaic=0": ("close_mosaic", 0),
    "warmup_epochs=1": ("warmup_epochs", 1.0),
    "imgsz=320": ("imgsz", 320),
    "mosaic=0": ("mosaic", 0.0),
}

# Two-sided 95% Student t quantiles by degrees of freedom (no scipy here); beyond 30 the normal's 1.96 is close.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip


def t975(df: float) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (linear between integer df)."""
    if df >= len(_T975):
        return 1.96
    lo = max(math.floor(df), 1)
    hi = min(lo + 1, len(_T975))
    a, b = _T975[lo - 1], _T975[hi - 1]
    return a + (b - a) * (max(df, 1.0) - lo)


def mean_diff_ci(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) with its 95% Welch confidence interval (low, high)."""
    d = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return d, float("nan"), float("nan")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return d, d, d
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t975(df) * se
    return d, d - half, d + half


# ----------------------------------------------------------------------------------------------- second generator

# Six VOC names stand for six shape classes; the 20-class head is kept (the other 14 never appear).
SHAPES2 = ("ring", "star", "outline", "bar", "disc", "hexagon")
SHAPES2_NAMES = ("bird", "cat", "dog", "horse", "sheep", "cow")


def _bg2(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(4)
    if kind == 0:  # stripes at an angle
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
        v = (np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) + 1) / 2
        c1, c2 = rng.integers(40, 220, 3), rng.integers(40, 220, 3)
        img = v[..., None] * c1 + (1 - v[..., None]) * c2
    elif kind == 1:  # checkerboard
        cell = int(rng.integers(5, 25))
        yy, xx = np.mgrid[0:h, 0:w]
        v = ((yy // cell + xx // cell) % 2).astype(np.float32)[..., None]
        img = v * rng.integers(60, 200, 3) + (1 - v) * rng.integers(60, 200, 3)
    elif kind == 2:  # coloured noise, blurred
        img = cv2.GaussianBlur(rng.uniform(0, 255, (h, w, 3)).astype(np.float32), (0, 0), rng.uniform(1, 6))
    else:  # smooth blobs (photo-like low frequencies)
        small = rng.uniform(30, 230, (max(h // 16, 2), max(w // 16, 2), 3)).astype(np.float32)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    img = img + rng.normal(0, 6, (h, w, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw2(img: np.ndarray, shape: str, colour: tuple[int, ...], box: tuple[int, int, int, int]) -> None:
    x1, y1, x2, y2 = box
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    c = tuple(int(v) for v in colour)
    if shape == "ring":
        t = max(int(min(w, h) * 0.18), 1)
        cv2.ellipse(img, (round(cx), round(cy)), (max(w // 2 - t // 2, 1), max(h // 2 - t // 2, 1)), 0, 0, 360, c, t)
    elif shape == "star":
        ang = np.arange(10) * np.pi / 5 - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([cx + rad * np.cos(ang) * w / 2, cy + rad * np.sin(ang) * h / 2], 1)
        cv2.fillPoly(img, [np.round(pts).astype(np.int32)], c)
    elif shape == "outline":
        t = max(int(min(w, h) * 0.12), 1)
        cv2.rectangle(img, (x1 + t // 2, y1 + t // 2), (x2 - 1 - t // 2, y2 - 1 - t // 2), c, t)
    elif shape == "bar":
        cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), c, -1)
        cv2.line(img, (x1, y1), (x2 - 1, y2 - 1), tuple(255 - v for v in c), max(min(w, h) // 8, 1))
    elif shape == "disc":
        cv2.ellipse(img, (round(cx), round(cy)), (max(w // 2, 1), max(h // 2, 1)), 0, 0, 360, c, -1)
        cv2.circle(img, (round(cx), round(cy)), max(min(w, h) // 6, 1), tuple(255 - v for v in c), -1)
    else:  # hexagon
        ang = np.arange(6) * np.pi / 3
        pts = np.stack([cx + np.cos(ang) * w / 2, cy + np.sin(ang) * h / 2], 1)
        cv2.fillPoly(img, [np.round(pts).astype(np.int32)], c)


def shapes2(out: Path, images: int, seed: int, size: int, val_fraction: float = 0.2) -> Path:
    """Write the second generator's set as a flat VOC folder (JPEG, 1-based VOC XML, train/val split files).

    Boxes are the tight bounds of each shape's visible pixels (occluders drawn later are subtracted), written as
    VOC's 1-based inclusive corners; objects under 6 px visible on a side are left out rather than marked.
    """
    out = Path(out)
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1000)
    ids = [f"s2_{i:06d}" for i in range(images)]
    for image_id in ids:
        scale = rng.choice([0.75, 1.0, 1.25])
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        long = int(size * scale)
        w, h = (long, max(int(long / aspect), 32)) if aspect >= 1 else (max(int(long * aspect), 32), long)
        img = _bg2(rng, h, w)
        ids_mask = np.full((h, w), -1, np.int32)  # which object owns each pixel (later ones occlude)
        classes = []
        for k in range(int(rng.integers(0, 9))):
            cls = int(rng.integers(len(SHAPES2)))
            side = float(np.exp(rng.uniform(np.log(0.06), np.log(0.55)))) * min(w, h)
            bw, bh = max(int(side * rng.uniform(0.6, 1.6)), 4), max(int(side * rng.uniform(0.6, 1.6)), 4)
            x1, y1 = int(rng.integers(-bw // 3, w - 2 * bw // 3)), int(rng.integers(-bh // 3, h - 2 * bh // 3))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            box = (x1, y1, x1 + bw, y1 + bh)
            _draw2(img, SHAPES2[cls], colour, box)
            m = np.zeros((h, w), np.uint8)
            _draw2(m, SHAPES2[cls], (255,), box)
            ids_mask[m > 0] = k
            classes.append(cls)
        objs = []
        for k, cls in enumerate(classes):
            ys, xs = np.nonzero(ids_mask == k)
            if len(xs) < 12:
                continue
            bx1, by1, bx2, by2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            if min(bx2 - bx1, by2 - by1) < 6:
                continue
            objs.append(
                f"<object><name>{SHAPES2_NAMES[cls]}</name><truncated>0</truncated><difficult>0</difficult>"
                f"<bndbox><xmin>{bx1 + 1}</xmin><ymin>{by1 + 1}</ymin><xmax>{bx2}</xmax><ymax>{by2}</ymax>"
                "</bndbox></object>"
            )
        cv2.imwrite(
            str(out / "JPEGImages" / f"{image_id}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(75, 96))]
        )
        (out / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{''.join(objs)}</annotation>\n"
        )
    n_val = max(1, round(images * val_fraction))
    (out / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids[n_val:]) + "\n")
    (out / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids[:n_val]) + "\n")
    assert set(SHAPES2_NAMES) <= set(VOC_CLASSES)
    return out


def make_dataset(name: str, root: Path, images: int, size: int) -> Path:
    """The named dataset under ``root`` (made once; data seed 0, so every training seed sees the same images)."""
    if root.exists():
        return root
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if name == "synth":
        synthetic_set(tmp, images, 0, size)
    else:
        shapes2(tmp, images, 0, size)
    tmp.rename(root)
    return root


# ----------------------------------------------------------------------------------------------- the race


def default_recipe() -> dict[str, Any]:
    """The recipe factors the race varies, at vocdet's schema defaults."""
    from vocdet.config import load_config

    cfg = load_config(None, [])
    return {
        "nbs": cfg.train.nbs,
        "warmup_epochs": cfg.train.warmup_epochs,
        "close_mosaic": cfg.data.close_mosaic,
        "mosaic": cfg.data.mosaic,
    }


def one_seed(name: str, root: Path, out: Path, s: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Train both sides with one seed and score both models with both metrics."""
    s = argparse.Namespace(**{**vars(s), "seed": seed})
    run_dir = out / name / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    data_yaml = to_yolo(root, out / "yolo" / root.name)
    options = [f"data.mosaic={s.mosaic}", *([f"train.precision={s.precision}"] if s.precision else []), *s.vocdet]
    result: dict[str, Any] = {}
    if "vocdet" in s.sides:
        v = train_vocdet(root, run_dir, s, options)
        v_pt = vocdet_ckpt_to_ultralytics(Path(v["best"]), run_dir / "vocdet_as_ultralytics.pt")
        v["vocdet_metric"], v["ultralytics_metric"] = v["own_metric"], score_with_ultralytics(v_pt, data_yaml, s)
        result["vocdet"] = v
    if "ultralytics" in s.sides:
        u = train_ultralytics(data_yaml, run_dir, s)
        u_ckpt = ultralytics_pt_to_vocdet(Path(u["best"]), root, s, run_dir / "ultralytics_as_vocdet.ckpt")
        u["ultralytics_metric"], u["vocdet_metric"] = u["own_metric"], score_with_vocdet(u_ckpt, s)
        result["ultralytics"] = u
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """mean/std per side and metric, and vocdet - Ultralytics with its 95% CI."""
    out: dict[str, Any] = {}
    for metric in ("vocdet_metric", "ultralytics_metric"):
        for key in ("map50", "map50_95"):
            vals = {side: [r[side][metric][key] for r in runs if side in r] for side in ("vocdet", "ultralytics")}
            row: dict[str, Any] = {
                side: {"values": v, "mean": statistics.fmean(v), "std": statistics.pstdev(v) if len(v) > 1 else 0.0}
                for side, v in vals.items()
                if v
            }
            if vals["vocdet"] and vals["ultralytics"]:
                d, lo, hi = mean_diff_ci(vals["vocdet"], vals["ultralytics"])
                row["diff"], row["ci95"] = d, [lo, hi]
            out[f"{metric}/{key}"] = row
    for side in ("vocdet", "ultralytics"):
        walls = [r[side]["wall_s"] for r in runs if side in r]
        if walls:
            out[f"wall_s/{side}"] = statistics.fmean(walls)
    return out


def print_summary(title: str, summary: dict[str, Any]) -> None:
    print(f"\n== {title}")
    label = {"vocdet_metric": "vocdet's metric", "ultralytics_metric": "Ultralytics' validator"}
    for k, row in summary.items():
        if k.startswith("wall_s"):
            continue
        metric, key = k.split("/")
        cells = [
            f"{side} {row[side]['mean']:.3f} ± {row[side]['std']:.3f}"
            for side in ("vocdet", "ultralytics")
            if side in row
        ]
        diff = (
            f"   diff {100 * row['diff']:+.1f} pt [{100 * row['ci95'][0]:+.1f}, {100 * row['ci95'][1]:+.1f}]"
            if "diff" in row
            else ""
        )
        print(f"  {key:>8} ({label[metric]:>22}): {'   '.join(cells)}{diff}")
    walls = [
        f"{side} {summary[f'wall_s/{side}']:.0f} s" for side in ("vocdet", "ultralytics") if f"wall_s/{side}" in summary
    ]
    print(f"  wall time per run: {', '.join(walls)}")


def main(argv: list[str] | None = None) -> None:
    recipe = default_recipe()
    p = argparse.ArgumentParser(prog="python -m vocdet.bench.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench-fidelity"))
    p.add_argument("--datasets", default="synth,shapes2", help="comma-separated: synth, shapes2")
    p.add_argument("--seeds", type=int, default=5, help="training seeds 0..N-1 per side")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--images", type=int, default=500, help="images per dataset (80/20 train/val)")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nbs", type=int, default=recipe["nbs"])
    p.add_argument("--warmup-epochs", type=float, default=recipe["warmup_epochs"])
    p.add_argument("--close-mosaic", type=int, default=recipe["close_mosaic"])
    p.add_argument("--mosaic", type=float, default=recipe["mosaic"])
    p.add_argument("--precision", default=None, help="vocdet's train.precision, e.g. bf16-mixed (default: auto)")
    p.add_argument("--sides", default="vocdet,ultralytics")
    p.add_argument("--vocdet", action="append", default=[], help="extra `vocdet train` override (repeatable)")
    p.add_argument("--ablate", nargs="*", default=None, help=f"one factor at a time: any of {list(ABLATIONS)}")
    p.add_argument("--timeout", type=float, default=3600)
    s = p.parse_args(argv)
    s.sides = s.sides.split(",")
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)
    out = s.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(out / "ultralytics_cfg"))
    random.seed(0)

    variants: dict[str, argparse.Namespace] = {"default": s}
    if s.ablate is not None:
        for factor in s.ablate or list(ABLATIONS):
            attr, value = ABLATIONS[factor]
            variants[factor] = argparse.Namespace(**{**vars(s), attr: value})
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(s).items()}, "results": {}}
    t0 = time.perf_counter()
    for dataset in s.datasets.split(","):
        root = make_dataset(dataset, out / "data" / f"{dataset}-{s.images}-{s.imgsz}", s.images, s.imgsz)
        for vname, vs in variants.items():
            title = f"{dataset} / {vname}"
            runs = []
            for seed in range(s.first_seed, s.first_seed + s.seeds):
                print(f"[{title}] seed {seed} ...", flush=True)
                runs.append(one_seed(f"{dataset}/{vname}", root, out, vs, seed))
                results["results"][title] = {"runs": runs, "summary": summarise(runs)}
                (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
            print_summary(title, results["results"][title]["summary"])
    print(f"\n{time.perf_counter() - t0:.0f} s in all; wrote {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
