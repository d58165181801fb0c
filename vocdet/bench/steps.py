"""``make bench-steps``: where a training step's time goes, vocdet against Ultralytics' trainer.

Both sides train yolov8n on the bench's synthetic set with the race's settings (imgsz, batch, workers, threads),
each in its own process, with the functions both of them call wrapped in timers: the dataloader's ``__next__``
(the wait for a training batch), ``BaseModel.predict`` in training mode (forward), ``v8DetectionLoss``,
``Tensor.backward``, ``clip_grad_norm_``, ``SGD.step`` and each side's EMA update; on vocdet's side also
Lightning's ``log``. "other" is the rest of the step: the loop, hooks, progress and LR bookkeeping. The first
epoch is the warm-up and is not counted. Prints milliseconds per step and writes ``runs/bench/steps.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

PARTS = ("data wait", "forward", "loss", "backward", "clip_grad", "optimizer", "ema", "logging")


def _instrument(warm_steps: int) -> tuple[dict[str, float], dict[str, int]]:
    """Wrap the shared functions; returns (seconds per part, {"steps": training forwards so far})."""
    import torch
    import torch.nn.utils
    from lightning.pytorch.core.module import LightningModule
    from torch.utils.data import dataloader
    from ultralytics.nn import tasks
    from ultralytics.utils import loss, torch_utils

    import vocdet.training.module

    seconds: dict[str, float] = defaultdict(float)
    state = {"steps": 0, "batches": 0, "train_forward": 0, "depth": 0}

    def timed(name: str, fn: Callable[..., Any], when: Callable[..., bool] = lambda *a, **k: True) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not when(*args, **kwargs) or state["depth"]:
                return fn(*args, **kwargs)
            state["depth"] += name == "logging"  # Lightning's log_dict calls log: count the outer call only
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                state["depth"] -= name == "logging"
                if state["steps"] > warm_steps:
                    seconds[name] += time.perf_counter() - t0

        return wrapper

    predict = tasks.BaseModel.predict

    def counted_predict(model: Any, *args: Any, **kwargs: Any) -> Any:
        if model.training and state["batches"]:  # not the forwards that build the network (stride probing)
            state["steps"] += 1
            state["train_forward"] = 1
        return predict(model, *args, **kwargs)

    def after_training_forward(*args: Any, **kwargs: Any) -> bool:  # Ultralytics' validator also calls the loss
        on, state["train_forward"] = state["train_forward"], 0
        return bool(on)

    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    torch.nn.utils.clip_grad_norm_ = timed("clip_grad", torch.nn.utils.clip_grad_norm_)
    torch.optim.SGD.step = timed("optimizer", torch.optim.SGD.step)
    it = dataloader._BaseDataLoaderIter
    next_batch = it.__next__

    def counted_next(self: Any) -> Any:
        state["batches"] += 1
        return next_batch(self)

    it.__next__ = timed("data wait", counted_next, lambda self: getattr(self._dataset, "augment", False))
    tasks.BaseModel.predict = timed("forward", counted_predict, lambda model, *a, **k: model.training)
    loss.v8DetectionLoss.__call__ = timed("loss", loss.v8DetectionLoss.__call__, after_training_forward)
    torch_utils.ModelEMA.update = timed("ema", torch_utils.ModelEMA.update)
    vocdet.training.module.ModelEMA.update = timed("ema", vocdet.training.module.ModelEMA.update)
    LightningModule.log = timed("logging", LightningModule.log)
    LightningModule.log_dict = timed("logging", LightningModule.log_dict)
    return seconds, state


def _race_settings(s: argparse.Namespace) -> argparse.Namespace:
    """The bench's race settings for a step profile: one optimiser step a batch, mosaic throughout, seed 0."""
    return argparse.Namespace(**vars(s), nbs=s.batch, close_mosaic=0, warmup_epochs=1.0, seed=0)


def _side(which: str, s: argparse.Namespace) -> None:
    """Child process: train one side with the timers in place; write its figures to ``s.out``."""
    from vocdet.bench.race import to_yolo, ultralytics_args, ultralytics_train, vocdet_epochs, vocdet_overrides

    n_train = len((Path(s.data) / "ImageSets" / "Main" / "train.txt").read_text().split())
    per_epoch = math.ceil(n_train / s.batch)
    seconds, state = _instrument(warm_steps=per_epoch)
    run_dir, race = Path(s.out).with_suffix(""), _race_settings(s)
    if which == "vocdet":
        import vocdet
        from vocdet.config import load_config

        vocdet.train(load_config(None, vocdet_overrides(Path(s.data), run_dir, race, options=["logging.plots=false"])))
        epoch_seconds, _ = vocdet_epochs(run_dir / "vocdet")
    else:
        args = ultralytics_args(to_yolo(Path(s.data), run_dir / "yolo"), run_dir, race)
        ultralytics_train(json.dumps(args), str(run_dir / "ultralytics.json"))
        epoch_seconds = json.loads((run_dir / "ultralytics.json").read_text())["seconds"]
    steps = state["steps"] - per_epoch
    step_ms = sum(epoch_seconds[1:]) / steps * 1e3
    parts = {k: seconds[k] / steps * 1e3 for k in PARTS}
    parts["other"] = step_ms - sum(parts.values())
    Path(s.out).write_text(json.dumps({"steps": steps, "step_ms": step_ms, "parts_ms": parts}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vocdet.bench.steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("runs/bench/data/synth"), help="a VOC folder (made if absent)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/steps.json"))
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="the first is the warm-up and is not counted")
    p.add_argument("--side", choices=("vocdet", "ultralytics"), help=argparse.SUPPRESS)
    s = p.parse_args(argv)
    from vocdet.bench.common import BENCH_ENV, synthetic_set, thread_env

    os.environ.update(BENCH_ENV)
    if s.side:
        _side(s.side, s)
        return
    synthetic_set(s.data, images=400, seed=0, imgsz=s.imgsz)
    env = {**os.environ, **thread_env(s)}
    env.setdefault("YOLO_CONFIG_DIR", str(s.out.resolve().parent / "ultralytics_cfg"))
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(s).items() if k != "side"}}
    for which in ("vocdet", "ultralytics"):
        part = s.out.with_name(f"{s.out.stem}-{which}.json")
        print(f"{which} ...", flush=True)
        cmd = [sys.executable, "-m", "vocdet.bench.steps", "--side", which, "--out", str(part)]
        cmd += [f"--{k}={v}" for k, v in vars(s).items() if k not in ("side", "out")]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, timeout=3600)
        results[which] = json.loads(part.read_text())
    s.out.write_text(json.dumps(results, indent=2))
    v, u = results["vocdet"], results["ultralytics"]
    print(f"\nms per training step ({v['steps']} and {u['steps']} steps after a warm-up epoch)")
    print(f"{'':12}{'vocdet':>10}{'Ultralytics':>13}{'Ultralytics / vocdet':>22}")
    for k in (*PARTS, "other"):
        a, b = v["parts_ms"][k], u["parts_ms"][k]
        print(f"{k:12}{a:10.1f}{b:13.1f}{b / a if a > 0.05 else float('nan'):22.2f}")
    print(f"{'step':12}{v['step_ms']:10.1f}{u['step_ms']:13.1f}{u['step_ms'] / v['step_ms']:22.2f}")
    print(f"\nwrote {s.out}")


if __name__ == "__main__":
    main()
