"""``create_app``: the FastAPI detection service (``vocdet serve`` runs it with uvicorn).

Models load once, in the background after the server starts (``/readyz`` is 503 until all are warmed up), and
run behind micro-batchers (:mod:`vocdet.serve.engine`). Every error is JSON ``{"detail": ...}``; no input may
produce a 500.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from omegaconf import DictConfig
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from vocdet.core.detections import Detection
from vocdet.core.draw import plot
from vocdet.core.images import ImageError, decode_image
from vocdet.errors import VocdetError
from vocdet.infer.detector import Detector
from vocdet.serve.engine import Job, MicroBatcher, ModelSlot, Overloaded, Result

log = logging.getLogger("vocdet.serve")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
RESERVED_NAMES = {"batch"}  # /predict/batch is a route
STATIC = Path(__file__).parent / "static"
IMAGE_STATUS = {"empty": 422, "truncated": 422, "undecodable": 415, "too_large": 413}


# ----------------------------------------------------------------------------------------------- schemas
class DetectionOut(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in original-image pixels", min_length=4, max_length=4)
    score: float
    class_id: int
    label: str


class Timing(BaseModel):
    decode: float = Field(description="decode + letterbox, ms")
    queue: float = Field(description="waiting for a batch, ms")
    inference: float = Field(description="the batch's forward pass + NMS, ms")
    total: float
    batch_size: int = Field(description="images in the batch this one ran in")


class PredictResponse(BaseModel):
    model: str
    width: int
    height: int
    detections: list[DetectionOut]
    timing_ms: Timing


class BatchResponse(BaseModel):
    model: str
    results: list[PredictResponse]


class ModelInfo(BaseModel):
    name: str
    format: str
    file: str
    class_names: list[str]
    imgsz: int
    conf: float
    iou: float
    max_det: int
    nms_in_graph: bool


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    models: list[str]


class ErrorOut(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in {
        404: "unknown model",
        413: "upload or image too large",
        415: "not an image",
        422: "bad query values, empty body or truncated image",
        503: "overloaded, shutting down or still loading (Retry-After)",
    }.items()
}
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["files"],
                }
            }
        },
    }
}


Conf = Annotated[Optional[float], Query(ge=0, le=1, description="score threshold (default: the model's)")]  # noqa: UP045
Iou = Annotated[Optional[float], Query(ge=0, le=1, description="NMS IoU threshold")]  # noqa: UP045
MaxDet = Annotated[Optional[int], Query(ge=1, le=10000, description="detections per image")]  # noqa: UP045
Annotate = Annotated[bool, Query(description="return the annotated JPEG instead of JSON")]
ModelQuery = Annotated[Optional[str], Query(max_length=64, description="model name (default: the first)")]  # noqa: UP045
ModelPath = Annotated[str, PathParam(max_length=64)]
NameQuery = Annotated[str, Query(pattern=NAME_PATTERN, description="name to serve it under")]


# ----------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps can live in one process)."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vocdet_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram(
            "vocdet_request_seconds", "HTTP request latency", ["route"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "vocdet_inference_seconds", "forward + NMS time of one batch", ["model"], registry=r,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )  # fmt: skip
        self.batch_size = Histogram(
            "vocdet_batch_size", "images per inference batch", ["model"], registry=r,
            buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64, max_batch})),
        )  # fmt: skip
        self.queue_depth = Gauge("vocdet_queue_depth", "images waiting for inference", ["model"], registry=r)
        self.models_loaded = Gauge("vocdet_models_loaded", "models loaded and warmed up", registry=r)


# ----------------------------------------------------------------------------------------------- app state
class State:
    def __init__(self, cfg: DictConfig, models: dict[str, Path]):
        s = cfg.serve
        self.cfg, self.s = cfg, s
        self.specs = models
        self.slots: dict[str, ModelSlot] = {}
        self.default: str | None = next(iter(models), None)
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.metrics = Metrics(s.max_batch_size)
        self.decoder = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="decode")
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="load")
        self.admin_token = s.admin_token or os.environ.get("VOCDET_ADMIN_TOKEN") or None
        self._tmp_dir: str | None = None
        self.on_load_failure: Callable[[str], None] | None = None
        self.uploading: set[str] = set()  # names of models being added through POST /models

    def model_dir(self) -> Path:
        if self.s.model_dir:
            path = Path(self.s.model_dir)
        else:
            if self._tmp_dir is None:
                self._tmp_dir = tempfile.mkdtemp(prefix="vocdet-models-")
            path = Path(self._tmp_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def load(self, name: str, path: Path) -> ModelSlot:
        """Load, warm up and start serving one model (blocking: runs on the loader thread)."""
        s = self.s
        detector = Detector.load(path, device=s.device)
        slot = ModelSlot(name, detector, path, s.max_queue)
        slot.warm_up()
        slot.batcher = MicroBatcher(slot, s.max_batch_size, s.max_wait_ms, self.metrics)
        slot.batcher.start()
        return slot

    def add(self, slot: ModelSlot) -> None:
        self.slots[slot.name] = slot
        self.default = self.default or slot.name
        self.metrics.models_loaded.set(len(self.slots))

    def slot(self, name: str | None) -> ModelSlot:
        if self.load_error:
            raise HTTPException(503, self.load_error)
        key = name or self.default
        if key is None:
            raise HTTPException(404, "no model is loaded (start vocdet serve with --onnx or --checkpoint)")
        if key not in self.slots:
            if not self.ready and key in self.specs:
                raise HTTPException(503, f"model '{key}' is still loading", headers={"Retry-After": "1"})
            known = ", ".join(sorted(self.slots)) or "none"
            raise HTTPException(404, f"unknown model '{key}' (loaded: {known})")
        return self.slots[key]

    def close(self) -> None:
        for slot in self.slots.values():
            if slot.batcher:
                slot.batcher.stop()
        self.decoder.shutdown(wait=False, cancel_futures=True)
        self.loader.shutdown(wait=False, cancel_futures=True)
        if self._tmp_dir:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- middleware
class ServeMiddleware:
    """Pure ASGI: request metrics, body size limits (Content-Length and streamed), 503 while draining, and a
    JSON 500 for anything unexpected."""

    def __init__(self, app: Any, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st, start = self.state, time.perf_counter()
        status = {"code": 500}
        started = {"yes": False}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                started["yes"] = True
            await send(message)

        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        admin = path == "/models" and method == "POST"
        limit = int((st.s.admin_max_model_mb if admin else st.s.max_upload_mb) * 1024 * 1024)
        try:
            if st.draining and path not in ("/healthz", "/metrics"):
                await _json(
                    send_wrapper, 503, "the server is shutting down", {"Retry-After": "5", "Connection": "close"}
                )
            elif admin and not self._authorised(headers):
                await _unauthorised(send_wrapper, st)
            elif _content_length(headers) > limit:
                await _json(send_wrapper, 413, f"request body over the {limit / 2**20:g} MB limit")
            else:
                received = {"n": 0}

                async def limited_receive() -> dict:
                    message = await receive()
                    if message["type"] == "http.request":
                        received["n"] += len(message.get("body", b""))
                        if received["n"] > limit:
                            raise _TooLarge
                    return message

                await self.app(scope, limited_receive, send_wrapper)
        except _TooLarge:
            if not started["yes"]:
                await _json(send_wrapper, 413, f"request body over the {limit / 2**20:g} MB limit")
        except Exception:
            log.exception("unhandled error on %s %s", method, path)
            if not started["yes"]:
                await _json(send_wrapper, 500, "internal error (logged on the server)")
        finally:
            label = getattr(scope.get("route"), "path", None) or "unmatched"  # templates: bounded label values
            st.metrics.requests.labels(label, method, str(status["code"])).inc()
            st.metrics.request_seconds.labels(label).observe(time.perf_counter() - start)

    def _authorised(self, headers: dict[str, str]) -> bool:
        token = self.state.admin_token
        if token is None:
            return True  # the route answers 403 (disabled)
        scheme, _, given = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), token.encode())


class _TooLarge(Exception):
    pass


def _content_length(headers: dict[str, str]) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0


async def _json(send: Callable, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = JSONResponse({"detail": detail}).body
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _unauthorised(send: Callable, st: State) -> None:
    await _json(
        send,
        401,
        "a valid 'Authorization: Bearer <serve.admin_token>' header is required",
        {"WWW-Authenticate": "Bearer"},
    )


# ----------------------------------------------------------------------------------------------- request helpers
async def read_images(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    """The uploaded images: multipart parts named ``file``/``files``, or the raw body."""
    ctype = request.headers.get("content-type", "")
    body = await request.body()
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=max_files, max_fields=16)
        except Exception as e:  # malformed multipart, or more parts than allowed
            detail = getattr(e, "detail", None) or str(e)
            if "Too many files" in detail:
                raise HTTPException(413, f"too many images in one request; the limit is {max_files}") from None
            raise HTTPException(422, f"malformed multipart body: {detail[:200]}") from None
        uploads = [v for k, v in form.multi_items() if k in ("file", "files") and isinstance(v, UploadFile)]
        if not uploads:
            raise HTTPException(422, "multipart body has no image part: send the image in a field named 'file'")
        if len(uploads) > max_files:
            raise HTTPException(413, f"{len(uploads)} images in one request; the limit is {max_files}")
        return [(u.filename or "upload", await u.read()) for u in uploads]
    if ctype.startswith("application/x-www-form-urlencoded"):
        raise HTTPException(415, "send the image as multipart/form-data (field 'file') or as the raw request body")
    if not body:
        raise HTTPException(422, "empty body: send an image as multipart field 'file' or as the raw request body")
    return [("body", body)]


def _to_out(dets: list[Detection]) -> list[DetectionOut]:
    return [DetectionOut(box=list(d.box), score=d.score, class_id=d.class_id, label=d.label) for d in dets]


def create_app(cfg: DictConfig, models: dict[str, str | Path] | None = None) -> FastAPI:
    """The service for ``models`` (name -> .onnx/.ckpt/.torchscript path) plus ``serve.models`` from ``cfg``."""
    specs: dict[str, Path] = {m["name"]: Path(m["path"]) for m in cfg.serve.models}
    specs.update({k: Path(v) for k, v in (models or {}).items()})
    for name in specs:
        if not re.match(NAME_PATTERN, name) or name in RESERVED_NAMES:
            raise VocdetError(f"model name '{name}' must match {NAME_PATTERN} and not be 'batch'")
    state = State(cfg, specs)

    async def load_all() -> None:
        loop = asyncio.get_running_loop()
        try:
            for name, path in state.specs.items():
                slot = await loop.run_in_executor(state.loader, state.load, name, path)
                state.add(slot)
                log.info("model %s ready (%s)", name, path)
            state.ready = True
        except Exception as e:
            state.load_error = f"cannot load a model: {e}"
            log.error("error: %s", state.load_error)
            if state.on_load_failure:
                state.on_load_failure(state.load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(load_all())
        yield
        state.draining = True
        task.cancel()
        state.close()

    app = FastAPI(
        title="vocdet",
        version=_version(),
        description="YOLOv8 PASCAL VOC object detection. Upload an image to /predict.",
        lifespan=lifespan,
    )
    app.state.vocdet = state

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    async def run_one(
        slot: ModelSlot, name: str, data: bytes, conf, iou, max_det, decoded: list[int]
    ) -> tuple[Any, Result, float]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            try:
                image, prep = await loop.run_in_executor(
                    state.decoder, _decode_prepare, slot.detector, data, name, state.s.max_pixels
                )
            finally:
                slot.decoding -= 1
                decoded[0] += 1
            decode_ms = (time.perf_counter() - t0) * 1000
            future = loop.create_future()
            slot.batcher.submit(Job(prep, conf, iou, max_det, future, loop))
            try:
                result = await asyncio.wait_for(future, state.s.request_timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(
                    503, "inference timed out under load; retry", headers={"Retry-After": "2"}
                ) from None
            return image, result, decode_ms
        except ImageError as e:
            raise HTTPException(IMAGE_STATUS.get(e.kind, 422), str(e)) from None
        except VocdetError as e:  # e.g. thresholds an NMS-in-graph model cannot honour
            raise HTTPException(422, str(e)) from None

    def admit(slot: ModelSlot, n: int) -> None:
        try:
            slot.admit(n)
        except Overloaded:
            raise HTTPException(
                503, f"model '{slot.name}' is at its queue limit ({slot.max_queue}); retry shortly",
                headers={"Retry-After": "1"},
            ) from None  # fmt: skip

    def response(slot: ModelSlot, image: Any, result: Result, decode_ms: float, t0: float) -> PredictResponse:
        h, w = image.shape[:2]
        timing = Timing(
            decode=decode_ms, queue=result.queue_ms, inference=result.inference_ms,
            total=(time.perf_counter() - t0) * 1000, batch_size=result.batch_size,
        )  # fmt: skip
        return PredictResponse(
            model=slot.name, width=w, height=h, detections=_to_out(result.detections), timing_ms=timing
        )

    async def predict_route(request: Request, model_name: str | None, conf, iou, max_det, annotate: bool):
        t0 = time.perf_counter()
        slot = state.slot(model_name)
        (name, data), *_ = await read_images(request, 1)
        admit(slot, 1)
        decoded = [0]
        try:
            image, result, decode_ms = await run_one(slot, name, data, conf, iou, max_det, decoded)
        finally:
            slot.release(1, decoded[0])
        if annotate:
            jpeg = await asyncio.get_running_loop().run_in_executor(
                state.decoder, _annotated_jpeg, image, result.detections
            )
            return Response(jpeg, media_type="image/jpeg")
        return response(slot, image, result, decode_ms, t0)

    responses_img = {
        **ERRORS,
        200: {
            "content": {"image/jpeg": {}},
            "description": "detections (JSON) or, with annotate=true, the annotated JPEG",
        },
    }

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=responses_img,
        openapi_extra=IMAGE_BODY,
        summary="Detect objects in one image (the default model)",
    )
    async def predict(
        request: Request, conf: Conf = None, iou: Iou = None, max_det: MaxDet = None, annotate: Annotate = False
    ):
        return await predict_route(request, None, conf, iou, max_det, annotate)

    @app.post(
        "/predict/batch",
        response_model=BatchResponse,
        responses=ERRORS,
        openapi_extra=BATCH_BODY,
        summary="Detect objects in several images (multipart field 'files')",
    )
    async def predict_batch(
        request: Request,
        model: ModelQuery = None,
        conf: Conf = None,
        iou: Iou = None,
        max_det: MaxDet = None,
    ):
        t0 = time.perf_counter()
        slot = state.slot(model)
        images = await read_images(request, state.s.max_batch_images)
        admit(slot, len(images))
        decoded = [0]
        try:
            outs = await asyncio.gather(
                *(run_one(slot, n, d, conf, iou, max_det, decoded) for n, d in images), return_exceptions=True
            )
        finally:
            slot.release(len(images), decoded[0])
        for o in outs:
            if isinstance(o, BaseException):
                raise o
        return BatchResponse(model=slot.name, results=[response(slot, *o, t0) for o in outs])

    @app.post(
        "/predict/{model_name}",
        response_model=PredictResponse,
        responses=responses_img,
        openapi_extra=IMAGE_BODY,
        summary="Detect objects in one image with a named model",
    )
    async def predict_named(
        request: Request,
        model_name: ModelPath,
        conf: Conf = None,
        iou: Iou = None,
        max_det: MaxDet = None,
        annotate: Annotate = False,
    ):
        return await predict_route(request, model_name, conf, iou, max_det, annotate)

    @app.get("/models", response_model=list[ModelInfo], summary="Loaded models and their metadata")
    async def list_models() -> list[dict[str, Any]]:
        return [slot.info() for slot in state.slots.values()]

    @app.post(
        "/models",
        response_model=ModelInfo,
        status_code=201,
        responses={**ERRORS, 401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 409: {"model": ErrorOut}},
        openapi_extra=IMAGE_BODY,
        summary="Add a model at run time (admin token)",
    )
    async def add_model(request: Request, name: NameQuery):
        if state.admin_token is None:
            raise HTTPException(
                403, "adding models is disabled: start the server with serve.admin_token or VOCDET_ADMIN_TOKEN"
            )
        if name in RESERVED_NAMES:
            raise HTTPException(422, f"'{name}' is reserved")
        if name in state.slots or name in state.specs or name in state.uploading:
            raise HTTPException(409, f"a model named '{name}' is already loaded or being loaded")
        state.uploading.add(name)  # reserved before the first await: a concurrent upload of the name gets 409
        try:
            return await upload_model(request, name)
        finally:
            state.uploading.discard(name)

    async def upload_model(request: Request, name: str) -> dict[str, Any]:
        (_, data), *_ = await read_images(request, 1)
        suffix = _model_kind(data)
        directory = state.model_dir().resolve()
        path = (directory / f"{name}{suffix}").resolve()
        if path.parent != directory:  # the name pattern already forbids this; belt and braces
            raise HTTPException(422, "invalid model name")
        path.write_bytes(data)
        try:
            slot = await asyncio.get_running_loop().run_in_executor(state.loader, state.load, name, path)
        except VocdetError as e:
            path.unlink(missing_ok=True)
            raise HTTPException(422, str(e).replace(str(path), f"'{name}'")) from None  # no server paths
        state.add(slot)
        return slot.info()

    @app.get("/healthz", response_model=Health, summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Ready,
        responses={503: {"model": ErrorOut}},
        summary="Every model is loaded and warmed up",
    )
    async def readyz() -> Any:
        if state.draining:
            return JSONResponse({"detail": "shutting down"}, status_code=503)
        if not state.ready:
            detail = state.load_error or f"loading models ({len(state.slots)}/{len(state.specs)} ready)"
            return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})
        return {"status": "ready", "models": list(state.slots)}

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def metrics() -> Response:
        for slot in state.slots.values():
            state.metrics.queue_depth.labels(slot.name).set(slot.batcher.jobs.qsize() if slot.batcher else 0)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    app.add_middleware(ServeMiddleware, state=state)
    return app


def _decode_prepare(detector: Detector, data: bytes, name: str, max_pixels: int) -> tuple[Any, Any]:
    image = decode_image(data, name, max_pixels=max_pixels)
    return image, detector.prepare(image)


def _annotated_jpeg(image: Any, detections: list[Detection]) -> bytes:
    buf = io.BytesIO()
    plot(image, detections).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _model_kind(data: bytes) -> str:
    """.ckpt for a torch zip checkpoint, .onnx otherwise; TorchScript (it carries code) is refused."""
    if data[:4] == b"PK\x03\x04":
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile:
            raise HTTPException(415, "not a model file (a broken zip archive)") from None
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            raise HTTPException(415, "TorchScript uploads are refused (they carry code); upload ONNX or a checkpoint")
        return ".ckpt"
    return ".onnx"


def _version() -> str:
    from vocdet import __version__

    return __version__


__all__ = ["create_app"]
