"""``create_app``: the FastAPI detection service (``vocdet serve`` runs it with uvicorn).

Models load once, in the background after the server starts (``/readyz`` is 503 until all are warmed up), and
run behind micro-batchers (:mod:`vocdet.serve.engine`). Every error is JSON ``{"detail": ...}``; no input may
produce a 500.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
import zipfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from omegaconf import DictConfig
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile

from vocdet.core.detections import Detection
from vocdet.core.draw import plot
from vocdet.core.drift import image_features
from vocdet.core.images import ImageError, decode_image
from vocdet.errors import VocdetError
from vocdet.infer.detector import Detector
from vocdet.serve.drift import drift_status
from vocdet.serve.engine import Job, ModelSlot, Overloaded, Result
from vocdet.serve.middleware import ServeMiddleware
from vocdet.serve.schemas import (
    BATCH_BODY,
    ERRORS,
    IMAGE_BODY,
    NAME_PATTERN,
    Annotate,
    BatchResponse,
    Conf,
    DetectionOut,
    ErrorOut,
    EvaluateQuery,
    Health,
    Iou,
    MaxDet,
    ModelInfo,
    ModelPath,
    ModelQuery,
    NameQuery,
    PredictResponse,
    Ready,
    Timing,
)
from vocdet.serve.state import State

log = logging.getLogger("vocdet.serve")

RESERVED_NAMES = {"batch"}  # /predict/batch is a route
STATIC = Path(__file__).parent / "static"
IMAGE_STATUS = {"empty": 422, "truncated": 422, "undecodable": 415, "too_large": 413}


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
            state.metrics.ready.set(0 if state.draining else 1)
        except Exception as e:
            state.load_error = f"cannot load a model: {e}"
            log.error("error: %s", state.load_error)
            if state.on_load_failure:
                state.on_load_failure(state.load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(load_all())
        if state.s.drift:
            state.drift_monitor.start()
        yield
        state.draining = True
        state.metrics.ready.set(0)
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
            slot.detector.check_thresholds(conf, iou)  # per request: never fail the other requests of a batch
            try:
                image, prep, features = await loop.run_in_executor(
                    state.decoder,
                    _decode_prepare,
                    slot.detector,
                    data,
                    name,
                    state.s.max_pixels,
                    slot.drift is not None,
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
            if features is not None:
                _observe(slot, features, result.detections, conf)
            return image, result, decode_ms
        except ImageError as e:
            raise HTTPException(IMAGE_STATUS.get(e.kind, 422), str(e)) from None
        except VocdetError as e:  # e.g. thresholds an NMS-in-graph model cannot honour
            raise HTTPException(422, str(e)) from None

    def admit(slot: ModelSlot, n: int) -> None:
        if n > slot.max_queue:  # would never fit: a retry cannot help
            raise HTTPException(413, f"{n} images in one request; model '{slot.name}' admits {slot.max_queue} at once")
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
        except Exception as e:  # an uploaded file is input: whatever it breaks is a 422, and it is not kept
            path.unlink(missing_ok=True)
            text = str(e) if isinstance(e, VocdetError) else f"cannot load model '{name}': {type(e).__name__}: {e}"
            raise HTTPException(422, text.splitlines()[0][:300].replace(str(path), f"'{name}'")) from None
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
            if slot.drift is not None:
                state.metrics.drift_window.labels(slot.name).set(len(slot.drift))
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/drift",
        summary="Drift of each model's recent inputs and outputs against its reference profile",
        responses={404: {"model": ErrorOut}},
    )
    async def drift(model: ModelQuery = None, evaluate: EvaluateQuery = False) -> dict[str, Any]:
        if model is not None:
            slots = [state.slot(model)]
        else:
            slots = list(state.slots.values())
        if evaluate and state.s.drift:
            loop = asyncio.get_running_loop()
            for slot in slots:
                await loop.run_in_executor(state.decoder, state.drift_monitor.evaluate, slot, True)
        return {"models": {slot.name: drift_status(state, slot) for slot in slots}}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    app.add_middleware(ServeMiddleware, state=state)
    return app


def _decode_prepare(detector: Detector, data: bytes, name: str, max_pixels: int, features: bool) -> tuple[Any, ...]:
    """Decode and letterbox an upload (on a decoding thread); with ``features``, also its drift features."""
    image = decode_image(data, name, max_pixels=max_pixels)
    return image, detector.prepare(image), image_features(image, data) if features else None


def _observe(slot: ModelSlot, features: Any, detections: list[Detection], conf: float | None) -> None:
    """Add one answered image to the model's drift window; its detections count only when the request's threshold
    was no higher than the reference's (a stricter request would look like fewer detections)."""
    window = slot.drift
    used = slot.detector.conf if conf is None else conf
    if used <= window.reference.conf + 1e-9:
        window.add(features, [d.score for d in detections], [d.class_id for d in detections])
    else:
        window.add(features)


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
