"""The Prometheus alert rules and scrape config in docker/prometheus: valid (``promtool check``), right on synthetic
series (``promtool test rules``), and about metrics a real ``vocdet serve`` exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, ServerProcess

PROM = REPO / "docker" / "prometheus"
pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make promtool)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=PROM)


def test_rules_and_config_are_valid() -> None:
    rules = promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0 and "SUCCESS: 6 rules found" in rules.stdout, rules.stdout + rules.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_rule_unit_tests_pass_and_can_fail(tmp_path: Path) -> None:
    ok = promtool("test", "rules", "alerts.test.yml")
    assert ok.returncode == 0 and "SUCCESS" in ok.stdout, ok.stdout + ok.stderr
    # The same tests against rules whose drift alert lost its `for`: the test that expects silence at 11 min fails.
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] == "VocdetDriftAlarm":
            rule.pop("for")
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    shutil.copy(PROM / "alerts.test.yml", tmp_path)
    bad = subprocess.run(["promtool", "test", "rules", "alerts.test.yml"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0 and "VocdetDriftAlarm" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_every_metric_the_rules_use_is_exported(onnx_model: Path, sample_root: Path) -> None:
    """A real server with a model that carries a drift profile, after one request: each ``vocdet_*`` series an alert
    reads is in its /metrics."""
    exprs = " ".join(r["expr"] for r in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"][0]["rules"])
    used = set(re.findall(r"\b(vocdet_[a-z_]+)", exprs))
    assert {"vocdet_ready", "vocdet_drift_alarm", "vocdet_requests_total", "vocdet_request_seconds_bucket"} <= used
    srv = ServerProcess("--onnx", str(onnx_model), "--name", "voc")
    try:
        jpeg = next((sample_root / "JPEGImages").glob("*.jpg")).read_bytes()
        assert httpx.post(f"{srv.url}/predict", files={"file": ("a.jpg", jpeg)}).status_code == 200
        text = httpx.get(f"{srv.url}/metrics").text
    finally:
        srv.stop()
    exported = set(re.findall(r"^(vocdet_[a-z_]+)", text, re.M))
    assert used <= exported, used - exported
    assert re.search(r"^vocdet_ready 1\.0$", text, re.M)
