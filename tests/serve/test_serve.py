"""``vocdet serve`` as a real uvicorn process on loopback: endpoints, micro-batching, limits and bad input,
run-time model upload, metrics, overload, SIGTERM under load, and a schemathesis fuzz of the OpenAPI schema."""

from __future__ import annotations

import io
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import ServerProcess, run_cli
from tests.test_cli import assert_one_line_error
from vocdet.infer.detector import Detector

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def jpeg(sample_root: Path) -> bytes:
    return sorted((sample_root / "JPEGImages").glob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def strict_server(onnx_model: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """Small limits, an admin token, and two models from config (an ONNX export and the checkpoint)."""
    config = tmp_path_factory.mktemp("serve") / "serve.yaml"
    config.write_text(
        f"serve:\n  models:\n    - {{name: onnx, path: {onnx_model}}}\n    - {{name: ckpt, path: {checkpoint}}}\n"
    )
    srv = ServerProcess(
        "-c", str(config), "serve.max_upload_mb=1", "serve.max_pixels=1000000", "serve.max_batch_images=2",
        env={"VOCDET_ADMIN_TOKEN": "s3cret"},
    )  # fmt: skip
    yield srv
    srv.stop()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_predict_matches_the_detector(server: ServerProcess, onnx_model: Path, jpeg: bytes, sample_root: Path) -> None:
    path = sorted((sample_root / "JPEGImages").glob("*.jpg"))[0]
    expected = Detector.from_onnx(onnx_model).predict(path, conf=0.01)[0]
    multipart = httpx.post(f"{server.url}/predict/voc", params={"conf": 0.01}, files={"file": ("a.jpg", jpeg)})
    raw = httpx.post(
        f"{server.url}/predict", params={"conf": 0.01}, content=jpeg, headers={"content-type": "image/jpeg"}
    )
    for r in (multipart, raw):
        assert r.status_code == 200, r.text
        body = r.json()
        w, h = Image.open(path).size
        assert (body["model"], body["width"], body["height"]) == ("voc", w, h)
        assert len(body["detections"]) == len(expected) > 0
        for got, want in zip(body["detections"], expected):
            assert got["label"] == want.label and got["class_id"] == want.class_id
            assert (
                abs(got["score"] - want.score) < 1e-5 and max(abs(a - b) for a, b in zip(got["box"], want.box)) < 1e-3
            )
        assert set(body["timing_ms"]) == {"decode", "queue", "inference", "total", "batch_size"}
    few = httpx.post(f"{server.url}/predict/voc", params={"conf": 0.01, "max_det": 1}, files={"file": ("a.jpg", jpeg)})
    assert len(few.json()["detections"]) == 1


def test_annotate_batch_models_health(server: ServerProcess, jpeg: bytes) -> None:
    r = httpx.post(f"{server.url}/predict", params={"annotate": "true", "conf": 0.01}, files={"file": ("a.jpg", jpeg)})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == Image.open(io.BytesIO(jpeg)).size
    r = httpx.post(f"{server.url}/predict/batch", files=[("files", ("a.jpg", jpeg)), ("files", ("b.jpg", jpeg))])
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    assert r.json()["results"][0]["detections"] == r.json()["results"][1]["detections"]
    models = httpx.get(f"{server.url}/models").json()
    assert (
        [m["name"] for m in models] == ["voc"] and models[0]["format"] == "onnx" and len(models[0]["class_names"]) == 20
    )
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready", "models": ["voc"]}
    assert "<canvas" in httpx.get(f"{server.url}/").text or "vocdet" in httpx.get(f"{server.url}/").text
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "PredictResponse" in schema["components"]["schemas"]


@pytest.mark.parametrize(
    "kwargs, status, needle",
    [
        ({"content": b""}, 422, "empty body"),
        ({"files": {"file": ("notes.txt", b"hello")}}, 415, "cannot decode"),
        ({"files": {"other": ("a.jpg", b"x")}}, 422, "field named 'file'"),
        ({"data": {"a": "b"}}, 415, "multipart"),
        ({"params": {"conf": 2}}, 422, "conf"),
        ({"params": {"conf": "abc"}}, 422, "conf"),
        ({"params": {"max_det": 0}}, 422, "max_det"),
        ({"params": {"iou": -1}}, 422, "iou"),
    ],
)
def test_bad_requests_are_4xx_json(server: ServerProcess, jpeg: bytes, kwargs: dict, status: int, needle: str) -> None:
    if "params" in kwargs:
        kwargs = {**kwargs, "files": {"file": ("a.jpg", jpeg)}}
    r = httpx.post(f"{server.url}/predict", **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_truncated_and_unknown(server: ServerProcess, jpeg: bytes) -> None:
    r = httpx.post(f"{server.url}/predict", files={"file": ("cut.jpg", jpeg[: len(jpeg) // 2])})
    assert r.status_code == 422 and "truncated" in r.json()["detail"]
    r = httpx.post(f"{server.url}/predict/nope", files={"file": ("a.jpg", jpeg)})
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["detail"]
    assert httpx.get(f"{server.url}/nowhere").json() == {"detail": "Not Found"}
    r = httpx.post(f"{server.url}/models", params={"name": "x"}, content=b"x")
    assert r.status_code == 403 and "disabled" in r.json()["detail"]


def test_limits(strict_server: ServerProcess, jpeg: bytes) -> None:
    url = strict_server.url
    big = b"\xff\xd8" + b"\x00" * (1024 * 1024 + 10)
    r = httpx.post(f"{url}/predict", content=big, headers={"content-type": "image/jpeg"})
    assert r.status_code == 413 and "1 MB" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(20):
            yield b"\x00" * 65536

    r = httpx.post(f"{url}/predict", content=chunks(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 413
    r = httpx.post(f"{url}/predict", files={"file": ("bomb.png", png_bomb())})
    assert r.status_code == 413 and "1000000" in r.json()["detail"]  # refused from the header alone
    r = httpx.post(f"{url}/predict/batch", files=[("files", ("a.jpg", jpeg))] * 3)
    assert r.status_code == 413 and "limit is 2" in r.json()["detail"]
    assert httpx.get(f"{url}/healthz").status_code == 200  # still alive


def test_models_from_config_and_admin_upload(
    strict_server: ServerProcess, onnx_model: Path, jpeg: bytes, tmp_path: Path
) -> None:
    url = strict_server.url
    assert {m["name"]: m["format"] for m in httpx.get(f"{url}/models").json()} == {"onnx": "onnx", "ckpt": "checkpoint"}
    for model in ("onnx", "ckpt"):
        assert httpx.post(f"{url}/predict/{model}", files={"file": ("a.jpg", jpeg)}).status_code == 200
    data = onnx_model.read_bytes()
    auth = {"authorization": "Bearer s3cret"}
    r = httpx.post(f"{url}/models", params={"name": "extra"}, content=data)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(f"{url}/models", params={"name": "extra"}, content=data, headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.post(f"{url}/models", params={"name": "../../etc/x"}, content=data, headers=auth)
    assert r.status_code == 422
    r = httpx.post(f"{url}/models", params={"name": "extra"}, content=b"\x08\x01not onnx", headers=auth)
    assert r.status_code == 422 and "ONNX" in r.json()["detail"]
    import torch

    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "code.pt")
    r = httpx.post(f"{url}/models", params={"name": "code"}, content=(tmp_path / "code.pt").read_bytes(), headers=auth)
    assert r.status_code == 415 and "TorchScript" in r.json()["detail"]
    r = httpx.post(
        f"{url}/models", params={"name": "extra"}, files={"file": ("m.onnx", data)}, headers=auth, timeout=60
    )
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "extra"
    assert httpx.post(f"{url}/models", params={"name": "extra"}, content=data, headers=auth).status_code == 409
    assert httpx.post(f"{url}/predict/extra", files={"file": ("a.jpg", jpeg)}).status_code == 200
    assert "extra" in [m["name"] for m in httpx.get(f"{url}/models").json()]


def test_micro_batching_and_metrics(server: ServerProcess, jpeg: bytes) -> None:
    def one(_: int) -> httpx.Response:
        return httpx.post(f"{server.url}/predict/voc", files={"file": ("a.jpg", jpeg)}, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(48)))
    assert [r.status_code for r in responses] == [200] * 48
    assert max(r.json()["timing_ms"]["batch_size"] for r in responses) > 1  # concurrent requests shared batches
    text = httpx.get(f"{server.url}/metrics").text
    assert 'vocdet_requests_total{method="POST",route="/predict/{model_name}",status="200"}' in text
    assert "vocdet_models_loaded 1.0" in text and 'vocdet_queue_depth{model="voc"}' in text
    count = float(
        next(line.split()[-1] for line in text.splitlines() if line.startswith('vocdet_batch_size_count{model="voc"}'))
    )
    total = float(
        next(line.split()[-1] for line in text.splitlines() if line.startswith('vocdet_batch_size_sum{model="voc"}'))
    )
    assert total > count  # more images than batches
    assert 'vocdet_inference_seconds_count{model="voc"}' in text and "vocdet_request_seconds_bucket" in text


def test_overload_gets_503_with_retry_after(onnx_model: Path, jpeg: bytes) -> None:
    srv = ServerProcess("--onnx", str(onnx_model), "serve.max_queue=2", "serve.max_batch_size=1")
    try:
        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(lambda _: httpx.post(f"{srv.url}/predict", content=jpeg, timeout=60), range(96)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "queue limit" in busy.json()["detail"]
    finally:
        srv.stop()


def test_sigterm_lets_in_flight_requests_finish(onnx_model: Path, jpeg: bytes) -> None:
    srv = ServerProcess("--onnx", str(onnx_model), "serve.max_batch_size=1")
    results: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            for _ in range(30):
                try:
                    code = c.post(f"{srv.url}/predict", content=jpeg).status_code
                except httpx.TransportError:
                    code = -1  # the listening socket is closed once draining starts
                with lock:
                    results.append(code)
                if code != 200:
                    return

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    output = srv.stop()
    assert srv.proc.returncode == 0, output
    assert results.count(200) >= 8 and set(results) <= {200, 503, -1}
    assert "Traceback" not in output


def test_openapi_fuzz_finds_no_server_error(server: ServerProcess, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json",
            "--checks", "not_a_server_error", "--max-examples", "30", "--seed", "1", "--request-timeout", "30",
            "--exclude-checks", "positive_data_acceptance",
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,  # its example database stays out of the repo
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert counts, proc.stdout[-2000:]
    generated, passed = map(int, counts.groups())
    assert generated >= 100 and passed == generated, proc.stdout[-2000:]  # every generated request: no 5xx


def test_serve_cli_errors(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("serve"), "no model to serve")
    assert_one_line_error(run_cli("serve", "--onnx", str(tmp_path / "none.onnx")), "model file not found")
    (tmp_path / "m.txt").write_text("x")
    assert_one_line_error(run_cli("serve", "--checkpoint", str(tmp_path / "m.txt")), "cannot serve")
    assert_one_line_error(run_cli("serve", "--onnx", "a.onnx", "serve.max_batch_size=0"), "max_batch_size")
