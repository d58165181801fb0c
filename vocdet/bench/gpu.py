"""``make gpu-check``: one prepared run (10 minutes at most) that checks and measures vocdet on one CUDA GPU.

``python -m vocdet.bench.gpu [--out runs/bench] [--budget-s 600]`` runs six steps, each timed, each recorded on
its own (a failing step does not stop the others; the exit code is 1 when any step failed), prints a summary and
writes ``<out>/gpu.json`` (after every step, so a killed run keeps what it measured). Work files go to
``<out>/gpu/``.

1. ``environment``: GPU name, memory, compute capability, driver; CUDA, cuDNN, torch, ultralytics, lightning,
   onnxruntime and its execution providers, vocdet.
2. ``race``: the ``make bench`` race (``vocdet.bench.race``) on the GPU: vocdet with ``train.precision=bf16-mixed``
   against Ultralytics' own trainer with AMP, yolov8n from the same yaml and seed, imgsz 640, batch 64, 8 workers,
   the same synthetic set and equal epochs (sized by the budget, at least 2: the first is the warm-up and is not
   counted). Reported: training img/s of each, mAP50 and mAP50-95 of both models by vocdet's metric (plus
   Ultralytics' own validator on its model), peak RSS, and the GPU memory peak of each training process: the
   device's memory in use above what was in use before it started, read through NVML every 0.1 s (CUDA context
   and the caching allocator's reserve included, for both sides alike).
3. ``ddp``: ``vocdet train --gpus 1 trainer.strategy=ddp`` (NCCL) for one epoch on the same data: that it
   finishes, its seconds, its img/s and GPU memory peak.
4. ``export``: ``vocdet export --half export.device=cuda`` of the race's vocdet model to ONNX, and the parity
   check the export runs against PyTorch (max |Δ| of raw outputs, boxes matched).
5. ``latency``: ``Detector`` on CUDA against Ultralytics' ``YOLO.predict`` on the same weights and JPEGs, path to
   final boxes on the host: median single-image latency (batch 1) and ms per batch of 32.
6. ``serve``: ``vocdet serve --checkpoint ... serve.device=cuda`` on loopback answering 100 requests
   (8 concurrent clients): good answers, req/s, p50/p99 latency.

Later steps use the race's vocdet model; when the race failed, the DDP run's model; when both failed, an untrained
yolov8n (noted in the step). Without CUDA the check exits with code 2 and one line on stderr. ``--device cpu
--tiny`` runs the whole harness on the CPU with tiny settings (64 px, 40 images, 1 epoch, batch 8, no workers, fp32
instead of bf16, DDP over gloo, fp32 export, latency at batch 1 and 2, 10 requests) to test it end to end in a
minute or two;
``--tiny`` on a GPU is a quick smoke run there.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vocdet.bench import race
from vocdet.bench.common import (
    BENCH_ENV,
    run_measured,
    score_with_vocdet,
    synthetic_set,
    thread_env,
    to_yolo,
    ultralytics_pt_to_vocdet,
    vocdet_ckpt_to_ultralytics,
)

STEPS = ("environment", "race", "ddp", "export", "latency", "serve")
# Share of the budget each step is sized for; the rest is slack. A step's timeout is what the budget has left less
# half the shares of the steps after it, and never under MIN_TIMEOUT_S.
SHARES = {"environment": 0.02, "race": 0.5, "ddp": 0.14, "export": 0.08, "latency": 0.1, "serve": 0.08}
MIN_TIMEOUT_S = 20.0
# Sizing guesses for a GPU run (never measured before the run): the slower side's training img/s at 640 px with
# 8 workers (kept low: data loading often bounds it), a training process's fixed cost (start, AMP check, per-epoch
# validation of the val split, final evaluation), and seconds to synthesize one 640 px image.
GPU_IMG_S_GUESS = 250.0
TRAIN_OVERHEAD_S = 45.0
SYNTH_S_PER_IMAGE = 0.035
NO_CUDA = (
    "error: no CUDA device (torch.cuda.is_available() is False); run on a machine with an NVIDIA GPU, "
    "or use --device cpu --tiny to test the harness"
)


# ----------------------------------------------------------------------------------------------- plan


def make_plan(a: argparse.Namespace) -> argparse.Namespace:
    """The run's settings as the race harness reads them (``s`` in ``vocdet.bench.race``), sized by the budget."""
    cuda = a.device == "cuda"
    cpus = os.cpu_count() or 1
    if a.tiny:
        s = dict(imgsz=64, batch=8, workers=0, threads=min(2, cpus), images=40, epochs=1, nbs=8, warmup_epochs=0.0,
                 close_mosaic=0, batches=(1, 2), latency_n=5, big_batch_rounds=2, requests=10, clients=2)  # fmt: skip
    else:
        images = max(320, min(1280, 64 * round(1280 * a.budget_s / 600 / 64)))
        train_images = images - round(images * 0.2)
        race_s = SHARES["race"] * a.budget_s - images * SYNTH_S_PER_IMAGE - 2 * TRAIN_OVERHEAD_S
        epochs = max(2, min(8, int(race_s / 2 * GPU_IMG_S_GUESS / train_images)))
        s = dict(imgsz=640, batch=64, workers=min(8, cpus), threads=min(8, cpus), images=images, epochs=epochs,
                 nbs=64, warmup_epochs=1.0, close_mosaic=1 if epochs > 2 else 0, batches=(1, 32),
                 latency_n=max(20, min(100, int(a.budget_s / 6))), big_batch_rounds=8, requests=100,
                 clients=8)  # fmt: skip
    if cuda:
        import torch

        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    else:
        precision = "32-true"  # no bf16 units to measure on a CPU; fp32 as Ultralytics trains there
    return argparse.Namespace(
        **s, device=a.device, tiny=a.tiny, seed=0, mosaic=1.0, timeout=a.budget_s, precision=precision
    )


