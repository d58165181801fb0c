"""The reference profile of an exported model, computed with the model itself (``vocdet export``), so an int8 or
fp16 export carries the outputs it produces, not the fp32 checkpoint's."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vocdet.core.drift import evenly, profile_of
from vocdet.core.voc import split_records
from vocdet.errors import VocdetError
from vocdet.infer.detector import Detector

log = logging.getLogger("vocdet")


def profile_for_detector(detector: Detector, cfg: Any) -> dict[str, Any]:
    """The profile of ``detector`` on up to ``drift.images`` validation images of ``data.*`` (evenly spread)."""
    records = evenly(split_records(cfg.data, "val", detector.class_names, cfg.run.seed), cfg.drift.images)

    def detections(r: Any) -> tuple[list[float], list[int]]:
        dets = detector.predict(Path(r.image))[0]
        return [d.score for d in dets], [d.class_id for d in dets]

    profile = profile_of(
        records, detections, detector.conf, detector.class_names, f"validation split of {cfg.data.root}"
    )
    if profile is None:
        raise VocdetError(f"a drift profile needs at least 2 validation images; found {len(records)}")
    return profile


def export_profile(ckpt: dict[str, Any], detector: Detector, cfg: Any) -> dict[str, Any] | None:
    """What an export carries: the checkpoint's own profile for an fp32 export at the checkpoint's threshold, else
    one computed with the exported model; None (with a warning) when there is no validation data to compute it."""
    if not cfg.drift.profile:
        return None
    stored = ckpt["vocdet"].get("drift")
    if stored and detector.precision == "fp32" and abs(float(stored.get("conf", -1)) - detector.conf) < 1e-9:
        return stored
    try:
        return profile_for_detector(detector, cfg)
    except (VocdetError, OSError) as e:
        log.warning("no drift profile in the export (%s); vocdet serve will report drift as unavailable", e)
        return None


__all__ = ["export_profile", "profile_for_detector"]
