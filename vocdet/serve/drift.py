"""Drift detection in ``vocdet serve``: each model with a reference profile keeps a window of its last
``serve.drift_window`` images (features taken on the decoding threads, detections from its answers), and one
background thread tests the windows against the profiles every ``serve.drift_interval_s`` — never on the request
path. Results go to Prometheus (``vocdet_drift_score``, ``vocdet_drift_p_value``, ``vocdet_drift_alarm``,
``vocdet_drift_window``) and ``GET /drift``."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vocdet.serve.state import State

log = logging.getLogger("vocdet.serve")


class DriftMonitor:
    """The one thread that evaluates every model's drift window."""

    def __init__(self, state: State):
        self.state = state
        self.interval = float(state.s.drift_interval_s)
        self.min_window = int(state.s.drift_min_window)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drift", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for slot in list(self.state.slots.values()):
                try:
                    self.evaluate(slot)
                except Exception:  # a failed evaluation is logged; serving goes on
                    log.exception("drift evaluation failed for model %s", slot.name)

    def evaluate(self, slot: Any, force: bool = False) -> None:
        """Test ``slot``'s window when it holds ``serve.drift_min_window`` images and changed since the last test
        (``force``: whenever it holds two)."""
        window = slot.drift
        if window is None or len(window) < (2 if force else self.min_window):
            return
        if window.seen == slot.drift_seen and not force:
            return
        seen = window.seen
        start = time.perf_counter()
        report = window.evaluate()
        report.update(seen=seen, evaluated_at=time.time(), seconds=round(time.perf_counter() - start, 4))
        previous = slot.drift_report
        slot.drift_report, slot.drift_seen = report, seen
        m = self.state.metrics
        for feature, r in report["features"].items():
            m.drift_score.labels(slot.name, feature).set(r["statistic"])
            m.drift_p_value.labels(slot.name, feature).set(r["p_value"])
        m.drift_alarm.labels(slot.name).set(1 if report["alarm"] else 0)
        m.drift_evaluations.labels(slot.name).inc()
        if report["alarm"]:
            m.drift_alarms.labels(slot.name).inc()
        was = previous is not None and previous["alarm"]
        if report["alarm"] and not was:
            log.warning("drift alarm for model %s: %s", slot.name, ", ".join(report["drifted"]))
        elif was and not report["alarm"]:
            log.info("drift alarm for model %s cleared", slot.name)


def drift_status(state: State, slot: Any) -> dict[str, Any]:
    """``GET /drift``'s entry for one model."""
    s = state.s
    if not s.drift:
        return {"available": False, "reason": "drift detection is off (serve.drift=false)"}
    if slot.drift is None:
        return {
            "available": False,
            "reason": "the model carries no reference profile (train or export it with drift.profile=true)",
        }
    out: dict[str, Any] = {
        "available": True,
        "window": len(slot.drift),
        "window_size": slot.drift.size,
        "min_window": s.drift_min_window,
        "seen": slot.drift.seen,
        "alpha": slot.drift.alpha,
        "reference": {k: slot.drift.reference.profile[k] for k in ("source", "images", "conf")},
    }
    report = slot.drift_report
    if report is None:
        out.update(alarm=False, evaluated=False, features={}, drifted=[])
    else:
        out.update(
            alarm=report["alarm"],
            evaluated=True,
            evaluated_seen=report["seen"],
            evaluated_at=report["evaluated_at"],
            evaluation_seconds=report["seconds"],
            drifted=report["drifted"],
            features=report["features"],
        )
    return out