class Budget:
    """The run's time budget: what each step may take, given what earlier steps used."""

    def __init__(self, total_s: float):
        self.total, self.start = float(total_s), time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def timeout(self, step: str) -> float:
        later = STEPS[STEPS.index(step) + 1 :]
        reserve = 0.5 * self.total * sum(SHARES[k] for k in later)
        return max(self.total - self.elapsed() - reserve, MIN_TIMEOUT_S)


# ----------------------------------------------------------------------------------------------- GPU memory


def _memory_reader() -> tuple[Callable[[], int], str]:
    """A function returning the bytes in use on CUDA device 0 (NVML, else ``torch.cuda.mem_get_info``)."""
    import torch

    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
        pynvml.nvmlDeviceGetMemoryInfo(handle)
        return (lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)), "nvml"
    except Exception:  # no NVML library, or a device it cannot map: ask the CUDA runtime (makes a context here)

        def used() -> int:
            free, total = torch.cuda.mem_get_info(0)
            return int(total - free)

        return used, "torch.cuda.mem_get_info"


class GpuMemory:
    """Peak memory in use on the GPU while the block runs, above what was in use when it began (MiB).

    The device-wide figure, so it covers a child process (and its CUDA context) without reaching into it; nothing
    else should run on the GPU meanwhile. Off CUDA, ``result`` says why there is no figure.
    """

    def __init__(self, enabled: bool, interval: float = 0.1):
        self.enabled, self.interval = enabled, interval
        self.baseline = self.peak = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuMemory:
        if self.enabled:
            self._read, self.method = _memory_reader()
            self.baseline = self.peak = self._read()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._read())

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._read())

    def result(self) -> dict[str, Any]:
        if not self.enabled:
            return {"peak_mb": None, "skipped": "no CUDA device: no GPU memory to measure"}
        return {"peak_mb": (self.peak - self.baseline) / 2**20, "baseline_mb": self.baseline / 2**20,
                "method": self.method}  # fmt: skip


# ----------------------------------------------------------------------------------------------- context


