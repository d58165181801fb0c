"""``python -m vocdet.bench.gpu`` (``make gpu-check``): its refusal without CUDA, its sizing, and the whole harness
run end to end on the CPU with ``--device cpu --tiny``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, finish, start_process
from vocdet.bench.gpu import STEPS, Budget, make_plan

NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}  # hides any GPU: the tests mean the same on a CUDA machine


@pytest.mark.parametrize("extra", [[], ["--tiny"]])
def test_without_cuda_it_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "vocdet.bench.gpu", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **NO_CUDA},
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: no CUDA device (torch.cuda.is_available() is False)")
    assert "--device cpu --tiny" in lines[0]
    assert proc.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("budget", [120.0, 600.0, 1800.0])
def test_the_budget_sizes_the_gpu_run(budget: float) -> None:
    a = argparse.Namespace(device="cpu", tiny=False, budget_s=budget)  # cpu: only the precision differs
    s = make_plan(a)
    assert (s.imgsz, s.batch, s.batches, s.requests) == (640, 64, (1, 32), 100)
    assert 2 <= s.epochs <= 8 and 320 <= s.images <= 1280
    b = Budget(budget)
    # every step keeps time for the ones after it, and the race gets the most
    timeouts = {name: b.timeout(name) for name in STEPS}
    assert timeouts["race"] < budget and timeouts["serve"] <= budget
    assert timeouts["race"] + 0.5 * budget * 0.4 == pytest.approx(budget, abs=1.0)


@pytest.mark.slow
def test_tiny_cpu_run_measures_every_step(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    start = time.monotonic()
    proc = start_process(
        [sys.executable, "-m", "vocdet.bench.gpu", "--device", "cpu", "--tiny", "--budget-s", "300",
         "--out", str(out), "--data", str(synth_root)],
        env=NO_CUDA,
    )  # fmt: skip
    log = finish(proc, timeout=420)
    print(f"tiny gpu check in {time.monotonic() - start:.0f} s")
    assert proc.returncode == 0, log[-4000:]

    report = json.loads((out / "gpu.json").read_text())
    assert list(report["steps"]) == list(STEPS)
    assert report["failed"] == [] and report["device"] == "cpu" and report["tiny"]
    for name, step in report["steps"].items():
        assert step["status"] == "ok" or (step["status"] == "skipped" and step["reason"]), (name, step)
        assert step["seconds"] > 0

    env = report["steps"]["environment"]
    assert env["torch"] and env["ultralytics"] and env["lightning"] and env["vocdet"]
    assert "CPUExecutionProvider" in env["onnxruntime_providers"] and env["gpu"] is None

    race = report["steps"]["race"]
    for side in ("vocdet", "ultralytics"):
        assert race[side]["img_per_s"] > 0
        assert isinstance(race[side]["map50"], float) and 0 <= race[side]["map50"] <= 1
        assert race[side]["gpu_memory"]["peak_mb"] is None and race[side]["gpu_memory"]["skipped"]
    assert race["vocdet"]["precision"] == "32-true" and race["train_speed_ratio"] > 0
    assert Path(race["vocdet"]["best"]).is_file()

    ddp = report["steps"]["ddp"]
    assert ddp["backend"] == "gloo" and ddp["epochs"] == 1 and ddp["wall_s"] > 0

    export = report["steps"]["export"]
    assert export["half"] is False and export["model_from"] == "race" and Path(export["onnx"]).is_file()
    assert export["parity"]["images"] > 0 and export["parity"]["agreement"] >= 0.99
    assert export["parity"]["max_abs_diff"] < 0.05

    latency = report["steps"]["latency"]
    for key in ("batch1", "batch2"):
        assert latency[key]["vocdet_ms"] > 0 and latency[key]["ultralytics_ms"] > 0 and latency[key]["ratio"] > 0

    serve = report["steps"]["serve"]
    assert serve["ok"] == serve["requests"] == 10 and serve["errors"] == 0 and serve["req_s"] > 0
    assert 0 < serve["load_s"] < serve["seconds"]

    # the printed summary: one row per step, then where the report went
    lines = log.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("step ") and "status" in line)
    for name, row in zip(STEPS, lines[header + 1 : header + 1 + len(STEPS)]):
        assert row.split()[:2] == [name, "ok"], row
    assert "train img/s vocdet" in log and "Detector" in log and "10/10 answered" in log
    assert f"all steps ok; wrote {out / 'gpu.json'}" in log


def test_a_failing_step_is_recorded_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vocdet.bench import gpu

    def boom(ctx: gpu.Context, timeout: float) -> dict:
        raise RuntimeError("the export fell over\nsecond line")

    fakes = {name: (lambda ctx, timeout: {}) for name in STEPS}
    monkeypatch.setattr(gpu, "STEP_FUNCTIONS", {**fakes, "export": boom})
    assert gpu.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["failed"] == ["export"]
    assert report["steps"]["export"] == {
        "status": "failed",
        "error": "RuntimeError: the export fell over",
        "seconds": report["steps"]["export"]["seconds"],
    }
    assert all(report["steps"][n]["status"] == "ok" for n in STEPS if n != "export")
    out = capsys.readouterr().out
    assert "export       failed" in out and "FAILED: export; wrote" in out


def test_gpu_memory_is_the_peak_above_the_starting_level(monkeypatch: pytest.MonkeyPatch) -> None:
    from vocdet.bench import gpu

    readings = iter([100 * 2**20, 300 * 2**20, 900 * 2**20, 400 * 2**20])
    last = [100 * 2**20]

    def read() -> int:
        last[0] = next(readings, last[0])
        return last[0]

    monkeypatch.setattr(gpu, "_memory_reader", lambda: (read, "fake"))
    with gpu.GpuMemory(True, interval=0.01) as mem:
        time.sleep(0.2)
    assert mem.result() == {"peak_mb": 800.0, "baseline_mb": 100.0, "method": "fake"}
    assert gpu.GpuMemory(False).result()["skipped"]


def test_the_summary_of_a_gpu_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The rows only a CUDA run fills in (GPU name, memory peaks, fp16 export, batch 32) format without a GPU."""
    from vocdet.bench.gpu import print_summary

    mem = {"peak_mb": 5120.0, "baseline_mb": 600.0, "method": "nvml"}
    side = {"img_per_s": 900.0, "map50": 0.41, "gpu_memory": mem}
    steps = {
        "environment": {"status": "ok", "seconds": 1.0, "cpus": 16, "cuda": "12.8", "torch": "2.8", "ultralytics": "8",
                        "lightning": "2.6", "onnxruntime": "1.22", "onnxruntime_providers": ["CUDAExecutionProvider"],
                        "vocdet": "0.1.0", "gpu": {"name": "NVIDIA H200", "memory_gib": 139.8, "driver": "570"}},
        "race": {"status": "ok", "seconds": 200.0, "vocdet": {**side, "precision": "bf16-mixed"},
                 "ultralytics": {**side, "precision": "AMP (fp16)"}, "train_speed_ratio": 1.0},
        "ddp": {"status": "ok", "seconds": 40.0, "backend": "nccl", "wall_s": 40.0, "epoch_s": 3.0,
                "img_per_s": 300.0, "gpu_memory": mem},
        "export": {"status": "failed", "seconds": 20.0, "error": "vocdet export exited 2: error: disagrees",
                   "half": True, "model_from": "race",
                   "parity": {"images": 6, "matched": 90, "total": 100, "agreement": 0.9, "max_abs_diff": 0.5}},
        "latency": {"status": "ok", "seconds": 30.0, "model_from": "ddp",
                    "batch1": {"vocdet_ms": 4.0, "ultralytics_ms": 5.0, "ratio": 0.8},
                    "batch32": {"vocdet_ms": 40.0, "ultralytics_ms": 50.0, "ratio": 0.8}},
        "serve": {"status": "ok", "seconds": 20.0, "ok": 100, "requests": 100, "concurrency": 8, "req_s": 250.0,
                  "p50_ms": 20.0, "p99_ms": 60.0},
    }  # fmt: skip
    report = {
        "device": "cuda",
        "tiny": False,
        "total_s": 330.0,
        "budget_s": 600.0,
        "steps": steps,
        "failed": ["export"],
    }
    print_summary(report, tmp_path / "gpu.json")
    out = capsys.readouterr().out
    assert "NVIDIA H200 (140 GiB, driver 570)" in out
    assert "GPU peak MiB 5120 vs 5120" in out and "1 epoch over nccl" in out
    assert "vocdet export exited 2: error: disagrees; fp16 ONNX; parity on 6 images: boxes matched 90/100" in out
    assert "batch32: Detector 40.0 ms vs YOLO.predict 50.0 ms (0.80x)" in out and "model: ddp" in out
    assert "100/100 answered at 8 clients: 250.0 req/s" in out and "FAILED: export" in out


def test_without_a_trained_model_later_steps_get_an_untrained_one(synth_root: Path, tmp_path: Path) -> None:
    from vocdet.bench import gpu
    from vocdet.infer.detector import Detector

    s = make_plan(argparse.Namespace(device="cpu", tiny=True, budget_s=600.0))
    ctx = gpu.Context(s, tmp_path, synth_root, Budget(600))
    ctx.checkpoints["race"] = tmp_path / "missing.ckpt"  # a race that failed before writing its model
    path, source = ctx.checkpoint()
    assert source.startswith("untrained") and path == tmp_path / "gpu" / "untrained.ckpt"
    det = Detector.from_checkpoint(path, device="cpu")
    assert det.imgsz == 64 and len(det.class_names) == 20
    assert isinstance(det.predict(ctx.jpegs(1)[0])[0], list)
