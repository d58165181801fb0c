"""``make bench``: vocdet against Ultralytics' own trainer, side by side, on identical inputs.

One invocation runs both on the same images (a synthetic set and the real VOC sample, converted to YOLO format
for Ultralytics), yolov8n from the same yaml and seed, the same imgsz, global batch, epochs, optimiser and
augmentation settings, dataloader workers and threads, and prints:

- training throughput (img/s over the epochs after a warm-up epoch, validation excluded), vocdet / Ultralytics;
- dataloader throughput with full augmentation (img/s of one worker), vocdet's ``VOCDataset`` / ``YOLODataset``;
- final mAP50 and mAP50-95 of both models, each scored by vocdet's metric code *and* Ultralytics' validator;
- peak RSS of each training process tree (workers included);
- metric computation time for 5,000 images x 20 classes, vocdet vs pycocotools.

Results go to ``runs/bench/results.json``. It drives Ultralytics' trainer, dataset and validator as the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vocdet.bench.common import (
    BENCH_ENV,
    SAMPLE,
    run_measured,
    score_with_ultralytics,
    score_with_vocdet,
    synthetic_set,
    thread_env,
    to_yolo,
    ultralytics_pt_to_vocdet,
    vocdet_ckpt_to_ultralytics,
)


def timed_throughput(images: list[float], seconds: list[float]) -> float:
    """img/s over every epoch after the first (the warm-up epoch: allocator, caches, lazy init); a one-epoch run's
    over that epoch, warm-up included."""
    if len(seconds) == 1:
        return float(images[0] / max(seconds[0], 1e-9))
    return float(sum(images[1:]) / max(sum(seconds[1:]), 1e-9))


# vocdet races with its defaults: fp32, the numerics of Ultralytics' CPU training. Beside it, on the synthetic set,
# bf16 autocast, which CPUs with AVX512-BF16 or AMX run in hardware (Ultralytics has no mixed precision on CPU).
VARIANTS = {"bf16": ["train.precision=bf16-mixed"]}


def vocdet_overrides(
    voc_root: Path, run_dir: Path, s: argparse.Namespace, name: str = "vocdet", options: Sequence[str] = ()
) -> list[str]:
    """The race's settings as ``vocdet train`` overrides (run in ``run_dir / name``)."""
    return [
        f"data.root={voc_root}",
        "data.val_fraction=0",  # as the Ultralytics side's copy (common.voc_to_yolo)
        f"data.imgsz={s.imgsz}",
        f"data.batch_size={s.batch}",
        f"data.num_workers={s.workers}",
        f"data.close_mosaic={s.close_mosaic}",
        f"train.epochs={s.epochs}",
        f"train.nbs={s.nbs}",
        f"train.warmup_epochs={s.warmup_epochs}",
        f"run.dir={run_dir}",
        f"run.name={name}",
        "run.exist_ok=true",
        f"run.seed={s.seed}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "logging.wandb=false",
        *options,
    ]


def vocdet_epochs(run: Path) -> tuple[list[float], list[float]]:
    """(seconds, images) of each training epoch of a vocdet run, from its CSV log (validation excluded)."""
    rows = [r for r in csv.DictReader((run / "csv" / "metrics.csv").open()) if r.get("train/img_per_s")]
    secs = [float(r["train/epoch_seconds"]) for r in rows]
    return secs, [float(r["train/img_per_s"]) * t for r, t in zip(rows, secs)]


def train_vocdet(
    voc_root: Path, run_dir: Path, s: argparse.Namespace, options: Sequence[str] = (), name: str = "vocdet"
) -> dict[str, Any]:
    over = vocdet_overrides(voc_root, run_dir, s, name, options)
    log = run_dir / f"{name}.log"
    peak, wall = run_measured(
        [sys.executable, "-m", "vocdet", "train", *over], log, {**BENCH_ENV, **thread_env(s)}, s.timeout
    )
    secs, imgs = vocdet_epochs(run_dir / name)
    metrics = json.loads((run_dir / name / "metrics.json").read_text())
    return {
        "img_per_s": timed_throughput(imgs, secs),
        **peak,
        "wall_s": wall,
        "options": list(options),
        "first_epoch_s": secs[0],
        "best": str(run_dir / name / "checkpoints" / "best.ckpt"),
        "own_metric": {"map50": metrics["map50"], "map50_95": metrics["map50_95"]},
    }