class Context:
    """What the steps share: settings, budget, output folders, the data and the model the later steps use."""

    def __init__(self, s: argparse.Namespace, out: Path, data: Path | None, budget: Budget):
        self.s, self.out, self.budget = s, out, budget
        self.work = out / "gpu"
        self.cuda = s.device == "cuda"
        self._data = data
        self.checkpoints: dict[str, Path] = {}  # "race" / "ddp" -> best.ckpt, as they appear

    def data(self) -> Path:
        """The flat VOC folder everything trains on: ``--data``, else a synthetic set made once per size."""
        if self._data is None:
            root = self.work / "data" / f"synth-{self.s.images}-{self.s.imgsz}"
            tmp = root.with_name(root.name + ".partial")
            if not root.exists():
                shutil.rmtree(tmp, ignore_errors=True)
                synthetic_set(tmp, self.s.images, 0, self.s.imgsz)
                tmp.rename(root)
            self._data = root
        return self._data

    def accelerator(self) -> list[str]:
        """``vocdet train`` overrides that put a run on this check's device (after the race's, which say cpu)."""
        return ["trainer.accelerator=gpu", "trainer.devices=1"] if self.cuda else ["trainer.accelerator=cpu"]

    def checkpoint(self) -> tuple[Path, str]:
        """(checkpoint, where it came from) for export, latency and serving."""
        for source in ("race", "ddp"):
            if source in self.checkpoints and self.checkpoints[source].is_file():
                return self.checkpoints[source], source
        path = self.work / "untrained.ckpt"
        if not path.is_file():
            untrained_checkpoint(self.data(), self.s, path)
        return path, "untrained (the race and ddp steps left no model)"

    def jpegs(self, n: int) -> list[Path]:
        files = sorted(p for p in (self.data() / "JPEGImages").glob("*.jpg"))
        if not files:
            raise RuntimeError(f"no JPEG images in {self.data() / 'JPEGImages'}")
        return [files[i % len(files)] for i in range(n)]


def untrained_checkpoint(root: Path, s: argparse.Namespace, out: Path) -> Path:
    """A vocdet checkpoint of a freshly initialised yolov8n (as ``common.ultralytics_pt_to_vocdet``, no weights)."""
    import torch

    from vocdet.config import load_config, to_dict
    from vocdet.core.checkpoint import checkpoint_meta
    from vocdet.training.module import DetectionModule

    cfg = load_config(None, [f"data.root={root}", f"data.imgsz={s.imgsz}", f"run.seed={s.seed}"])
    module = DetectionModule(to_dict(cfg))
    module.ema_model.load_state_dict(module.model.state_dict())
    meta = checkpoint_meta(module.hparams["config"], module.class_names, module.cfg.data.imgsz)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "vocdet": meta}, out)
    return out


