"""The FastAPI service in process (``TestClient``): every route, every error status and its JSON ``detail``.

The only fake is the model: ``Detector.load`` is replaced by a loader that returns a real ``Detector`` over the
fake backend of ``test_engine.py`` (one box around each image's content, so it maps back to the whole original
image; its score encodes the image's red value). The app, its middleware, batcher threads, metrics registry and
image decoding are the real ones.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.test_engine import FAINT_SCORE, POISON_RED, WAIT_S, FakeBackend, image, make_detector, score_of
from vocdet.config import load_config
from vocdet.core.voc import VOC_CLASSES
from vocdet.errors import VocdetError
from vocdet.infer.detector import Detector
from vocdet.serve.app import create_app
from vocdet.serve.state import State

TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
CLASS_OF = {"voc": 11, "other": 14, "nms": 3}  # the fake's main class per model file stem (0 for any other)
SCORE_TOL = 0.02  # JPEG moves the red value a little; the score encodes it


# ----------------------------------------------------------------------------------------------- the fake model
class FakeNmsBackend(FakeBackend):
    """The fake with NMS "in its graph": (N, 7) rows of batch index, x1, y1, x2, y2, score, class."""

    nms_in_graph = True

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rows = []
        for i, r in enumerate(super().__call__(x)):
            cx, cy, w, h = r[:4, 0]
            rows.append([i, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, r[4:, 0].max(), r[4:, 0].argmax()])
        return np.array(rows, np.float32).reshape(-1, 7)


class FakeLoader:
    """Stands in for ``Detector.load``: a real Detector over a fresh FakeBackend per model file (with NMS in its
    graph for a file named ``nms.*``)."""

    def __init__(self) -> None:
        self.backends: dict[str, FakeBackend] = {}  # by file stem
        self.paths: list[Path] = []
        self.fail: set[str] = set()  # stems whose loading fails as a broken file would
        self.release = threading.Event()  # cleared: loading waits (at most WAIT_S) until it is set
        self.release.set()

    def __call__(self, path: str | Path, device: str | None = None, predict: object = None) -> Detector:
        path = Path(path)
        self.paths.append(path)
        if not self.release.wait(WAIT_S):
            raise VocdetError("the test never released the model load")
        if path.stem in self.fail:
            raise VocdetError(f"cannot read ONNX model {path}: not a vocdet export")
        backend = (FakeNmsBackend if path.stem == "nms" else FakeBackend)(cls=CLASS_OF.get(path.stem, 0))
        self.backends[path.stem] = backend
        return make_detector(backend, source=str(path))


@pytest.fixture
def loader(monkeypatch: pytest.MonkeyPatch) -> FakeLoader:
    fake = FakeLoader()
    monkeypatch.setattr(Detector, "load", fake)  # what vocdet.serve.state.State.load calls
    monkeypatch.delenv("VOCDET_ADMIN_TOKEN", raising=False)
    return fake


def wait_until(condition: Callable[[], object], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def wait_ready(client: TestClient) -> dict:
    wait_until(lambda: client.get("/readyz").status_code == 200, "/readyz 200")
    return client.get("/readyz").json()


@contextmanager
def serve(
    tmp_path: Path, *overrides: str, models: tuple[str, ...] = ("voc",), ready: bool = True
) -> Iterator[TestClient]:
    """A TestClient (lifespan running) over ``create_app`` with model files ``<name>.onnx`` (empty: the loader is
    fake), uploads under ``tmp_path/uploads``."""
    paths = {}
    for name in models:
        paths[name] = tmp_path / f"{name}.onnx"
        paths[name].touch()
    cfg = load_config(None, [f"serve.model_dir={tmp_path / 'uploads'}", "serve.max_batch_size=4", *overrides])
    with TestClient(create_app(cfg, paths)) as client:
        if ready:
            wait_ready(client)
        yield client


def state_of(client: TestClient) -> State:
    return client.app.state.vocdet


def backend_of(client: TestClient, model: str = "voc") -> FakeBackend:
    backend = state_of(client).slots[model].detector.backend
    assert isinstance(backend, FakeBackend)
    return backend


# ----------------------------------------------------------------------------------------------- inputs
def encode(red: int = 200, w: int = 90, h: int = 60, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image(red, h, w)).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


JPEG = encode()
PNG = encode(100, w=40, h=120, fmt="PNG")  # lossless: the score is exact


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def zip_bytes(*names: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n in names:
            z.writestr(n, b"x")
    return buf.getvalue()


def metric(client: TestClient, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def assert_detected(body: dict, model: str, w: int, h: int, red: int, tol: float = SCORE_TOL) -> None:
    """One PredictResponse: the fake's one confident box, mapped back to the whole original image."""
    cls = CLASS_OF.get(model, 0)
    assert (body["model"], body["width"], body["height"]) == (model, w, h)
    (d,) = body["detections"]
    assert (d["class_id"], d["label"]) == (cls, VOC_CLASSES[cls])
    assert abs(d["score"] - score_of(red)) <= tol
    assert np.allclose(d["box"], (0, 0, w, h), atol=0.01), d["box"]
    assert set(body["timing_ms"]) == {"decode", "queue", "inference", "total", "batch_size"}
    assert body["timing_ms"]["batch_size"] >= 1 and body["timing_ms"]["total"] >= body["timing_ms"]["inference"]