def ultralytics_args(data_yaml: Path, run_dir: Path, s: argparse.Namespace) -> dict[str, Any]:
    """The race's settings as arguments of ``ultralytics_train`` (run in ``run_dir / "ultralytics"``)."""
    return {
        "data": str(data_yaml),
        "imgsz": s.imgsz,
        "batch": s.batch,
        "workers": s.workers,
        "epochs": s.epochs,
        "nbs": s.nbs,
        "close_mosaic": s.close_mosaic,
        "warmup_epochs": s.warmup_epochs,
        "mosaic": getattr(s, "mosaic", 1.0),
        "seed": s.seed,
        "project": str(run_dir),
        "name": "ultralytics",
    }


def train_ultralytics(
    data_yaml: Path, run_dir: Path, s: argparse.Namespace, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Ultralytics' trainer in a child process with ``ultralytics_args`` (and ``extra`` trainer arguments, e.g.
    device and amp on a GPU), timed and measured."""
    out = run_dir / "ultralytics.json"
    args = {**ultralytics_args(data_yaml, run_dir, s), **(extra or {})}
    log = run_dir / "ultralytics.log"
    peak, wall = run_measured(
        [sys.executable, "-m", "vocdet.bench.race", "ultralytics_train", json.dumps(args), str(out)],
        log,
        {**BENCH_ENV, **thread_env(s), "YOLO_CONFIG_DIR": str(run_dir / "ultralytics_cfg")},
        s.timeout,
    )
    res = json.loads(out.read_text())
    for key, want in (("threads", s.threads), ("workers", s.workers)):
        if set(res[key]) != {want}:
            raise SystemExit(f"bench: Ultralytics trained with {key} {sorted(set(res[key]))}, not {want}")
    return {
        "img_per_s": timed_throughput(res["images"], res["seconds"]),
        "first_epoch_s": res["seconds"][0],
        "epochs": len(res["seconds"]),
        "workers": sorted(set(res["workers"])),
        **peak,
        "wall_s": wall,
        "best": res["best"],
        "own_metric": {"map50": res["map50"], "map50_95": res["map50_95"]},
    }


def ultralytics_train(args_json: str, out: str) -> None:
    """Child process: Ultralytics' trainer with the recipe vocdet states explicitly (no optimizer=auto)."""
    import torch
    from ultralytics import YOLO

    args = json.loads(args_json)
    model = YOLO("yolov8n.yaml")
    times: dict[str, list[float]] = {"images": [], "seconds": [], "threads": [], "workers": []}
    state: dict[str, float] = {}

    def epoch_start(trainer: Any) -> None:
        times["threads"].append(torch.get_num_threads())
        times["workers"].append(trainer.train_loader.num_workers)
        state["t"] = time.perf_counter()

    def epoch_end(trainer: Any) -> None:  # fires after the last batch, before validation
        times["seconds"].append(time.perf_counter() - state["t"])
        times["images"].append(float(len(trainer.train_loader.dataset)))

    threads = int(os.environ["OMP_NUM_THREADS"])

    def same_resources(trainer: Any) -> None:
        # On CPU, Ultralytics' trainer sets workers=0 and its select_device sets torch to cpu_count - 1 threads;
        # the race gives both sides the same workers and threads.
        trainer.args.workers = args["workers"]
        torch.set_num_threads(threads)

    model.add_callback("on_pretrain_routine_start", same_resources)
    model.add_callback("on_train_epoch_start", epoch_start)
    model.add_callback("on_train_epoch_end", epoch_end)
    torch.manual_seed(args["seed"])
    recipe = dict(
        device="cpu",
        optimizer="SGD",
        lr0=0.01,
        lrf=0.01,
        momentum=0.937,
        weight_decay=0.0005,
        warmup_momentum=0.8,
        warmup_bias_lr=0.1,
        box=7.5,
        cls=0.5,
        dfl=1.5,
        mosaic=1.0,
        mixup=0.0,
        cutmix=0.0,
        copy_paste=0.0,
        degrees=0.0,
        translate=0.1,
        scale=0.5,
        shear=0.0,
        perspective=0.0,
        fliplr=0.5,
        flipud=0.0,
        hsv_h=0.015,
        hsv_s=0.7,
        hsv_v=0.4,
        cos_lr=False,
        amp=False,
        cache=False,
        deterministic=False,  # vocdet does not force deterministic kernels either
        plots=False,
        exist_ok=True,
        verbose=False,
    )
    results = model.train(**{**recipe, **args})
    best = Path(model.trainer.best)
    Path(out).write_text(
        json.dumps({**times, "best": str(best), "map50": float(results.box.map50), "map50_95": float(results.box.map)})
    )