def _child_env(s: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, **BENCH_ENV, **thread_env(s), "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}


def _one_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


# ----------------------------------------------------------------------------------------------- steps


def step_environment(ctx: Context, timeout: float) -> dict[str, Any]:
    """Device and library versions."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import vocdet

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    import onnxruntime as ort

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "ultralytics": ver("ultralytics"),
        "lightning": ver("lightning"),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "vocdet": vocdet.__version__,
        "gpu": None,
    }
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "memory_gib": p.total_memory / 2**30, "capability": f"{p.major}.{p.minor}",
               "count": torch.cuda.device_count(), "bf16": torch.cuda.is_bf16_supported(), "driver": None}  # fmt: skip
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            gpu["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        except Exception as e:
            gpu["driver"] = f"unknown ({_one_line(e)})"
        out["gpu"] = gpu
    return out


def step_race(ctx: Context, timeout: float) -> dict[str, Any]:
    """vocdet (bf16-mixed) against Ultralytics' trainer (AMP) on the same data, equal epochs; both scored by vocdet's
    metric. One side failing still leaves the other's numbers."""
    s, deadline = ctx.s, time.monotonic() + timeout
    root = ctx.data()
    run_dir = ctx.work / "race"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    data_yaml = to_yolo(root, ctx.work / "yolo" / root.name)
    cuda = ctx.cuda
    result: dict[str, Any] = {
        "settings": {k: getattr(s, k) for k in ("imgsz", "batch", "workers", "threads", "epochs", "nbs", "seed")}
        | {"images": len(list((root / "JPEGImages").glob("*.jpg"))), "data": str(root)},
        "notes": [],
    }
    errors = []

    print(f"  vocdet ({s.precision}), {s.epochs} epochs ...", flush=True)
    s.timeout = max((deadline - time.monotonic()) * 0.45, MIN_TIMEOUT_S)
    try:
        with GpuMemory(cuda) as mem:
            v = race.train_vocdet(root, run_dir, s, [f"train.precision={s.precision}", *ctx.accelerator()])
        secs, imgs = race.vocdet_epochs(run_dir / "vocdet")
        v["img_per_s"] = race.timed_throughput(imgs, secs)
        v.update(precision=s.precision, gpu_memory=mem.result(), map50=v["own_metric"]["map50"],
                 map50_95=v["own_metric"]["map50_95"], log=str(run_dir / "vocdet.log"))  # fmt: skip
        result["vocdet"] = v
        ctx.checkpoints["race"] = Path(v["best"])
    except (Exception, SystemExit) as e:
        errors.append(f"vocdet: {_one_line(e)}")

    amp = "AMP (fp16)" if cuda else "fp32 (no AMP on the CPU)"
    print(f"  Ultralytics ({amp}), {s.epochs} epochs ...", flush=True)
    s.timeout = max((deadline - time.monotonic()) * 0.8, MIN_TIMEOUT_S)
    try:
        with GpuMemory(cuda) as mem:
            u = race.train_ultralytics(data_yaml, run_dir, s, {"device": 0, "amp": True} if cuda else {})
        u.update(precision=amp, gpu_memory=mem.result(), log=str(run_dir / "ultralytics.log"))
        result["ultralytics"] = u  # its speed stands even if scoring it fails
        if u["workers"] != [s.workers]:
            result["notes"].append(f"Ultralytics trained with {u['workers']} dataloader workers, not {s.workers}")
        u_ckpt = ultralytics_pt_to_vocdet(Path(u["best"]), root, s, run_dir / "ultralytics_as_vocdet.ckpt")
        u["vocdet_metric"] = score_with_vocdet(u_ckpt, s)
        u.update(map50=u["vocdet_metric"]["map50"], map50_95=u["vocdet_metric"]["map50_95"])
    except (Exception, SystemExit) as e:
        errors.append(f"ultralytics: {_one_line(e)}")

    if "vocdet" in result and "ultralytics" in result:
        v, u = result["vocdet"], result["ultralytics"]
        result["train_speed_ratio"] = v["img_per_s"] / u["img_per_s"] if u["img_per_s"] else None
        vm, um = v["gpu_memory"]["peak_mb"], u["gpu_memory"]["peak_mb"]
        result["gpu_memory_ratio"] = vm / um if vm and um else None
        result["map50_diff"] = v["map50"] - u["map50"] if "map50" in u else None
    if s.epochs == 1:
        result["notes"].append("one epoch: img/s include the warm-up (the race counts epochs after the first)")
    if not cuda:
        result["notes"].append("CPU run: vocdet trains in fp32 (no bf16 units to measure), no GPU memory figures")
    if errors:
        raise StepFailed("; ".join(errors), result)
    return result


class StepFailed(Exception):
    """A step that failed after measuring something: the partial result is kept."""

    def __init__(self, message: str, partial: dict[str, Any]):
        super().__init__(message)
        self.partial = partial


def step_ddp(ctx: Context, timeout: float) -> dict[str, Any]:
    """``vocdet train --gpus 1 trainer.strategy=ddp`` for one epoch (gloo, one CPU process, off CUDA)."""
    s = argparse.Namespace(**{**vars(ctx.s), "epochs": 1, "close_mosaic": 0, "timeout": timeout})
    root, run_dir = ctx.data(), ctx.work / "ddp"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    device = ["--gpus", "1"] if ctx.cuda else ["--accelerator", "cpu", "--devices", "1"]
    # The race's settings; the CLI's --gpus adds trainer.accelerator=gpu after them. Precision: vocdet's default.
    over = [*race.vocdet_overrides(root, run_dir, s, "ddp"), "trainer.strategy=ddp"]
    cmd = [sys.executable, "-m", "vocdet", "train", *device, *over]
    log = run_dir / "ddp.log"
    with GpuMemory(ctx.cuda) as mem:
        peak, wall = run_measured(cmd, log, {**BENCH_ENV, **thread_env(s)}, timeout)
    secs, imgs = race.vocdet_epochs(run_dir / "ddp")
    metrics = json.loads((run_dir / "ddp" / "metrics.json").read_text())
    ctx.checkpoints["ddp"] = run_dir / "ddp" / "checkpoints" / "best.ckpt"
    return {
        "command": " ".join(["vocdet", "train", *device, "trainer.strategy=ddp", "..."]),
        "backend": "nccl" if ctx.cuda else "gloo",  # Lightning's DDP default for the accelerator
        "epochs": len(secs),
        "wall_s": wall,
        "epoch_s": secs[0],
        "img_per_s": race.timed_throughput(imgs, secs),
        "map50": metrics["map50"],
        "gpu_memory": mem.result(),
        **peak,
        "log": str(log),
    }


PARITY = re.compile(r"parity vs PyTorch on (\d+) images: max \|Δ\| raw outputs (\S+), boxes matched (\d+)/(\d+)")


def step_export(ctx: Context, timeout: float) -> dict[str, Any]:
    """``vocdet export --half export.device=cuda`` to ONNX and its parity check against PyTorch."""
    ckpt, source = ctx.checkpoint()
    half = ctx.cuda
    out = ctx.work / ("model-fp16.onnx" if half else "model.onnx")
    out.unlink(missing_ok=True)
    device = ["--half", "export.device=cuda"] if half else ["--full", "export.device=cpu"]
    cmd = [sys.executable, "-m", "vocdet", "export", "--checkpoint", str(ckpt), "--output", str(out), *device]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env(ctx.s),
                          stdin=subprocess.DEVNULL)  # fmt: skip
    (ctx.work / "export.log").write_text(proc.stdout + proc.stderr)
    result: dict[str, Any] = {"checkpoint": str(ckpt), "model_from": source, "half": half, "notes": []}
    if m := PARITY.search(proc.stdout):
        n, diff, matched, total = m.groups()
        result["parity"] = {
            "images": int(n),
            "max_abs_diff": float(diff) if diff != "n/a" else None,
            "matched": int(matched),
            "total": int(total),
            "agreement": int(matched) / int(total) if int(total) else 1.0,
        }
    if proc.returncode != 0:
        tail = [x for x in proc.stderr.splitlines() if x.strip()]
        raise StepFailed(f"vocdet export exited {proc.returncode}: {tail[-1] if tail else ''}", result)
    if "parity" not in result:
        raise StepFailed("vocdet export printed no parity line", result)
    if not half:
        result["notes"].append("CPU run: fp32 export (fp16 export needs CUDA)")
    if result["parity"]["total"] == 0:
        result["notes"].append("no detections above the parity threshold: only raw outputs were compared")
    result.update(onnx=str(out), size_mb=out.stat().st_size / 1e6, log=str(ctx.work / "export.log"))
    return result


