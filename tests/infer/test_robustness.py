"""``vocdet robustness``: deterministic corruptions, the report files, mAP that falls with severity, and the drift
alarm the server would raise on the same images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error
from vocdet.errors import VocdetError
from vocdet.infer.robustness import CORRUPTIONS, corrupt, parse_severities


@pytest.fixture(scope="module")
def photo(sample_root: Path) -> bytes:
    return next((sample_root / "JPEGImages").glob("*.jpg")).read_bytes()


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruptions_are_deterministic_and_grow_with_severity(photo: bytes, name: str) -> None:
    original = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR).astype(np.float32)
    assert corrupt(photo, name, 0, 0) == photo
    changes = []
    for severity in (1, 3, 5):
        once, again = corrupt(photo, name, severity, 7), corrupt(photo, name, severity, 7)
        assert once == again  # the same bytes for the same image index and severity
        img = cv2.imdecode(np.frombuffer(once, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == original.shape
        changes.append(float(np.abs(img - original).mean()))
    assert changes[0] < changes[2], changes


def test_severities_parse_and_bad_ones_are_refused() -> None:
    assert parse_severities("1-3,5") == [1, 2, 3, 5] and parse_severities([5, 1]) == [1, 5]
    for bad in ("0-2", "6", "a-b", ""):
        with pytest.raises(VocdetError, match=r"between 1 and 5|give numbers"):
            parse_severities(bad)


@pytest.mark.slow
def test_robustness_report_of_a_trained_model(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = run_cli(
        "robustness", "--checkpoint", str(checkpoint), "--corruptions", "dark,blur", "--severities", "1,5",
        "--output", str(out), "robustness.images=40",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "robustness.json").read_text())
    assert [(r["corruption"], r["severity"]) for r in rows] == [
        ("none", 0), ("dark", 1), ("dark", 5), ("blur", 1), ("blur", 5),
    ]  # fmt: skip
    by = {(r["corruption"], r["severity"]): r for r in rows}
    clean = by["none", 0]
    assert clean["map50"] > 0.2 and clean["images"] == 40 and clean["drift_alarm"] is False
    assert by["dark", 5]["map50"] < clean["map50"] and by["blur", 5]["map50"] < clean["map50"]
    assert by["dark", 5]["drift_alarm"] and "brightness" in by["dark", 5]["drifted"].split()
    assert by["blur", 5]["drift_alarm"] and "sharpness" in by["blur", 5]["drifted"].split()
    with (out / "robustness.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 5
    assert (out / "robustness.png").stat().st_size > 10_000
    assert "dark" in proc.stdout and "ALARM" in proc.stdout


def test_robustness_bad_input_is_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "x.ckpt"
    fake.write_bytes(b"not a checkpoint")
    assert_one_line_error(run_cli("robustness"), "give one of --checkpoint or --onnx")
    assert_one_line_error(run_cli("robustness", "--checkpoint", str(fake), "--severities", "1-9"), "between 1 and 5")
    assert_one_line_error(
        run_cli("robustness", "--checkpoint", str(fake), "--corruptions", "dark,fog"), "unknown corruption 'fog'"
    )
    assert_one_line_error(run_cli("robustness", "--checkpoint", str(fake)), "not a vocdet checkpoint")
