"""What one running service holds: its Prometheus metrics, its models (loaded, loading, uploaded) and its pools."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import HTTPException
from omegaconf import DictConfig
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vocdet.core.drift import DriftWindow
from vocdet.infer.detector import Detector
from vocdet.serve.drift import DriftMonitor
from vocdet.serve.engine import MicroBatcher, ModelSlot


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
        self.ready = Gauge("vocdet_ready", "1 while every model is loaded and the server is not draining", registry=r)
        self.drift_score = Gauge(
            "vocdet_drift_score",
            "drift statistic of a feature (KS D, chi-square, MMD²)",
            ["model", "feature"],
            registry=r,
        )
        self.drift_p_value = Gauge("vocdet_drift_p_value", "drift test p-value", ["model", "feature"], registry=r)
        self.drift_alarm = Gauge("vocdet_drift_alarm", "1 when a feature of the window drifted", ["model"], registry=r)
        self.drift_evaluations = Counter("vocdet_drift_evaluations", "drift tests run", ["model"], registry=r)
        self.drift_alarms = Counter("vocdet_drift_alarms", "drift tests that raised the alarm", ["model"], registry=r)
        self.drift_window = Gauge("vocdet_drift_window", "images in the drift window", ["model"], registry=r)


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
        self.drift_monitor = DriftMonitor(self)

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
        detector = Detector.load(path, device=s.device, predict=self.cfg.predict)
        slot = ModelSlot(name, detector, path, s.max_queue)
        profile = detector.drift_profile
        if s.drift and profile is not None:
            d = self.cfg.drift
            slot.drift = DriftWindow(profile, s.drift_window, d.alpha, d.permutations)
            self.metrics.drift_alarm.labels(name).set(0)
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
        self.drift_monitor.stop()
        for slot in self.slots.values():
            if slot.batcher:
                slot.batcher.stop()
        self.decoder.shutdown(wait=False, cancel_futures=True)
        self.loader.shutdown(wait=False, cancel_futures=True)
        if self._tmp_dir:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