def step_latency(ctx: Context, timeout: float) -> dict[str, Any]:
    """``Detector`` against ``YOLO.predict``, same weights and images, image path to final boxes on the host."""
    import torch
    from ultralytics import YOLO

    from vocdet.bench.predict import latency, throughput
    from vocdet.infer.detector import Detector

    s = ctx.s
    ckpt, source = ctx.checkpoint()
    pt = vocdet_ckpt_to_ultralytics(ckpt, ctx.work / "latency-ultralytics.pt")
    small, big = s.batches
    images = ctx.jpegs(max(64, big * 2))
    device = "cuda" if ctx.cuda else "cpu"
    torch.set_num_threads(s.threads)
    det = Detector.from_checkpoint(ckpt, device=device, half=False, imgsz=s.imgsz)
    yolo = YOLO(str(pt))

    def ultra(src: Any, **kw: Any) -> list[Any]:
        res = yolo.predict(src, imgsz=s.imgsz, device=0 if ctx.cuda else "cpu", verbose=False, **kw)
        return [r.boxes.data.cpu() for r in res]  # final boxes on the host, as Detector returns them

    ultra(images[0])
    torch.set_num_threads(s.threads)  # Ultralytics' predictor set its own thread count; compare at equal threads
    one = latency({"vocdet": det.predict, "ultralytics": ultra}, images, s.latency_n)
    n = big * s.big_batch_rounds
    v_ips = throughput(lambda b: det.predict(b, batch_size=big), images, big, n)
    u_ips = throughput(lambda b: ultra(b, batch=big), images, big, n)
    return {
        "checkpoint": str(ckpt),
        "model_from": source,
        "device": device,
        "precision": "fp32 (both)",
        "imgsz": s.imgsz,
        f"batch{small}": {
            "vocdet_ms": one["vocdet"]["median_ms"],
            "ultralytics_ms": one["ultralytics"]["median_ms"],
            "vocdet_p90_ms": one["vocdet"]["p90_ms"],
            "ultralytics_p90_ms": one["ultralytics"]["p90_ms"],
            "ratio": one["vocdet"]["median_ms"] / one["ultralytics"]["median_ms"],
            "calls": s.latency_n,
        },
        f"batch{big}": {
            "vocdet_ms": 1000 * big / v_ips,
            "ultralytics_ms": 1000 * big / u_ips,
            "vocdet_img_s": v_ips,
            "ultralytics_img_s": u_ips,
            "ratio": u_ips / v_ips,
            "images": n,
        },
    }


