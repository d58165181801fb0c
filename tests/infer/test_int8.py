"""``vocdet export --int8``: a calibrated int8 ONNX model that passes the mAP gate, is served and predicted with
unchanged, and every bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error

pytestmark = pytest.mark.slow


def _meta(path: Path) -> dict:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props["vocdet"])


def test_int8_export_passes_the_gate_and_records_it(int8_model: Path, onnx_model: Path) -> None:
    import onnx

    meta = _meta(int8_model)
    q = meta["int8"]
    assert meta["precision"] == "int8" and q["calib_images"] == 200 and q["calib_skipped"] == 0
    assert "training split" in q["calibration"] and q["val_images"] > 0
    assert q["map50_fp32"] > 0.2, "the fixture model must detect things for the gate to mean something"
    assert q["map50_drop"] <= 0.01 and q["map50_drop"] == pytest.approx(q["map50_fp32"] - q["map50_int8"])
    graph = onnx.load(str(int8_model))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ
    decode = [n for n in graph.graph.node if n.name.startswith("/net/model.22/dfl/") or n.op_type == "Sigmoid"]
    assert decode and all("QuantizeLinear" not in n.op_type for n in decode)
    assert int8_model.stat().st_size < 0.4 * onnx_model.stat().st_size  # int8 weights: ~1/4 of fp32


def test_int8_model_predicts_like_fp32(int8_model: Path, onnx_model: Path, sample_root: Path) -> None:
    from vocdet.core.detections import match_detections
    from vocdet.infer.detector import Detector

    fp32, int8 = Detector.from_onnx(onnx_model), Detector.from_onnx(int8_model)
    assert int8.precision == "int8" and fp32.precision == "fp32"
    images = sorted((sample_root / "JPEGImages").glob("*.jpg"))[:8] if sample_root else []
    a, b = fp32.predict(images, conf=0.3), int8.predict(images, conf=0.3)
    matched = sum(match_detections(x, y, iou=0.8, score_tol=0.15)[0] for x, y in zip(a, b))
    total = sum(max(len(x), len(y)) for x, y in zip(a, b))
    assert total == 0 or matched / total >= 0.6


def test_int8_with_nms_in_the_graph(checkpoint: Path, tmp_path: Path) -> None:
    from vocdet.infer.detector import Detector
    from vocdet.infer.export import export

    out = export(
        checkpoint,
        overrides=[
            "export.int8=true",
            "export.nms=true",
            "export.dynamic_batch=true",
            f"export.output={tmp_path / 'n.onnx'}",
        ],
    )
    det = Detector.from_onnx(out)
    assert det.nms_in_graph and det.precision == "int8" and _meta(out)["int8"]["map50_drop"] <= 0.01


def test_int8_served_and_listed(int8_model: Path) -> None:
    from fastapi.testclient import TestClient

    from vocdet.config import load_config
    from vocdet.serve.app import create_app

    with TestClient(create_app(load_config(None, []), {"q": int8_model})) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the int8 model never became ready"
            time.sleep(0.05)
        info = client.get("/models").json()
        assert info[0]["precision"] == "int8"


def test_int8_bad_input_is_one_line_and_writes_nothing(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    assert_one_line_error(
        run_cli("export", "--checkpoint", str(checkpoint), "--int8", "-f", "torchscript", f"export.output={out}"),
        "use it with --format onnx",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(
        run_cli(
            "export", "--checkpoint", str(checkpoint), "--int8", f"export.calib_source={empty}", f"export.output={out}"
        ),
        "no images",
    )
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(20):
        (junk / f"{i}.jpg").write_bytes(b"not a jpeg")
    proc = run_cli(
        "export", "--checkpoint", str(checkpoint), "--int8", f"export.calib_source={junk}", f"export.output={out}"
    )
    assert proc.returncode == 2 and "skipped 20 unreadable images" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: int8 calibration needs at least 16 readable images")
    # A gate no model can pass: the measured drop is printed, exit 2, nothing written.
    proc = run_cli(
        "export", "--checkpoint", str(checkpoint), "--int8", "export.int8_max_map50_drop=-1", f"export.output={out}"
    )
    assert_one_line_error(proc, "loses", "mAP50 points against fp32", "nothing was written")
    assert "int8 accuracy gate on" in proc.stdout
    assert not out.exists() and not list(tmp_path.glob("q.onnx*"))


def test_session_options_come_from_the_predict_keys(int8_model: Path, tmp_path: Path, sample_root: Path) -> None:
    from fastapi.testclient import TestClient

    from vocdet.config import load_config
    from vocdet.infer.detector import Detector
    from vocdet.serve.app import create_app

    keys = [
        "predict.threads=1",
        "predict.ort_optimization=extended",
        "predict.ort_execution_mode=parallel",
        "predict.ort_mem_arena=false",
        "predict.ort_mem_pattern=false",
        "predict.ort_prepacking=false",
        "predict.ort_spinning=false",
    ]
    cfg = load_config(None, keys)

    def check(options) -> None:
        import onnxruntime as ort

        assert options.intra_op_num_threads == 1
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
        assert not options.enable_cpu_mem_arena and not options.enable_mem_pattern
        assert options.get_session_config_entry("session.disable_prepacking") == "1"
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"

    check(Detector.from_onnx(int8_model, predict=cfg.predict).backend.session.get_session_options())
    default = Detector.from_onnx(int8_model).backend.session.get_session_options()
    assert default.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    with TestClient(create_app(cfg, {"q": int8_model})) as client:  # vocdet serve passes its predict.* keys
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the model never became ready"
            time.sleep(0.05)
        check(client.app.state.vocdet.slots["q"].detector.backend.session.get_session_options())
    overlay = tmp_path / "session.yaml"
    overlay.write_text("predict:\n  ort_optimization: basic\n")
    image = sorted((sample_root / "JPEGImages").glob("*.jpg"))[0]
    out = tmp_path / "pred"
    proc = run_cli(
        "predict", str(image), "--onnx", str(int8_model), "--threads", "1", "-c", str(overlay), "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert isinstance(json.loads((out / "detections.json").read_text()), list) and proc.stdout.startswith("1 images")
    bad = tmp_path / "bad.yaml"
    bad.write_text("predict:\n  ort_optimization: fastest\n")
    assert_one_line_error(
        run_cli("predict", str(image), "--onnx", str(int8_model), "-c", str(bad), "--out", str(out)),
        "predict.ort_optimization='fastest' is not one of all|extended|basic|disable",
    )