def assert_error(r: httpx.Response, status: int, *needles: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    for n in needles:
        assert n in detail, (n, detail)


# ----------------------------------------------------------------------------------------------- one shared app
@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """Two models (voc, the default, and other), no admin token; for tests that change nothing but metrics."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Detector, "load", FakeLoader())
        mp.delenv("VOCDET_ADMIN_TOKEN", raising=False)
        with serve(tmp_path_factory.mktemp("shared"), models=("voc", "other")) as c:
            yield c


def test_predict_maps_the_fake_detections_back_to_original_pixels(client: TestClient) -> None:
    raw = client.post("/predict", content=JPEG, headers={"content-type": "image/jpeg"})
    multipart = client.post("/predict", files={"file": ("a.jpg", JPEG, "image/jpeg")})
    named = client.post("/predict/voc", files={"file": ("a.jpg", JPEG)})
    for r in (raw, multipart, named):
        assert r.status_code == 200, r.text
        assert_detected(r.json(), "voc", 90, 60, 200)
    assert raw.json()["detections"] == multipart.json()["detections"]
    r = client.post("/predict", files={"file": ("tall.png", PNG)})  # padded left and right when letterboxed
    assert_detected(r.json(), "voc", 40, 120, 100, tol=1e-5)


def test_query_values_reach_the_model(client: TestClient) -> None:
    r = client.post("/predict", params={"conf": 0.05}, files={"file": ("a.jpg", JPEG)})
    dets = r.json()["detections"]
    assert [d["score"] for d in dets] == [pytest.approx(score_of(200), abs=SCORE_TOL), pytest.approx(FAINT_SCORE)]
    assert dets[1]["label"] == VOC_CLASSES[12] and np.allclose(dets[1]["box"], (0, 0, 22.5, 15), atol=0.01)
    r = client.post("/predict", params={"conf": 0.05, "max_det": 1}, files={"file": ("a.jpg", JPEG)})
    assert len(r.json()["detections"]) == 1
    r = client.post("/predict/voc", params={"conf": 0.99, "iou": 0.5}, files={"file": ("a.jpg", JPEG)})
    assert r.status_code == 200 and r.json()["detections"] == []


def test_named_model_and_models_list(client: TestClient) -> None:
    r = client.post("/predict/other", content=JPEG)
    assert_detected(r.json(), "other", 90, 60, 200)
    models = client.get("/models").json()
    assert [m["name"] for m in models] == ["voc", "other"]
    for m, name in zip(models, ("voc", "other")):
        assert m == {
            "name": name, "format": "onnx", "file": f"{name}.onnx", "class_names": list(VOC_CLASSES),
            "imgsz": 64, "conf": 0.25, "iou": 0.7, "max_det": 300, "nms_in_graph": False, "precision": "fp32", "drift": False,
        }  # fmt: skip
    assert client.get("/readyz").json() == {"status": "ready", "models": ["voc", "other"]}


def test_batch_answers_each_image_in_order(client: TestClient) -> None:
    files = [("files", ("a.jpg", JPEG)), ("files", ("b.png", PNG)), ("files", ("c.png", encode(50, fmt="PNG")))]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "voc" and len(body["results"]) == 3
    assert_detected(body["results"][0], "voc", 90, 60, 200)
    assert_detected(body["results"][1], "voc", 40, 120, 100, tol=1e-5)
    assert_detected(body["results"][2], "voc", 90, 60, 50, tol=1e-5)
    r = client.post("/predict/batch", params={"model": "other", "conf": 0.05}, files=files[:1])
    assert r.json()["model"] == "other" and len(r.json()["results"][0]["detections"]) == 2
    r = client.post("/predict/batch", content=PNG, headers={"content-type": "image/png"})  # a raw body: one image
    assert r.status_code == 200 and len(r.json()["results"]) == 1
    r = client.post("/predict/batch", files=[files[0], ("files", ("notes.txt", b"hello")), files[1]])
    assert_error(r, 415, "cannot decode notes.txt")  # one bad image fails the request
    slot = state_of(client).slots["voc"]
    assert (slot.admitted, slot.decoding) == (0, 0)


def test_annotate_returns_a_jpeg_of_the_original_size(client: TestClient) -> None:
    for url in ("/predict", "/predict/other"):
        r = client.post(url, params={"annotate": "true"}, files={"file": ("a.jpg", JPEG)})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.content[:2] == b"\xff\xd8"
        with Image.open(io.BytesIO(r.content)) as im:
            assert (im.format, im.size) == ("JPEG", (90, 60))


def test_health_index_docs_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    index = client.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html") and "<" in index.text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/predict/batch", "/predict/{model_name}", "/models", "/healthz", "/readyz", "/metrics"} <= set(
        schema["paths"]
    )
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"PredictResponse", "BatchResponse", "ModelInfo", "ErrorOut"} <= set(schema["components"]["schemas"])
    assert "401" in schema["paths"]["/models"]["post"]["responses"]
    assert client.get("/nowhere").json() == {"detail": "Not Found"}
    assert client.get("/predict").status_code == 405


def test_metrics_counters_move(client: TestClient) -> None:
    route = {"route": "/predict/{model_name}", "method": "POST"}
    ok0 = metric(client, "vocdet_requests_total", **route, status="200")
    missing0 = metric(client, "vocdet_requests_total", **route, status="404")
    batches0 = metric(client, "vocdet_batch_size_count", model="other")
    images0 = metric(client, "vocdet_batch_size_sum", model="other")
    inference0 = metric(client, "vocdet_inference_seconds_count", model="other")
    unmatched0 = metric(client, "vocdet_requests_total", route="unmatched", method="GET", status="404")
    for _ in range(2):
        assert client.post("/predict/other", files={"file": ("a.jpg", JPEG)}).status_code == 200
    assert client.post("/predict/nope", files={"file": ("a.jpg", JPEG)}).status_code == 404
    assert client.get("/nowhere").status_code == 404
    assert metric(client, "vocdet_requests_total", **route, status="200") == ok0 + 2
    assert metric(client, "vocdet_requests_total", **route, status="404") == missing0 + 1
    assert metric(client, "vocdet_batch_size_count", model="other") == batches0 + 2
    assert metric(client, "vocdet_batch_size_sum", model="other") == images0 + 2
    assert metric(client, "vocdet_inference_seconds_count", model="other") == inference0 + 2
    assert metric(client, "vocdet_requests_total", route="unmatched", method="GET", status="404") == unmatched0 + 1
    assert metric(client, "vocdet_request_seconds_count", route="/predict/{model_name}") >= 3
    assert metric(client, "vocdet_models_loaded") == 2
    assert metric(client, "vocdet_queue_depth", model="voc") == 0
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    "kwargs, status, needle",
    [
        ({"content": b""}, 422, "empty body"),
        ({"content": b"hello", "headers": {"content-type": "application/octet-stream"}}, 415, "cannot decode body"),
        ({"files": {"file": ("notes.txt", b"hello")}}, 415, "cannot decode notes.txt"),
        ({"files": {"file": ("cut.jpg", JPEG[: len(JPEG) // 2])}}, 422, "truncated JPEG"),
        ({"files": {"file": ("empty.jpg", b"")}}, 422, "empty"),
        ({"files": {"other": ("a.jpg", JPEG)}}, 422, "field named 'file'"),
        ({"data": {"a": "b"}}, 415, "multipart/form-data"),
        ({"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 422, "malformed multipart"),
        ({"params": {"conf": 2}}, 422, "conf"),
        ({"params": {"conf": "abc"}}, 422, "conf"),
        ({"params": {"iou": -1}}, 422, "iou"),
        ({"params": {"max_det": 0}}, 422, "max_det"),
        ({"params": {"annotate": "maybe"}}, 422, "annotate"),
    ],
)
def test_bad_requests_are_4xx_json(client: TestClient, kwargs: dict, status: int, needle: str) -> None:
    if "params" in kwargs:
        kwargs = {**kwargs, "files": {"file": ("a.jpg", JPEG)}}
    assert_error(client.post("/predict", **kwargs), status, needle)
    slot = state_of(client).slots["voc"]
    assert (slot.admitted, slot.decoding) == (0, 0)  # whatever failed, the admission counters are back


def test_unknown_models_and_bad_names(client: TestClient) -> None:
    assert_error(client.post("/predict/nope", content=JPEG), 404, "unknown model 'nope' (loaded: other, voc)")
    assert_error(client.post("/predict/batch", params={"model": "nope"}, content=JPEG), 404, "unknown model 'nope'")
    assert_error(client.post(f"/predict/{'x' * 65}", content=JPEG), 422, "model_name")
    assert_error(client.post("/predict/batch", params={"model": "x" * 65}, content=JPEG), 422, "model")
    assert_error(client.post("/predict/batch", files={"image": ("a.jpg", JPEG)}), 422, "no image part")
    assert_error(client.post("/predict/batch", params={"conf": -0.5}, content=JPEG), 422, "conf")
    assert_error(client.post("/models", params={"name": "x"}, content=b"x"), 403, "disabled")  # no admin token


# ----------------------------------------------------------------------------------------------- own apps
def test_limits(loader: FakeLoader, tmp_path: Path) -> None:
    limits = ("serve.max_upload_mb=1", "serve.max_pixels=1000000", "serve.max_batch_images=2")
    with serve(tmp_path, *limits, f"serve.admin_token={TOKEN}", "serve.admin_max_model_mb=0.01") as c:
        big = b"\xff\xd8" + b"\x00" * (1024 * 1024 + 10)
        assert_error(c.post("/predict", content=big, headers={"content-type": "image/jpeg"}), 413, "over the 1 MB")

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while the body streams in
            for _ in range(20):
                yield b"\x00" * 65536

        r = c.post("/predict", content=chunks(), headers={"content-type": "image/jpeg"})
        assert "content-length" not in r.request.headers
        assert_error(r, 413, "over the 1 MB")
        bomb = png_bomb()  # 900 megapixels claimed: refused from the header alone
        assert_error(c.post("/predict", files={"file": ("bomb.png", bomb)}), 413, "too large", "1000000")
        r = c.post("/predict", files={"file": ("b.png", png_bomb(2000, 1000))})
        assert_error(r, 413, "b.png is 2000x1000 = 2000000 pixels, over the limit of 1000000")
        wide = encode(80, w=1200, h=1000, fmt="PNG")  # a real image of 1.2 megapixels, a small file
        assert_error(c.post("/predict", files={"file": ("wide.png", wide)}), 413, "1200x1000 = 1200000 pixels")
        three = [("files", (f"{i}.jpg", JPEG)) for i in range(3)]
        assert_error(c.post("/predict/batch", files=three), 413, "limit is 2")
        assert_error(c.post("/predict", files=three[:2]), 413, "limit is 1")
        model = b"\x08\x01" + b"\x00" * 20000  # over admin_max_model_mb (10 KiB), authorised
        assert_error(c.post("/models", params={"name": "m"}, content=model, headers=AUTH), 413, "over the")
        assert c.post("/predict/batch", files=three[:2]).status_code == 200  # at the limits: fine
        assert c.get("/healthz").status_code == 200
        # 8 answers 413 (the one over the Content-Length limit is answered before routing: route "unmatched")
        assert sum(metric(c, "vocdet_requests_total", route=route, method="POST", status="413") for route in (
            "/predict", "/predict/batch", "/models", "unmatched"
        )) == 8  # fmt: skip


def test_admission_limit_gives_503_with_retry_after(loader: FakeLoader, tmp_path: Path) -> None:
    with serve(tmp_path, "serve.max_queue=1", "serve.max_batch_size=1") as c, ThreadPoolExecutor(1) as pool:
        backend = backend_of(c)
        backend.entered.clear()
        backend.gate.clear()
        try:
            held: Future = pool.submit(c.post, "/predict", content=JPEG)
            assert backend.entered.wait(WAIT_S), "the first request never reached the model"
            busy = c.post("/predict", content=JPEG)
            assert_error(busy, 503, "model 'voc' is at its queue limit (1)", "retry")
            assert busy.headers["retry-after"] == "1"
            assert_error(c.post("/predict/batch", files=[("files", ("a.jpg", JPEG))]), 503, "queue limit")
        finally:
            backend.gate.set()
        assert held.result(WAIT_S).status_code == 200
        assert c.post("/predict", content=JPEG).status_code == 200  # the place is free again
        # more images than the queue admits can never fit: 413, not a retry
        assert_error(c.post("/predict/batch", files=[("files", ("a.jpg", JPEG))] * 2), 413, "admits 1")
        assert state_of(c).slots["voc"].admitted == 0


def test_inference_timeout_gives_503(loader: FakeLoader, tmp_path: Path) -> None:
    with serve(tmp_path, "serve.request_timeout_s=0.2") as c:
        backend = backend_of(c)
        backend.gate.clear()
        try:
            r = c.post("/predict", content=JPEG)
            assert_error(r, 503, "inference timed out")
            assert r.headers["retry-after"] == "2"
        finally:
            backend.gate.set()
        assert_detected(c.post("/predict", content=JPEG).json(), "voc", 90, 60, 200)
        slot = state_of(c).slots["voc"]
        assert (slot.admitted, slot.decoding) == (0, 0)


def test_concurrent_requests_share_a_batch(loader: FakeLoader, tmp_path: Path) -> None:
    with serve(tmp_path, "serve.max_batch_size=4") as c, ThreadPoolExecutor(5) as pool:
        backend, slot = backend_of(c), state_of(c).slots["voc"]
        n0 = len(backend.batches)
        backend.entered.clear()
        backend.gate.clear()
        try:
            first = pool.submit(c.post, "/predict", content=JPEG)
            assert backend.entered.wait(WAIT_S)
            reds = (10, 60, 110, 160)
            rest = [pool.submit(c.post, "/predict", content=encode(red, fmt="PNG")) for red in reds]
            wait_until(lambda: slot.batcher.jobs.qsize() == 4, "4 decoded requests queued behind the first")
        finally:
            backend.gate.set()
        assert first.result(WAIT_S).json()["timing_ms"]["batch_size"] == 1
        for red, f in zip(reds, rest):
            body = f.result(WAIT_S).json()
            assert_detected(body, "voc", 90, 60, red, tol=1e-5)  # each request got its own image's answer
            assert body["timing_ms"]["batch_size"] == 4
        assert backend.calls_since(n0) == [1, 4]
        assert metric(c, "vocdet_batch_size_sum", model="voc") == 5


def test_backend_errors_are_json_500_and_the_service_goes_on(loader: FakeLoader, tmp_path: Path) -> None:
    with serve(tmp_path) as c:
        backend = backend_of(c)
        backend.error = RuntimeError("backend exploded")
        internal = "internal error (logged on the server)"
        assert_error(c.post("/predict", content=JPEG), 500, internal)
        assert_error(c.post("/predict", params={"annotate": "true"}, content=JPEG), 500, internal)
        assert_error(c.post("/predict/batch", files=[("files", ("a.jpg", JPEG))] * 2), 500, internal)
        backend.error = None
        poison = encode(POISON_RED, fmt="PNG")
        assert_error(c.post("/predict", files={"file": ("p.png", poison)}), 500, internal)
        assert "exploded" not in c.post("/predict", content=JPEG).text
        assert_detected(c.post("/predict", content=JPEG).json(), "voc", 90, 60, 200)
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        slot = state_of(c).slots["voc"]
        assert (slot.admitted, slot.decoding) == (0, 0) and slot.batcher.thread.is_alive()
        assert metric(c, "vocdet_requests_total", route="/predict", method="POST", status="500") == 3


def test_draining_answers_503_except_health_and_metrics(loader: FakeLoader, tmp_path: Path) -> None:
    with serve(tmp_path) as c:
        state_of(c).draining = True
        r = c.post("/predict", content=JPEG)
        assert_error(r, 503, "shutting down")
        assert r.headers["retry-after"] == "5" and r.headers["connection"] == "close"
        assert_error(c.get("/readyz"), 503, "shutting down")
        assert_error(c.get("/models"), 503, "shutting down")
        assert_error(c.post("/models", params={"name": "x"}, content=b"x"), 503, "shutting down")
        assert c.get("/healthz").status_code == 200
        assert c.get("/metrics").status_code == 200
        state_of(c).draining = False
        assert c.post("/predict", content=JPEG).status_code == 200


def test_still_loading_answers_503_then_serves(loader: FakeLoader, tmp_path: Path) -> None:
    loader.release.clear()
    try:
        with serve(tmp_path, ready=False) as c:
            wait_until(lambda: loader.paths, "the load to start")
            r = c.get("/readyz")
            assert_error(r, 503, "loading models (0/1 ready)")
            assert r.headers["retry-after"] == "1"
            for url in ("/predict", "/predict/voc", "/predict/batch"):
                r = c.post(url, content=JPEG)
                assert_error(r, 503, "model 'voc' is still loading")
                assert r.headers["retry-after"] == "1"
            assert_error(c.post("/predict/nope", content=JPEG), 404, "unknown model 'nope' (loaded: none)")
            assert c.get("/models").json() == []
            assert c.get("/healthz").status_code == 200
            loader.release.set()
            assert wait_ready(c) == {"status": "ready", "models": ["voc"]}
            assert c.post("/predict", content=JPEG).status_code == 200
    finally:
        loader.release.set()
    assert loader.paths == [tmp_path / "voc.onnx"]


def test_a_model_that_fails_to_load_makes_the_service_unready(loader: FakeLoader, tmp_path: Path) -> None:
    loader.fail.add("voc")
    with serve(tmp_path, ready=False) as c:
        wait_until(lambda: "cannot load" in c.get("/readyz").text, "the load error")
        assert_error(c.get("/readyz"), 503, "cannot load a model: cannot read ONNX model")
        assert_error(c.post("/predict", content=JPEG), 503, "cannot load a model")
        assert c.get("/healthz").status_code == 200


def test_no_model(loader: FakeLoader, tmp_path: Path) -> None:
    with serve(tmp_path, models=()) as c:
        assert c.get("/readyz").json() == {"status": "ready", "models": []}
        assert_error(c.post("/predict", content=JPEG), 404, "no model is loaded")
        assert c.get("/models").json() == []
        assert metric(c, "vocdet_models_loaded") == 0


def test_bad_model_names_are_refused_at_creation(loader: FakeLoader, tmp_path: Path) -> None:
    cfg = load_config(None, [])
    for name in ("batch", "../x", ""):
        with pytest.raises(VocdetError, match="must match"):
            create_app(cfg, {name: tmp_path / "m.onnx"})


def test_admin_model_upload(loader: FakeLoader, tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    with serve(tmp_path, f"serve.admin_token={TOKEN}") as c:
        r = c.post("/models", params={"name": "extra"}, content=b"\x08\x01onnx")
        assert_error(r, 401, "Authorization: Bearer")
        assert r.headers["www-authenticate"] == "Bearer"
        for header in ("Bearer wrong", "Basic s3cret", f"Bearer {TOKEN}x", "Bearer"):
            assert_error(
                c.post("/models", params={"name": "extra"}, content=b"x", headers={"authorization": header}), 401
            )
        assert c.get("/models").status_code == 200  # only POST /models needs the token

        def add(name: str | None, **kwargs) -> httpx.Response:
            params = {} if name is None else {"name": name}
            return c.post("/models", params=params, headers=AUTH, **kwargs)

        assert_error(add("../../etc/x", content=b"x"), 422, "name")
        assert_error(add(None, content=b"x"), 422, "name")
        assert_error(add("batch", content=b"x"), 422, "'batch' is reserved")
        assert_error(add("voc", content=b"x"), 409, "a model named 'voc' is already loaded")
        assert_error(add("extra", content=b""), 422, "empty body")
        assert_error(add("extra", data={"a": "b"}), 415, "multipart")
        torchscript = zip_bytes("m/data.pkl", "m/code/__torch__.py", "m/constants.pkl")
        assert_error(add("code", content=torchscript), 415, "TorchScript uploads are refused")
        assert_error(add("zip", content=b"PK\x03\x04 not really a zip"), 415, "broken zip")
        loader.fail.add("broken")
        r = add("broken", content=b"\x08\x01not onnx")
        assert_error(r, 422, "cannot read ONNX model 'broken'")
        assert str(tmp_path) not in r.text  # no server paths in answers
        assert not (uploads / "broken.onnx").exists()

        r = add("extra", files={"file": ("m.onnx", b"\x08\x01onnx bytes")})
        assert r.status_code == 201, r.text
        assert r.json() == {
            "name": "extra", "format": "onnx", "file": "extra.onnx", "class_names": list(VOC_CLASSES),
            "imgsz": 64, "conf": 0.25, "iou": 0.7, "max_det": 300, "nms_in_graph": False, "precision": "fp32", "drift": False,
        }  # fmt: skip
        assert (uploads / "extra.onnx").read_bytes() == b"\x08\x01onnx bytes"
        assert_error(add("extra", content=b"x"), 409, "already loaded")
        r = add("ck", content=zip_bytes("archive/data.pkl", "archive/version"))
        assert r.status_code == 201 and (r.json()["format"], r.json()["file"]) == ("checkpoint", "ck.ckpt")

        assert_detected(c.post("/predict/extra", content=JPEG).json(), "extra", 90, 60, 200)
        assert_detected(c.post("/predict", content=JPEG).json(), "voc", 90, 60, 200)  # the default is unchanged
        assert [m["name"] for m in c.get("/models").json()] == ["voc", "extra", "ck"]
        assert c.get("/readyz").json()["models"] == ["voc", "extra", "ck"]
        assert metric(c, "vocdet_models_loaded") == 3
        assert state_of(c).uploading == set()


def test_admin_token_from_the_environment(loader: FakeLoader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOCDET_ADMIN_TOKEN", "from-env")
    with serve(tmp_path) as c:
        assert_error(c.post("/models", params={"name": "e"}, content=b"x", headers=AUTH), 401)
        r = c.post("/models", params={"name": "e"}, content=b"x", headers={"authorization": "bearer from-env"})
        assert r.status_code == 201 and r.json()["name"] == "e"


def test_shutdown_stops_the_batchers(loader: FakeLoader, tmp_path: Path) -> None:
    with serve(tmp_path, models=("voc", "other")) as c:
        state = state_of(c)
        threads = [slot.batcher.thread for slot in state.slots.values()]
        assert all(t.is_alive() for t in threads)
    assert state.draining and not any(t.is_alive() for t in threads)


def test_concurrent_upload_of_one_name_gets_409(loader: FakeLoader, tmp_path: Path) -> None:
    with serve(tmp_path, f"serve.admin_token={TOKEN}") as c, ThreadPoolExecutor(1) as pool:
        loader.release.clear()  # the next model load waits
        try:
            first: Future = pool.submit(c.post, "/models", params={"name": "late"}, content=b"x", headers=AUTH)
            wait_until(lambda: len(loader.paths) == 2, "the upload's load to start")
            assert state_of(c).uploading == {"late"}
            r = c.post("/models", params={"name": "late"}, content=b"y", headers=AUTH)
            assert_error(r, 409, "a model named 'late' is already loaded or being loaded")
        finally:
            loader.release.set()
        assert first.result(WAIT_S).status_code == 201
        assert (tmp_path / "uploads" / "late.onnx").read_bytes() == b"x"
        assert state_of(c).uploading == set()


def test_nms_in_graph_model_refuses_other_thresholds(loader: FakeLoader, tmp_path: Path) -> None:
    with serve(tmp_path, models=("nms",)) as c:
        assert c.get("/models").json()[0]["nms_in_graph"] is True
        assert_detected(c.post("/predict/nms", content=JPEG).json(), "nms", 90, 60, 200)
        r = c.post("/predict", params={"conf": 0.5}, content=JPEG)  # a higher conf is applied after the graph
        assert r.status_code == 200 and len(r.json()["detections"]) == 1
        assert c.post("/predict", params={"conf": 0.9}, content=JPEG).json()["detections"] == []
        for params in ({"conf": 0.1}, {"iou": 0.5}):
            assert_error(c.post("/predict", params=params, content=JPEG), 422, "NMS in its graph", "re-export")
            r = c.post("/predict/batch", params=params, files=[("files", ("a.jpg", JPEG))])
            assert_error(r, 422, "NMS in its graph")
        assert c.post("/predict", content=JPEG).status_code == 200


def test_a_bad_threshold_does_not_fail_other_requests_in_its_batch(loader: FakeLoader, tmp_path: Path) -> None:
    with serve(tmp_path, models=("nms",)) as c, ThreadPoolExecutor(3) as pool:
        backend, slot = backend_of(c, "nms"), state_of(c).slots["nms"]
        backend.entered.clear()
        backend.gate.clear()
        try:
            first = pool.submit(c.post, "/predict", content=JPEG)
            assert backend.entered.wait(WAIT_S)
            good = pool.submit(c.post, "/predict", content=JPEG)
            wait_until(lambda: slot.batcher.jobs.qsize() == 1, "the good request queued behind the first")
            bad = pool.submit(c.post, "/predict", params={"conf": 0.1}, content=JPEG)
            # refused on its own, before it can join the good request's batch
            assert bad.result(WAIT_S).status_code == 422
            assert slot.batcher.jobs.qsize() == 1
        finally:
            backend.gate.set()
        assert first.result(WAIT_S).status_code == 200
        assert bad.result(WAIT_S).status_code == 422
        assert good.result(WAIT_S).status_code == 200, good.result().text


def test_a_batch_larger_than_the_queue_is_413_not_retry(loader: FakeLoader, tmp_path: Path) -> None:
    with serve(tmp_path, "serve.max_queue=2", "serve.max_batch_images=8") as c:
        r = c.post("/predict/batch", files=[("files", (f"{i}.jpg", JPEG)) for i in range(3)])
        assert_error(r, 413, "3 images", "admits 2")
        assert "retry-after" not in r.headers
        assert c.post("/predict/batch", files=[("files", (f"{i}.jpg", JPEG)) for i in range(2)]).status_code == 200