def step_serve(ctx: Context, timeout: float) -> dict[str, Any]:
    """``vocdet serve --checkpoint ... serve.device=cuda`` on loopback answering the plan's requests."""
    from vocdet.bench.load import PORT, hammer, make_client, start_server, stop, summarize

    s, deadline = ctx.s, time.monotonic() + timeout
    ckpt, source = ctx.checkpoint()
    device = "cuda" if ctx.cuda else "cpu"
    args = ["vocdet", "serve", "--port", PORT, "--checkpoint", str(ckpt), "--name", "voc", f"serve.device={device}"]
    images = [(p.name, p.read_bytes()) for p in ctx.jpegs(32)[:32]]
    log = ctx.work / "serve.log"
    proc, url = start_server(args, log, timeout=timeout / 2)
    try:

        async def load() -> dict[str, Any]:
            async with make_client(url, s.clients) as client:
                await hammer(client, images, s.clients, s.clients, 30.0)  # warm-up: connections, first batches
                left = max(deadline - time.monotonic() - 10, 5.0)
                return summarize("vocdet serve", s.clients, *await hammer(client, images, s.clients, s.requests, left))

        row = asyncio.run(load())
    finally:
        stop(proc)
    row["load_s"] = row.pop("seconds")  # the requests' wall time; "seconds" is the whole step's
    result = {"checkpoint": str(ckpt), "model_from": source, "device": device, "url": url, **row, "log": str(log)}
    if row["ok"] != s.requests:
        raise StepFailed(f"{row['ok']}/{s.requests} requests answered 200 ({row['outcomes']})", result)
    return result


STEP_FUNCTIONS: dict[str, Callable[[Context, float], dict[str, Any]]] = {
    "environment": step_environment,
    "race": step_race,
    "ddp": step_ddp,
    "export": step_export,
    "latency": step_latency,
    "serve": step_serve,
}


# ----------------------------------------------------------------------------------------------- driver


def run_step(name: str, ctx: Context) -> dict[str, Any]:
    """One step, timed; its failure is recorded (one line), never raised."""
    timeout = ctx.budget.timeout(name)
    print(f"[{name}] (timeout {timeout:.0f} s) ...", flush=True)
    t0 = time.perf_counter()
    try:
        record = {"status": "ok", **STEP_FUNCTIONS[name](ctx, timeout)}
    except StepFailed as e:
        record = {"status": "failed", "error": str(e), **e.partial}
    except subprocess.TimeoutExpired as e:
        record = {"status": "failed", "error": f"ran past its {e.timeout:.0f} s timeout"}
    except (Exception, SystemExit) as e:
        record = {"status": "failed", "error": _one_line(e)}
    record["seconds"] = time.perf_counter() - t0
    print(f"[{name}] {record['status']} in {record['seconds']:.1f} s: {describe(name, record)}", flush=True)
    return record


