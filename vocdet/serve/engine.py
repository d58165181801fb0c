"""The serving engine: one loaded :class:`~vocdet.infer.detector.Detector` per model name, each with a micro-batcher.

Requests are admitted up to ``max_queue`` per model (more get 503), decoded and letterboxed on a thread pool,
then queued for the model's inference thread, which takes up to ``max_batch_size`` of them at once. The first
request of a batch waits at most ``max_wait_ms`` for company, and only while other admitted requests are still
being decoded: a lone request runs at once. Inference never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vocdet.core.detections import Detection
from vocdet.core.drift import DriftWindow
from vocdet.infer.detector import Detector, Letterboxed

log = logging.getLogger("vocdet.serve")


class Overloaded(Exception):
    """The model's admission limit is reached (the caller answers 503 with Retry-After)."""


@dataclass
class Job:
    prep: Letterboxed
    conf: float | None
    iou: float | None
    max_det: int | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class Result:
    detections: list[Detection]
    queue_ms: float
    inference_ms: float
    batch_size: int


class MicroBatcher:
    """A daemon thread that runs batches of queued jobs through one detector."""

    def __init__(self, slot: ModelSlot, max_batch_size: int, max_wait_ms: float, metrics: Any):
        self.slot, self.max_batch, self.max_wait = slot, max_batch_size, max_wait_ms / 1000
        self.metrics = metrics
        self.jobs: queue.Queue[Job | None] = queue.Queue()  # bounded by admission, not here
        self.thread = threading.Thread(target=self._run, name=f"infer-{slot.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.jobs.put(None)
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        self.jobs.put(job)
        self.metrics.queue_depth.labels(self.slot.name).set(self.jobs.qsize())

    def _collect(self) -> list[Job] | None:
        first = self.jobs.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                nxt = self.jobs.get_nowait()
            except queue.Empty:
                # Wait only while more admitted requests are on their way (being decoded).
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self.slot.decoding <= 0:
                    break
                try:
                    nxt = self.jobs.get(timeout=min(remaining, 0.001))
                except queue.Empty:
                    continue
            if nxt is None:
                self.jobs.put(None)  # stop after this batch
                break
            batch.append(nxt)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            batch = [j for j in batch if not j.future.done()]  # clients that gave up
            self.metrics.queue_depth.labels(self.slot.name).set(self.jobs.qsize())
            if not batch:
                continue
            start = time.perf_counter()
            try:
                results = self.slot.detector.infer(
                    [j.prep for j in batch],
                    [j.conf for j in batch],
                    [j.iou for j in batch],
                    [j.max_det for j in batch],
                )
            except Exception as e:  # reported to each waiting request, never kills the thread
                log.exception("inference failed for model %s", self.slot.name)
                for j in batch:
                    j.loop.call_soon_threadsafe(_set_exception, j.future, e)
                continue
            ms = (time.perf_counter() - start) * 1000
            self.metrics.inference_seconds.labels(self.slot.name).observe(ms / 1000)
            self.metrics.batch_size.labels(self.slot.name).observe(len(batch))
            for j, dets in zip(batch, results):
                result = Result(dets, (start - j.queued_at) * 1000, ms, len(batch))
                j.loop.call_soon_threadsafe(_set_result, j.future, result)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class ModelSlot:
    """A named, loaded, warmed-up detector with its admission counters and batcher.

    The counters are changed on the event loop only; the batcher thread only reads ``decoding`` (a plain int read,
    atomic in CPython), as a hint whether to wait for more requests.
    """

    def __init__(self, name: str, detector: Detector, path: Path, max_queue: int):
        self.name, self.detector, self.path, self.max_queue = name, detector, path, max_queue
        self.admitted = 0  # requests between admission and response
        self.decoding = 0  # of those, still being decoded (the batcher waits for them)
        self.batcher: MicroBatcher | None = None
        self.drift: DriftWindow | None = None  # set when the model carries a reference profile
        self.drift_report: dict[str, Any] | None = None  # the monitor's last evaluation
        self.drift_seen = -1  # window.seen at that evaluation

    def warm_up(self) -> None:
        """Run one blank image through the model so the first real request does not pay for initialisation."""
        d = self.detector
        d.infer([d.prepare(np.full((d.imgsz, d.imgsz, 3), 114, np.uint8))])

    def admit(self, n: int = 1) -> None:
        """Admit ``n`` images at once, or none (``Overloaded``) when that would pass ``max_queue``."""
        if self.admitted + n > self.max_queue:
            raise Overloaded(self.name)
        self.admitted += n
        self.decoding += n

    def release(self, n: int, decoded: int) -> None:
        """``n`` admitted images are answered; ``decoded`` of them went through decoding (which counts itself down)."""
        self.admitted -= n
        self.decoding -= n - decoded  # images whose decoding never started (a cancelled request)

    def info(self) -> dict[str, Any]:
        d = self.detector
        kind = {".onnx": "onnx", ".torchscript": "torchscript"}.get(self.path.suffix.lower(), "checkpoint")
        return {
            "name": self.name,
            "format": kind,
            "file": self.path.name,
            "class_names": d.class_names,
            "imgsz": d.imgsz,
            "conf": d.conf,
            "iou": d.iou,
            "max_det": d.max_det,
            "nms_in_graph": d.nms_in_graph,
            "precision": d.precision,
            "drift": self.drift is not None,
        }
