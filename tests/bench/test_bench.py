"""The pieces `make bench` relies on: YOLO-format conversion, checkpoint converters both ways, timed metrics."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vocdet.bench.common import BENCH_ENV, to_yolo, ultralytics_pt_to_vocdet, vocdet_ckpt_to_ultralytics
from vocdet.bench.race import metric_speed, ultralytics_args
from vocdet.core.voc import VOC_OFFSET, load_records, resolve_split


def test_to_yolo_labels_match_the_voc_boxes(synth_root: Path, tmp_path: Path) -> None:
    yaml = to_yolo(synth_root, tmp_path / "yolo")
    assert "names:" in yaml.read_text() and "  14: person" in yaml.read_text()
    for split in ("train", "val"):
        for r in load_records(resolve_split(synth_root, [], split), split):
            img = tmp_path / "yolo" / "images" / split / f"{r.id}.jpg"
            assert img.is_symlink() and img.resolve() == Path(r.image).resolve()
            rows = [
                line.split() for line in (tmp_path / "yolo" / "labels" / split / f"{r.id}.txt").read_text().splitlines()
            ]
            keep = ~r.difficult
            assert len(rows) == keep.sum()
            if rows:
                got = np.array(rows, float)
                assert (got[:, 0] == r.labels[keep]).all()
                x1, y1, x2, y2 = (r.boxes[keep] - VOC_OFFSET).T
                np.testing.assert_allclose(got[:, 1], (x1 + x2) / 2 / r.width, atol=2e-6)
                np.testing.assert_allclose(got[:, 4], (y2 - y1) / r.height, atol=2e-6)


@pytest.mark.slow
def test_ultralytics_side_trains_with_the_race_threads_and_workers(synth_root: Path, tmp_path: Path) -> None:
    """On CPU, Ultralytics' trainer sets workers=0 and cpu_count - 1 torch threads; the race overrides both."""
    import argparse
    import subprocess
    import sys

    race = argparse.Namespace(imgsz=64, batch=8, workers=1, epochs=1, nbs=8, close_mosaic=0, warmup_epochs=0, seed=0)
    args = ultralytics_args(to_yolo(synth_root, tmp_path / "yolo"), tmp_path / "runs", race)
    out = tmp_path / "u.json"
    env = {**os.environ, **BENCH_ENV, "OMP_NUM_THREADS": "2", "YOLO_CONFIG_DIR": str(tmp_path / "cfg")}
    proc = subprocess.run(
        [sys.executable, "-m", "vocdet.bench.race", "ultralytics_train", json.dumps(args), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["threads"] == [2] and res["workers"] == [1]
    assert res["images"] == [float(len(load_records(resolve_split(synth_root, [], "train"), "train")))]


@pytest.mark.slow
def test_checkpoint_converters_round_trip(synth_root: Path, tmp_path: Path) -> None:
    import argparse

    from ultralytics import YOLO

    import vocdet
    from tests.conftest import tiny_overrides

    os.environ.setdefault("YOLO_OFFLINE", "1")
    best = vocdet.train(
        vocdet.load_config(None, [*tiny_overrides(synth_root, tmp_path, "conv"), "trainer.limit_train_batches=1"])
    )
    pt = vocdet_ckpt_to_ultralytics(best, tmp_path / "as_ultralytics.pt")
    yolo = YOLO(str(pt))
    assert yolo.names[14] == "person" and len(yolo.names) == 20
    ours = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    theirs = yolo.model.state_dict()
    # The Ultralytics file holds our EMA weights, tensor for tensor.
    assert all(torch.equal(theirs[k], ours["ema_model." + k].float()) for k in theirs)
    x = torch.rand(1, 3, 64, 64)
    from vocdet.training.module import DetectionModule

    module = DetectionModule(torch.load(best, map_location="cpu", weights_only=True)["hyper_parameters"]["config"])
    module.load_state_dict(ours)
    module.eval()
    yolo.model.eval()
    torch.testing.assert_close(module(x), yolo.model(x)[0], rtol=1e-4, atol=1e-4)

    back = ultralytics_pt_to_vocdet(
        pt, synth_root, argparse.Namespace(imgsz=64, batch=8, workers=0), tmp_path / "b.ckpt"
    )
    again = torch.load(back, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(again["model." + k], theirs[k]) for k in theirs)


def test_timed_metrics_compute_the_same_numbers() -> None:
    pytest.importorskip("pycocotools")
    m = metric_speed(n_images=200)
    assert m["map50_95_vocdet"] == m["map50_95_pycocotools"] > 0
    assert m["vocdet_s"] > 0 and m["pycocotools_s"] > 0


@pytest.mark.slow
def test_bench_predict_prints_and_writes_its_figures(
    checkpoint: Path, sample_root: Path, tmp_path: Path, capsys
) -> None:
    from vocdet.bench.predict import main

    r = main(["--checkpoint", str(checkpoint), "--images", str(sample_root / "JPEGImages"), "--imgsz", "128",
              "--n", "4", "--batch", "2", "--out", str(tmp_path), "--real-checkpoint", str(checkpoint)])  # fmt: skip
    out = capsys.readouterr().out
    assert "Detector (ONNX Runtime)" in out and "Detector (ONNX int8)" in out and "÷ Ultralytics" in out
    saved = json.loads((tmp_path / "predict.json").read_text())
    for name in ("ultralytics", "torch", "onnx", "int8"):
        assert saved[name]["median_ms"] > 0 and saved[name]["p90_ms"] >= saved[name]["median_ms"]
        assert saved[name]["batch1_img_s"] > 0 and saved[name]["batch2_img_s"] > 0
    assert saved["torch_latency_ratio"] == pytest.approx(r["torch"]["median_ms"] / r["ultralytics"]["median_ms"])
    assert saved["int8_latency_ratio"] == pytest.approx(r["int8"]["median_ms"] / r["ultralytics"]["median_ms"])
    acc = saved["map50"]
    assert set(acc) == {"val split", "VOC sample"} and all(set(v) == {"torch", "onnx", "int8"} for v in acc.values())
    assert acc["val split"]["torch"] > 0.2 and abs(acc["val split"]["int8"] - acc["val split"]["onnx"]) <= 0.02
    assert (tmp_path / "predict-int8.onnx").is_file() and (tmp_path / "real-int8.onnx").is_file()


def test_fidelity_confidence_interval_and_t_quantiles() -> None:
    from vocdet.bench.fidelity import mean_diff_ci, t975

    assert t975(4) == pytest.approx(2.776) and t975(1e6) == pytest.approx(1.96) and 2.571 < t975(4.5) < 2.776
    # Welch: equal variances and sizes give df = 2n - 2; the interval is d ± t * sqrt(2 s² / n).
    a, b = [0.80, 0.82, 0.84, 0.86, 0.88], [0.81, 0.83, 0.85, 0.87, 0.89]
    d, lo, hi = mean_diff_ci(a, b)
    half = 2.306 * math.sqrt(2 * np.var(a, ddof=1) / 5)
    assert d == pytest.approx(-0.01) and lo == pytest.approx(d - half) and hi == pytest.approx(d + half)


def test_second_generator_writes_one_based_voc_boxes_that_bound_the_shapes(tmp_path: Path) -> None:
    """shapes2's XML follows VOC's convention, so vocdet's -1 offset lands each box on the drawn pixels."""
    import cv2

    from vocdet.bench.fidelity import shapes2

    root = shapes2(tmp_path / "s2", images=12, seed=0, size=160)
    recs = load_records(resolve_split(root, [], "train"), "train") + load_records(resolve_split(root, [], "val"), "val")
    assert len(recs) == 12 and sum(len(r.boxes) for r in recs) > 20
    sizes = set()
    for r in recs:
        img = cv2.imread(r.image)
        sizes.add(img.shape[:2])
        x1, y1, x2, y2 = (r.boxes - VOC_OFFSET).T  # continuous pixel edges
        assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= r.width).all() and (y2 <= r.height).all()
        assert ((x2 - x1) >= 6).all() and ((y2 - y1) >= 6).all()
    assert len(sizes) > 3  # several sizes and aspect ratios