def _f(x: Any, fmt: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def describe(name: str, r: dict[str, Any]) -> str:
    """One line of what a step found (never raises: a record missing a figure still prints)."""
    try:
        return _describe(name, r)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return "; ".join(x for x in [r.get("error", ""), f"(no summary: {_one_line(e)})"] if x)


def _describe(name: str, r: dict[str, Any]) -> str:
    if r["status"] != "ok" and "error" in r:
        head = f"{r['error']}"
    else:
        head = ""
    parts = []
    if name == "environment" and r["status"] == "ok":
        g = r["gpu"]
        where = f"{g['name']} ({g['memory_gib']:.0f} GiB, driver {g['driver']})" if g else f"CPU ({r['cpus']} cores)"
        parts.append(
            f"{where}; CUDA {r['cuda']}, torch {r['torch']}, ultralytics {r['ultralytics']}, lightning "
            f"{r['lightning']}, onnxruntime {r['onnxruntime']} {r['onnxruntime_providers']}, vocdet {r['vocdet']}"
        )
    elif name == "race":
        v, u = r.get("vocdet"), r.get("ultralytics")
        if v and u:
            parts.append(
                f"train img/s vocdet {v['img_per_s']:.1f} ({v['precision']}) vs Ultralytics {u['img_per_s']:.1f} "
                f"({u['precision']}) = {_f(r['train_speed_ratio'], '.2f')}x; mAP50 (vocdet's metric) "
                f"{v['map50']:.3f} vs {u['map50']:.3f}; GPU peak MiB {_f(v['gpu_memory']['peak_mb'], '.0f')} vs "
                f"{_f(u['gpu_memory']['peak_mb'], '.0f')}"
            )
        else:
            for side, x in (("vocdet", v), ("Ultralytics", u)):
                if x:
                    parts.append(f"{side}: {x['img_per_s']:.1f} img/s, mAP50 {_f(x.get('map50'), '.3f')}")
    elif name == "ddp" and r["status"] == "ok":
        parts.append(
            f"1 epoch over {r['backend']}: {r['wall_s']:.1f} s in all, epoch {r['epoch_s']:.1f} s "
            f"({_f(r['img_per_s'])} img/s), GPU peak MiB {_f(r['gpu_memory']['peak_mb'], '.0f')}"
        )
    elif name == "export" and "parity" in r:
        p = r["parity"]
        kind = "fp16" if r["half"] else "fp32"
        size = f" {r['size_mb']:.1f} MB;" if "size_mb" in r else ""
        parts.append(
            f"{kind} ONNX;{size} parity on {p['images']} images: boxes matched {p['matched']}/{p['total']} "
            f"({100 * p['agreement']:.1f}%), max |Δ| raw {_f(p['max_abs_diff'], '.2e')}"
        )
    elif name == "latency" and r["status"] == "ok":
        for key in sorted((k for k in r if k.startswith("batch")), key=lambda k: int(k[5:])):
            b = r[key]
            parts.append(
                f"{key}: Detector {b['vocdet_ms']:.1f} ms vs YOLO.predict {b['ultralytics_ms']:.1f} ms "
                f"({b['ratio']:.2f}x)"
            )
    elif name == "serve" and "ok" in r:
        parts.append(
            f"{r['ok']}/{r['requests']} answered at {r['concurrency']} clients: {r['req_s']:.1f} req/s, "
            f"p50 {_f(r['p50_ms'])} ms, p99 {_f(r['p99_ms'])} ms"
        )
    if r.get("model_from", "race") != "race":
        parts.append(f"model: {r['model_from']}")
    return "; ".join(x for x in [head, *parts] if x)


def print_summary(report: dict[str, Any], path: Path) -> None:
    print(f"\nvocdet GPU check ({report['device']}{', tiny' if report['tiny'] else ''}), "
          f"{report['total_s']:.0f} s of a {report['budget_s']:.0f} s budget")  # fmt: skip
    print(f"{'step':<12} {'status':<8} {'seconds':>8}  result")
    for name, r in report["steps"].items():
        print(f"{name:<12} {r['status']:<8} {r['seconds']:8.1f}  {describe(name, r)}")
    failed = report["failed"]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all steps ok'}; wrote {path}")


def cuda_available() -> bool:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.cuda.is_available()


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vocdet.bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=Path("runs/bench"), help="writes <out>/gpu.json, work files in <out>/gpu"
    )
    p.add_argument("--budget-s", type=float, default=600.0, help="time budget: sizes epochs, iterations, timeouts")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: test the harness (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny settings (64 px, 40 images, 1 epoch): a harness test")
    p.add_argument("--data", type=Path, help="a flat VOC folder to train on instead of the synthetic set")
    a = p.parse_args(argv)
    if a.budget_s < 60:
        p.error("--budget-s must be at least 60")
    if a.data is not None and not (a.data / "JPEGImages").is_dir():
        p.error(f"--data {a.data}: not a VOC folder (no JPEGImages/)")
    return a


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit code (0 all ok, 1 a step failed, 2 no CUDA device)."""
    a = parse(argv)
    if a.device == "cuda" and not cuda_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)
    out = a.out.resolve()
    (out / "gpu").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(out / "gpu" / "ultralytics_cfg"))
    s = make_plan(a)
    ctx = Context(s, out, a.data.resolve() if a.data else None, Budget(a.budget_s))
    report: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": a.device,
        "tiny": a.tiny,
        "budget_s": a.budget_s,
        "settings": {k: v for k, v in vars(s).items() if k != "timeout"},
        "steps": {},
    }
    path = out / "gpu.json"
    for name in STEPS:
        report["steps"][name] = run_step(name, ctx)
        report["failed"] = [k for k, r in report["steps"].items() if r["status"] == "failed"]
        report["total_s"] = ctx.budget.elapsed()
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_summary(report, path)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks that stop the server
    sys.exit(main())
