"""The library as a notebook uses it: `import vocdet` -> load_config -> train -> evaluate, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vocdet
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_import_is_light_and_lists_the_api() -> None:
    assert {"load_config", "train", "evaluate", "export", "Detector", "Detection", "plot", "VOC_CLASSES"} <= set(
        vocdet.__all__
    )
    assert callable(vocdet.export) and vocdet.Detector.__name__ == "Detector"
    assert vocdet.VOC_CLASSES[10] == "diningtable" and vocdet.VOC_CLASSES[11] == "dog"
    with pytest.raises(AttributeError):
        _ = vocdet.no_such_thing


def test_train_then_evaluate_in_process(synth_root: Path, tmp_path: Path) -> None:
    cfg = vocdet.load_config(None, [*tiny_overrides(synth_root, tmp_path, "api"), "eval.conf=0.00001"])
    best = vocdet.train(cfg)
    assert best == tmp_path / "api" / "checkpoints" / "best.ckpt" and best.is_file()
    saved = json.loads((tmp_path / "api" / "metrics.json").read_text())

    metrics = vocdet.evaluate(best, overrides=["trainer.enable_progress_bar=false"], output=tmp_path / "again.json")
    assert metrics["map50_95"] == pytest.approx(saved["map50_95"], abs=1e-9)
    assert json.loads((tmp_path / "again.json").read_text())["map50"] == pytest.approx(metrics["map50"])
    # Overrides on top of the checkpoint's own config: a stricter threshold can only lose detections.
    strict = vocdet.evaluate(best, overrides=["eval.conf=0.5", "trainer.enable_progress_bar=false"])
    assert sum(c["num_pred"] for c in strict["per_class"].values()) <= sum(
        c["num_pred"] for c in metrics["per_class"].values()
    )
    with pytest.raises(vocdet.VocdetError, match="exactly one of"):
        vocdet.evaluate()


def test_a_second_run_never_overwrites_the_first(synth_root: Path, tmp_path: Path) -> None:
    over = [*tiny_overrides(synth_root, tmp_path, "same"), "trainer.limit_train_batches=1"]
    first = vocdet.train(vocdet.load_config(None, over))
    stamp = first.stat().st_mtime_ns
    second = vocdet.train(vocdet.load_config(None, over))
    assert first == tmp_path / "same" / "checkpoints" / "best.ckpt"
    assert second == tmp_path / "same-2" / "checkpoints" / "best.ckpt"
    assert first.stat().st_mtime_ns == stamp and (tmp_path / "same-2" / "config.yaml").read_text().count("same-2")
    # exist_ok: the same directory, the same file names.
    third = vocdet.train(vocdet.load_config(None, [*over, "run.exist_ok=true"]))
    assert third == first and first.stat().st_mtime_ns != stamp
