"""``python -m vocdet.bench.load``: the load harness against real servers on loopback, with tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from vocdet.bench import load as loadtest

pytestmark = pytest.mark.slow


def test_loadtest_and_soak_against_real_servers(
    onnx_model: Path, int8_model: Path, sample_root: Path, tmp_path: Path
) -> None:
    images = str(sample_root / "JPEGImages")
    common = ["--quick", "--onnx", str(onnx_model), "--images", images, "--out", str(tmp_path)]
    report = loadtest.main([*common, "--int8", str(int8_model), "--servers", "batched,baseline,batched-int8"])

    data = json.loads((tmp_path / "loadtest.json").read_text())
    assert data == json.loads(json.dumps(report))  # the file is the returned report
    assert set(data) == {"settings", "bare", "servers", "results", "goals"}
    assert data["settings"]["levels"] == [1, 4] and data["settings"]["requests"] == 20
    assert data["settings"]["n_images"] == len(list((sample_root / "JPEGImages").glob("*.jpg")))

    rows = {(r["server"], r["concurrency"]): r for r in data["results"]}
    assert set(rows) == {(s, c) for s in ("batched", "baseline", "batched-int8") for c in (1, 4)}
    for r in rows.values():
        assert r["requests"] == 20  # every request sent within the time cap
        assert r["ok"] + r["errors"] == r["requests"]
        assert r["req_s"] > 0 and r["seconds"] > 0
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        # Little's law: the clients were busy (in flight) for between half and all of the level's wall time.
        in_flight = r["mean_ms"] / 1000 * r["requests"] / r["seconds"]
        assert 0.5 * r["concurrency"] <= in_flight <= r["concurrency"] + 1e-6
    for c in (1, 4):
        for server in ("batched", "batched-int8"):
            batched = rows[(server, c)]
            assert batched["errors"] == 0 and batched["outcomes"] == {"200": 20}
            assert 1 <= batched["mean_batch"] <= 8
        assert rows[("baseline", c)]["mean_batch"] is None
    # The baseline serves strictly one request at a time (blocking loads on the event loop): four concurrent
    # clients queue behind each other, which also shows the harness really runs its clients concurrently.
    assert rows[("baseline", 4)]["p50_ms"] > 2 * rows[("baseline", 1)]["p50_ms"]
    # A model loaded once beats a model loaded from disk per request.
    assert rows[("batched", 4)]["req_s"] > rows[("baseline", 4)]["req_s"]

    bare = data["bare"]
    assert set(bare) == {"batch8_img_s", "infer8_ms", "batch1_img_s", "infer1_ms"}
    assert all(v > 0 for v in bare.values())

    goals = {g["name"]: g for g in data["goals"]}
    assert len(goals) == 5 and all(g["at"] == 4 for g in goals.values())  # no 16-client level: the highest
    int8 = goals["batched-int8 / batched req/s"]
    assert int8["value"] == pytest.approx(rows[("batched-int8", 4)]["req_s"] / rows[("batched", 4)]["req_s"])
    ratio = goals["batched / baseline req/s"]
    assert ratio["value"] == pytest.approx(rows[("batched", 4)]["req_s"] / rows[("baseline", 4)]["req_s"])
    assert ratio["ok"] == (ratio["value"] >= 3)
    assert goals["batched / no-batching req/s"]["ok"] is None  # not measured: n/a, never a fake pass
    assert set(data["servers"]) == {"batched", "baseline", "batched-int8"}
    assert data["servers"]["batched-int8"]["args"][5] == str(int8_model)
    assert data["servers"]["batched"]["args"][5] == str(onnx_model.resolve())
    assert not any(psutil.pid_exists(s["pid"]) for s in data["servers"].values())  # servers stopped

    soak = loadtest.main([*common, "--soak", "--soak-requests", "100"])
    on_disk = json.loads((tmp_path / "soak.json").read_text())
    assert set(on_disk) == {
        "settings",
        "pid",
        "requests",
        "errors",
        "rss_first",
        "rss_last",
        "rss_ratio",
        "ok",
        "phases",
    }
    assert soak["requests"] == 100 and soak["errors"] == 0
    assert [p["requests"] for p in soak["phases"]] == [10, 90]
    assert soak["rss_first"] > 50 * 2**20 and soak["rss_ratio"] == pytest.approx(soak["rss_last"] / soak["rss_first"])
    assert not psutil.pid_exists(soak["pid"])
