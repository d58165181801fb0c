"""The service's request and response schemas (OpenAPI), error bodies and query parameters."""

from __future__ import annotations

from typing import Annotated, Any, Optional

from fastapi import Path as PathParam
from fastapi import Query
from pydantic import BaseModel, Field

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


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
    precision: str = Field(description="fp32, fp16 or int8 (a quantized ONNX export)")
    drift: bool = Field(description="the model carries a reference profile and its drift is watched (GET /drift)")


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
EvaluateQuery = Annotated[bool, Query(description="test the windows now instead of returning the last test")]
NameQuery = Annotated[str, Query(pattern=NAME_PATTERN, description="name to serve it under")]