def dataloader_speed(voc_root: Path, data_yaml: Path, s: argparse.Namespace) -> dict[str, float]:
    """img/s of one worker (the main process) producing collated, fully augmented batches; no cache on either.

    The two loaders take turns, ``s.loader_rounds`` rounds of ``s.loader_batches`` batches each, and each side's
    figure is its median round, so a slow spell of the machine does not land on one side only.
    """
    import random
    import statistics

    import torch
    from torch.utils.data import DataLoader

    from vocdet.config import load_config
    from vocdet.core.voc import load_records, resolve_split
    from vocdet.data.dataset import VOCDataset, collate

    torch.set_num_threads(1)  # a dataloader worker runs with one thread in both libraries

    def endless(loader: DataLoader) -> Iterator[dict[str, Any]]:
        while True:
            yield from loader

    def timed_round(batches: Iterator[dict[str, Any]]) -> float:
        t0, n = time.perf_counter(), 0
        for _ in range(s.loader_batches):
            n += len(next(batches)["img"])
        return n / (time.perf_counter() - t0)

    random.seed(0)
    np.random.seed(0)
    cfg = load_config(None, [f"data.root={voc_root}", f"data.imgsz={s.imgsz}"])
    ds = VOCDataset(
        load_records(resolve_split(voc_root, [], "train", val_fraction=0), "train"), s.imgsz, augment=True, hyp=cfg.data
    )
    ours = endless(DataLoader(ds, batch_size=s.batch, shuffle=True, num_workers=0, collate_fn=collate))

    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    with contextlib.redirect_stdout(io.StringIO()):
        data = check_det_dataset(str(data_yaml))
        hyp = get_cfg(overrides={"imgsz": s.imgsz, "cache": False, "close_mosaic": 0})
        yds = build_yolo_dataset(hyp, data["train"], s.batch, data, mode="train")
    theirs = endless(DataLoader(yds, batch_size=s.batch, shuffle=True, num_workers=0, collate_fn=yds.collate_fn))
    for batches in (ours, theirs):  # warm-up: file cache, lazy imports, first buffer fill
        for _ in range(2):
            next(batches)
    rounds: dict[str, list[float]] = {"vocdet": [], "ultralytics": []}
    for _ in range(s.loader_rounds):
        rounds["vocdet"].append(timed_round(ours))
        rounds["ultralytics"].append(timed_round(theirs))
    return {
        "vocdet_img_per_s": statistics.median(rounds["vocdet"]),
        "ultralytics_img_per_s": statistics.median(rounds["ultralytics"]),
        "rounds": rounds,
    }


def metric_speed(n_images: int = 5000, n_classes: int = 20, seed: int = 0) -> dict[str, float]:
    """Seconds to score ``n_images`` synthetic images (2-3 objects, 30 detections each): vocdet vs pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from vocdet.core.metrics import GroundTruth, Predictions, evaluate_detections

    rng = np.random.default_rng(seed)
    gts, preds = {}, {}
    for i in range(n_images):
        k = int(rng.integers(2, 4))
        xy = rng.uniform(0, 400, (k, 2))
        gt = np.concatenate([xy, xy + rng.uniform(20, 200, (k, 2))], 1)
        gts[f"{i:06d}"] = GroundTruth(gt, rng.integers(0, n_classes, k), rng.random(k) < 0.1)
        m = 30
        jitter = gt[rng.integers(0, k, m)] + rng.normal(0, 15, (m, 4))
        preds[f"{i:06d}"] = Predictions(jitter, rng.random(m), rng.integers(0, n_classes, m))
    t0 = time.perf_counter()
    result = evaluate_detections(gts, preds, [str(c) for c in range(n_classes)])
    ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    ids = {k: n + 1 for n, k in enumerate(sorted(gts))}
    anns, dets = [], []
    for k, g in gts.items():
        for b, c, d in zip(g.boxes, g.labels, g.difficult):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append(
                {"id": len(anns) + 1, "image_id": ids[k], "category_id": int(c), "bbox": [b[0], b[1], w, h],
                 "area": w * h, "iscrowd": int(d)}
            )  # fmt: skip
        p = preds[k]
        for b, sc, c in zip(p.boxes, p.scores, p.labels):
            dets.append({"image_id": ids[k], "category_id": int(c), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                         "score": float(sc)})  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {
            "images": [{"id": i} for i in ids.values()],
            "annotations": anns,
            "categories": [{"id": c} for c in range(n_classes)],
        }
        coco.createIndex()
        e = COCOeval(coco, coco.loadRes(dets), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    # Both timed runs computed the same thing: the numbers are reported beside the times.
    return {
        "vocdet_s": ours,
        "pycocotools_s": time.perf_counter() - t0,
        "map50_95_vocdet": result["map50_95"],
        "map50_95_pycocotools": float(e.stats[0]),
    }


# ----------------------------------------------------------------------------------------------- driver


def race(name: str, voc_root: Path, out: Path, s: argparse.Namespace, variants: bool = False) -> dict[str, Any]:
    """Train both on one dataset, then score both models with both metric implementations; with ``variants``,
    also train vocdet with each of ``VARIANTS`` (scored by its own metric)."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    data_yaml = to_yolo(voc_root, out / "yolo" / name)
    print(f"[{name}] training vocdet ...", flush=True)
    v = train_vocdet(voc_root, run_dir, s)
    extra = {}
    for key, options in VARIANTS.items() if variants else ():
        print(f"[{name}] training vocdet ({key}) ...", flush=True)
        extra[key] = train_vocdet(voc_root, run_dir, s, options, name=f"vocdet-{key}")
    print(f"[{name}] training Ultralytics ...", flush=True)
    u = train_ultralytics(data_yaml, run_dir, s)
    v_pt = vocdet_ckpt_to_ultralytics(Path(v["best"]), run_dir / "vocdet_as_ultralytics.pt")
    u_ckpt = ultralytics_pt_to_vocdet(Path(u["best"]), voc_root, s, run_dir / "ultralytics_as_vocdet.ckpt")
    v["vocdet_metric"], v["ultralytics_metric"] = v["own_metric"], score_with_ultralytics(v_pt, data_yaml, s)
    u["ultralytics_metric"], u["vocdet_metric"] = u["own_metric"], score_with_vocdet(u_ckpt, s)
    return {"vocdet": v, "ultralytics": u, "vocdet_variants": extra}


