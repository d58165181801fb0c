"""End to end through the real CLI: synth -> train -> eval, DDP on 2 CPU processes, the real VOC sample,
detections files, W&B offline runs, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, tiny_overrides

pytestmark = pytest.mark.slow


def assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny training run through the CLI (two epochs so validation and checkpoints happen twice)."""
    run_dir = tmp_path_factory.mktemp("runs")
    # A two-epoch model scores below the default conf 0.001; a lower threshold (stored in the checkpoint)
    # gives the evaluation real detections to match.
    proc = run_cli("train", *tiny_overrides(synth_root, run_dir), "train.epochs=2", "eval.conf=0.00001")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "best checkpoint:" in proc.stdout
    assert "all" in proc.stdout and "AP50-95" in proc.stdout  # the per-class table
    return run_dir / "tiny"


def test_train_writes_run_directory(trained: Path, synth_root: Path) -> None:
    assert (trained / "checkpoints" / "best.ckpt").is_file() and (trained / "checkpoints" / "last.ckpt").is_file()
    assert (trained / "config.yaml").read_text().count("imgsz: 64") == 1
    metrics = json.loads((trained / "metrics.json").read_text())
    val_ids = (synth_root / "ImageSets" / "Main" / "val.txt").read_text().split()
    assert metrics["image_ids"] == sorted(val_ids)
    assert set(metrics) >= {"map50", "map50_95", "voc07_map50", "per_class", "data_root", "image_ids"}
    assert 0.0 <= metrics["map50_95"] <= metrics["map50"] <= 1.0
    assert (trained / "csv" / "metrics.csv").is_file()
    ckpt = torch.load(trained / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    meta = ckpt["vocdet"]
    assert meta["imgsz"] == 64 and meta["class_names"][14] == "person" and meta["config"]["data"]["imgsz"] == 64
    assert ckpt["hyper_parameters"]["config"]["run"]["name"] == "tiny"
    assert any(k.startswith("ema_model.") for k in ckpt["state_dict"])
    assert_plots(trained / "plots", num_val=len(metrics["image_ids"]))


def assert_plots(folder: Path, num_val: int) -> None:
    """The report files exist, are real images of sensible size, and the PR data covers the classes with gt."""
    from PIL import Image

    for name, min_size in (
        ("pr_curve.png", (800, 500)),
        ("confusion_matrix.png", (1000, 800)),
        ("per_class_ap.png", (600, 300)),
        ("val_predictions.jpg", (320, 320)),
    ):
        with Image.open(folder / name) as im:
            assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], (name, im.size)
            assert len(set(im.convert("L").resize((64, 64)).getdata())) > 8, name  # not a blank canvas
    with Image.open(folder / "val_predictions.jpg") as im:
        assert im.size[1] == 320 * ((min(num_val, 16) + 3) // 4)
    rows = (folder / "pr_curve.csv").read_text().splitlines()
    assert rows[0] == "class,recall,precision" and (len(rows) - 1) % 101 == 0 and len(rows) > 1


def test_eval_checkpoint_and_detections_file_agree(trained: Path, tmp_path: Path) -> None:
    out, preds = tmp_path / "m.json", tmp_path / "preds.json"
    proc = run_cli(
        "eval", "--checkpoint", str(trained / "checkpoints" / "best.ckpt"), "--output", str(out),
        "--predictions", str(preds), "trainer.enable_progress_bar=false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_ckpt = json.loads(out.read_text())
    assert_plots(tmp_path / "plots", num_val=len(from_ckpt["image_ids"]))  # eval writes them beside --output
    # The checkpoint alone was enough: data root, image size and thresholds came from inside it.
    assert from_ckpt["map50"] == pytest.approx(json.loads((trained / "metrics.json").read_text())["map50"], abs=1e-9)
    rows = json.loads(preds.read_text())
    assert rows and set(rows[0]) == {"image_id", "class", "score", "bbox"}
    out2 = tmp_path / "m2.json"
    proc = run_cli("eval", "--detections", str(preds), "--output", str(out2), f"data.root={from_ckpt['data_root']}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_file = json.loads(out2.read_text())
    for key in ("map50", "map50_95", "voc07_map50"):
        assert from_file[key] == pytest.approx(from_ckpt[key], abs=1e-6)

    # And the model's own detections scored by real pycocotools and the devkit transcription agree.
    import numpy as np

    from tests.core.test_metrics import VOC_CLASSES, coco_reference, voc_reference
    from vocdet.core.metrics import GroundTruth, Predictions
    from vocdet.core.voc import load_records, resolve_split

    gts = {
        r.id: GroundTruth(r.boxes.astype(float), r.labels, r.difficult)
        for r in load_records(resolve_split(from_ckpt["data_root"], [], "val"), "val")
    }
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["image_id"], []).append(row)
    preds_ref = {
        k: Predictions(
            np.array([r["bbox"] for r in v], float),
            np.array([r["score"] for r in v]),
            np.array([VOC_CLASSES.index(r["class"]) for r in v]),
        )
        for k, v in grouped.items()
    }
    map50_95, map50, _, _ = coco_reference(gts, preds_ref, list(VOC_CLASSES))
    voc_map, _ = voc_reference(gts, preds_ref, list(VOC_CLASSES))
    assert from_ckpt["map50"] == pytest.approx(map50, abs=1e-3)
    assert from_ckpt["map50_95"] == pytest.approx(map50_95, abs=1e-3)
    assert from_ckpt["voc07_map50"] == pytest.approx(voc_map, abs=1e-3)


def test_eval_detections_on_real_sample_matches_pycocotools(sample_root: Path, tmp_path: Path) -> None:
    from tests.core.test_metrics import VOC_CLASSES as REF_CLASSES
    from tests.core.test_metrics import coco_reference, load_sample, voc_reference  # independent pycocotools/devkit

    dets_dir = sample_root / "extras" / "dets_abs_xyx2y2_classid_conf"
    from vocdet.core.voc import VOC_CLASSES

    rows = []
    for f in sorted(dets_dir.glob("*.txt")):
        for line in f.read_text().splitlines():
            if line.strip():
                c, s, x1, y1, x2, y2 = line.split()
                rows.append({"image_id": f.stem, "class": VOC_CLASSES[int(c)], "score": float(s),
                             "bbox": [float(x1), float(y1), float(x2), float(y2)]})  # fmt: skip
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(rows))
    out = tmp_path / "m.json"
    proc = run_cli(
        "eval", "--detections", str(dets), "--output", str(out), f"data.root={sample_root}", "data.val_fraction=0"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads(out.read_text())
    gts, preds = load_sample()
    map50_95, map50, _, _ = coco_reference(gts, preds, list(REF_CLASSES))
    voc_map, _ = voc_reference(gts, preds, list(REF_CLASSES))
    assert ours["map50"] == pytest.approx(map50, abs=1e-3)
    assert ours["map50_95"] == pytest.approx(map50_95, abs=1e-3)
    assert ours["voc07_map50"] == pytest.approx(voc_map, abs=1e-3)
    assert len(ours["image_ids"]) == 100


def test_ddp_two_cpu_processes(synth_root: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "train", "--accelerator", "cpu", "--devices", "2", *tiny_overrides(synth_root, tmp_path, "ddp"),
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    # 8 val images over 2 ranks: each image scored exactly once.
    val_ids = (synth_root / "ImageSets" / "Main" / "val.txt").read_text().split()
    assert metrics["image_ids"] == sorted(val_ids)
    assert sum(c["num_gt"] + c["num_difficult"] for c in metrics["per_class"].values()) == sum(
        len(__import__("vocdet.core.voc", fromlist=["x"]).parse_voc_xml(synth_root / "Annotations" / f"{i}.xml").labels)
        for i in val_ids
    )
    # The checkpoint evaluated on one process gives the same numbers the two ranks agreed on.
    out = tmp_path / "single.json"
    proc = run_cli("eval", "--checkpoint", str(tmp_path / "ddp" / "checkpoints" / "best.ckpt"), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["map50_95"] == pytest.approx(metrics["map50_95"], abs=1e-9)


def test_real_sample_train_then_eval(sample_root: Path, tmp_path: Path) -> None:
    proc = run_cli("train", *tiny_overrides(sample_root, tmp_path, "real"), "data.val_fraction=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no split of its own and data.val_fraction=0: validation scores the training images" in proc.stderr
    metrics = json.loads((tmp_path / "real" / "metrics.json").read_text())
    assert len(metrics["image_ids"]) == 100
    per = metrics["per_class"]
    assert per["person"]["num_gt"] + per["person"]["num_difficult"] == 91
    assert sum(c["num_difficult"] for c in per.values()) == 38


def _wandb_records(run_dir: Path) -> list[dict]:
    """The records of an offline run's transaction log (what `wandb sync` uploads), read by W&B's own reader."""
    log = list(run_dir.glob("run-*.wandb"))
    assert len(log) == 1
    wandb_bin = Path(sys.executable).with_name("wandb")
    dump = subprocess.run(
        [str(wandb_bin), "leet", "inspect", "--json", str(log[0])], capture_output=True, text=True, timeout=120
    )
    return [json.loads(line) for line in dump.stdout.splitlines() if line.startswith("{")]


def test_wandb_offline_run_holds_config_metrics_images_and_artifacts(synth_root: Path, tmp_path: Path) -> None:
    args = [a for a in tiny_overrides(synth_root, tmp_path, "wb") if not a.startswith("logging.wandb")]
    extra = ["logging.wandb=true", "logging.log_every_n_steps=1", "logging.wandb_images=3", "eval.conf=0.00001"]
    proc = run_cli("train", *args, *extra, env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = _wandb_records(runs[0])
    run = next(r for r in records if r["type"] == "run")
    run_id = run["run"]["run_id"]
    assert run["run"]["config"]["update"]["data"]["imgsz"] == 64
    assert run["run"]["config"]["update"]["train"]["lr0"] == 0.01
    assert "api_key" not in json.dumps(run["run"]["config"]).lower()
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    logged = set().union(*history)
    for key in ("val/map50", "val/map50_95", "train/loss_step", "lr/bias", "lr/weight", "lr/bn"):
        assert key in logged, key
    # Validation images with predicted and true boxes: W&B stores the boxes as JSON files beside the images.
    images = [h for h in history if h.get("val/predictions._type") == "images/separated"]
    assert images and images[-1]["val/predictions.count"] == 3
    boxes = images[-1]["val/predictions.all_boxes"]
    assert len(boxes) == 3 and all(set(b) == {"predictions", "ground_truth"} for b in boxes)
    truth = json.loads((runs[0] / "files" / boxes[0]["ground_truth"]["path"]).read_text())
    assert truth["box_data"] and truth["class_labels"]["14"] == "person"
    first = truth["box_data"][0]["position"]
    assert first["maxX"] > first["minX"] >= 0 and first["maxY"] > first["minY"] >= 0
    for name in images[-1]["val/predictions.filenames"]:
        assert (runs[0] / "files" / name).is_file()
    # The best checkpoint as a model artifact, and the final metrics in the summary.
    arts = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert [a["name"] for a in arts] == [f"model-{run_id}"]
    assert set(arts[0]["aliases"]) >= {"best", "latest"}
    assert [c["path"] for c in arts[0]["manifest"]["contents"]] == ["best.ckpt"]
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    assert "final/map50" in summary

    # `vocdet export` adds the ONNX file to the same run (W&B resumes it by id; sync merges the two parts).
    ckpt = tmp_path / "wb" / "checkpoints" / "best.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["vocdet"]["wandb_id"] == run_id
    proc = run_cli("export", "--checkpoint", str(ckpt), env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(parts) == 2
    exported = [r["artifact"] for p in parts for r in _wandb_records(p) if r["type"] == "artifact"]
    onnx = next(a for a in exported if a["name"] == f"model-{run_id}-onnx")
    assert [c["path"] for c in onnx["manifest"]["contents"]] == ["best.onnx"]
    assert json.loads(onnx["metadata"])["format"] == "onnx"


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["train", "data.root=/nonexistent"], ["data root not found: /nonexistent", "vocdet data download"]),
        (["train", "data.no_such_key=1"], ["unknown config key 'data.no_such_key'"]),
        (["train", "data.imgsz=abc"], ["invalid value for 'data.imgsz'"]),
        (["train", "--gpus", "2"], ["--accelerator cpu --devices 2"]),
        (["train", "--config", "/nonexistent.yaml"], ["config file not found"]),
        (["eval", "--checkpoint", "/nonexistent.ckpt"], ["checkpoint not found"]),
        (["eval"], ["exactly one of --checkpoint or --detections"]),
    ],
)
def test_bad_input_exits_with_one_line(args: list[str], needles: list[str]) -> None:
    if args[:2] == ["train", "--gpus"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error(run_cli(*args, timeout=120), *needles)


def test_corrupt_and_foreign_checkpoints(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    assert_one_line_error(
        run_cli("eval", "--checkpoint", str(bad)), "bad.ckpt is not a vocdet checkpoint (not a PyTorch file)"
    )
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "epoch": 3}, foreign)
    assert_one_line_error(run_cli("eval", "--checkpoint", str(foreign)), "is not a vocdet checkpoint")


def test_synth_cli_is_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        proc = run_cli("data", "synth", "--out", str(tmp_path / name), "--images", "5", "--seed", "3", "--size", "96")
        assert proc.returncode == 0, proc.stderr
    for f in sorted((tmp_path / "a").rglob("*.*")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