def print_table(results: dict[str, Any]) -> None:
    rows = []
    for name, r in results["datasets"].items():
        v, u = r["vocdet"], r["ultralytics"]
        rows.append((f"{name}: train img/s ({' '.join(v['options']) or 'defaults'})", v["img_per_s"], u["img_per_s"]))
        rows.append((f"{name}: first (warm-up) epoch seconds", v["first_epoch_s"], u["first_epoch_s"]))
        for key, x in r.get("vocdet_variants", {}).items():
            opts = " ".join(x["options"]) or "defaults"
            rows.append((f"{name}: train img/s, vocdet {key} ({opts})", x["img_per_s"], u["img_per_s"]))
            mine, theirs = x["own_metric"]["map50"], u["vocdet_metric"]["map50"]
            rows.append((f"{name}: mAP50, vocdet {key} (vocdet's metric)", mine, theirs))
        for metric in ("vocdet_metric", "ultralytics_metric"):
            label = "vocdet's metric" if metric == "vocdet_metric" else "Ultralytics' validator"
            rows.append((f"{name}: mAP50 ({label})", v[metric]["map50"], u[metric]["map50"]))
            rows.append((f"{name}: mAP50-95 ({label})", v[metric]["map50_95"], u[metric]["map50_95"]))
        rows.append((f"{name}: peak RSS MB (main process)", v["peak_rss_mb"], u["peak_rss_mb"]))
        rows.append((f"{name}: peak PSS MB (process tree)", v["peak_tree_pss_mb"], u["peak_tree_pss_mb"]))
    for name, d in results["dataloader"].items():
        rows.append((f"{name}: dataloader img/s, 1 worker", d["vocdet_img_per_s"], d["ultralytics_img_per_s"]))
    m = results["metric"]
    rows.append(("metric seconds, 5k images x 20 classes (vs pycocotools)", m["vocdet_s"], m["pycocotools_s"]))
    w = max(len(r[0]) for r in rows)
    print(f"\n{'':{w}}  {'vocdet':>10}  {'reference':>10}  {'ratio':>7}")
    for label, a, b in rows:
        print(f"{label:{w}}  {a:10.3f}  {b:10.3f}  {a / b if b else float('nan'):7.2f}")
    ms = results["map50_over_seeds"]
    if len(ms["vocdet"]["values"]) > 1:
        print(
            f"\nmAP50 over {len(ms['vocdet']['values'])} training seeds (vocdet's metric): vocdet "
            f"{ms['vocdet']['mean']:.3f} ± {ms['vocdet']['std']:.3f}, Ultralytics "
            f"{ms['ultralytics']['mean']:.3f} ± {ms['ultralytics']['std']:.3f}"
        )
    print()
    for k in (
        "train_speed_ratio",
        "dataloader_speed_ratio",
        "peak_rss_ratio",
        "peak_tree_pss_ratio",
        "metric_seconds_5k",
    ):
        print(f"{k} = {results[k]:.3f}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ultralytics_train"]:
        ultralytics_train(argv[1], argv[2])
        return
    p = argparse.ArgumentParser(prog="python -m vocdet.bench.race", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--nbs", type=int, default=16, help="nominal batch (both): 16 = one optimiser step per batch")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--close-mosaic", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synth-images", type=int, default=400)
    p.add_argument("--real-epochs", type=int, default=4, help="epochs on the 100-image real sample")
    p.add_argument("--loader-batches", type=int, default=20, help="batches per timed dataloader round")
    p.add_argument("--loader-rounds", type=int, default=5, help="alternating timed rounds of each dataloader")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--synthetic-only", action="store_true", help="skip the real sample and the micro-benchmarks")
    p.add_argument("--no-variants", action="store_true", help="skip vocdet's bf16 run beside the race")
    p.add_argument(
        "--extra-seeds",
        type=int,
        default=0,
        help="train both N more times on the synthetic set with training seeds seed+1..seed+N (same data) and "
        "report mAP50 as mean and spread: one seed cannot resolve a one-point difference mid-training",
    )
    s = p.parse_args(argv)
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(s.out.resolve() / "ultralytics_cfg"))
    out = s.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    synth_root = synthetic_set(out / "data" / "synth", s.synth_images, s.seed, s.imgsz)
    datasets = {"synthetic": synth_root}
    if SAMPLE.is_dir() and not s.synthetic_only:
        datasets["voc-sample100"] = SAMPLE
    results: dict[str, Any] = {"settings": vars(s) | {"out": str(out)}, "datasets": {}}
    for name, root in datasets.items():
        epochs = s.epochs
        if name != "synthetic":
            s.epochs = s.real_epochs
        results["datasets"][name] = race(name, root, out, s, variants=name == "synthetic" and not s.no_variants)
        s.epochs = epochs
    seeds: dict[str, list[float]] = {"vocdet": [], "ultralytics": []}
    base_seed = s.seed
    for k in range(1, s.extra_seeds + 1):
        s.seed = base_seed + k
        results["datasets"][f"synthetic-seed{s.seed}"] = race(f"synthetic-seed{s.seed}", synth_root, out, s)
    s.seed = base_seed
    for name, r in results["datasets"].items():
        if name.startswith("synthetic"):
            for side in seeds:
                seeds[side].append(r[side]["vocdet_metric"]["map50"])
    results["map50_over_seeds"] = {
        side: {"values": v, "mean": float(np.mean(v)), "std": float(np.std(v))} for side, v in seeds.items()
    }
    if s.synthetic_only:
        v, u = results["datasets"]["synthetic"]["vocdet"], results["datasets"]["synthetic"]["ultralytics"]
        print(json.dumps({"vocdet": v, "ultralytics": u}, indent=1, default=str))
        return
    print("dataloader ...", flush=True)
    results["dataloader"] = {
        name: dataloader_speed(root, out / "yolo" / name / "data.yaml", s) for name, root in datasets.items()
    }
    print("metric ...", flush=True)
    results["metric"] = metric_speed()

    main_run = results["datasets"]["synthetic"]
    v, u = main_run["vocdet"], main_run["ultralytics"]
    loader = results["dataloader"]["synthetic"]
    results.update(
        train_speed_ratio=v["img_per_s"] / u["img_per_s"],
        dataloader_speed_ratio=loader["vocdet_img_per_s"] / loader["ultralytics_img_per_s"],
        map50_vocdet=v["vocdet_metric"]["map50"],
        map50_ultralytics=u["vocdet_metric"]["map50"],
        map50_vocdet_by_ultralytics_validator=v["ultralytics_metric"]["map50"],
        map50_ultralytics_by_ultralytics_validator=u["ultralytics_metric"]["map50"],
        peak_rss_ratio=v["peak_rss_mb"] / u["peak_rss_mb"],
        peak_tree_pss_ratio=v["peak_tree_pss_mb"] / u["peak_tree_pss_mb"],
        metric_seconds_5k=results["metric"]["vocdet_s"],
    )
    for key, r in main_run["vocdet_variants"].items():
        results[f"train_speed_ratio_{key}"] = r["img_per_s"] / u["img_per_s"]
        results[f"map50_vocdet_{key}"] = r["own_metric"]["map50"]
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print_table(results)
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
