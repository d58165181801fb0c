"""``vocdet predict``: run a :class:`~vocdet.infer.detector.Detector` over files, globs and directories."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vocdet.core.detections import detections_to_predictions, write_detections
from vocdet.core.draw import plot
from vocdet.core.files import staged_dir
from vocdet.core.images import find_images, read_image
from vocdet.errors import VocdetError
from vocdet.infer.detector import Detector

log = logging.getLogger("vocdet")


def predict_files(
    sources: list[str],
    *,
    checkpoint: str | Path | None = None,
    onnx: str | Path | None = None,
    out: str | Path = "runs/predict",
    conf: float | None = None,
    iou: float | None = None,
    max_det: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    save_images: bool = True,
    session: Any = None,
) -> int:
    """Predict every image of ``sources``; writes ``out/detections.json`` and annotated images (same names, .jpg).

    ``session``: a ``predict`` config section whose ``threads``/``ort_*`` keys set ONNX Runtime's session.
    An unreadable image is reported and skipped, the rest still written. Returns the number of skipped images.
    """

    paths = find_images(sources)
    if onnx:
        detector = Detector.from_onnx(onnx, predict=session)
    else:
        detector = Detector.from_checkpoint(checkpoint, device)  # type: ignore[arg-type]
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VocdetError(f"cannot create output folder {out}: {e.strerror or e}") from None
    ids = _unique_ids(paths)
    bs = batch_size or detector.batch_size
    preds, failed, n_dets = {}, 0, 0
    start = time.perf_counter()
    # Annotated images go to a staging folder and move into `out` only when every image is done: an interrupted
    # run (Ctrl-C, SIGTERM, an error) leaves `out` as it was.
    with staged_dir(out) as staging, tqdm(total=len(paths), unit="img", disable=len(paths) < 2, desc="predict") as bar:
        for i in range(0, len(paths), bs):
            chunk, images = [], []
            for p in paths[i : i + bs]:
                try:
                    images.append(read_image(p))
                    chunk.append(p)
                except VocdetError as e:
                    failed += 1
                    tqdm.write(f"skipped: {e}")
            results = detector.infer([detector.prepare(im) for im in images], conf, iou, max_det)
            for p, img, dets in zip(chunk, images, results):
                preds[ids[p]] = detections_to_predictions(dets, detector.box_origin)
                n_dets += len(dets)
                if save_images:
                    plot(img, dets).save(staging / f"{ids[p]}.jpg", quality=90)
            bar.update(len(paths[i : i + bs]))
    write_detections(out / "detections.json", preds, detector.class_names)
    seconds = time.perf_counter() - start
    done = len(paths) - failed
    print(
        f"{done} images, {n_dets} detections in {seconds:.1f} s ({1000 * seconds / max(done, 1):.0f} ms/image) "
        f"-> {out / 'detections.json'}" + (f" and {done} annotated images" if save_images else "")
    )
    if failed:
        print(f"{failed} unreadable images were skipped (listed above)")
    return failed


def _unique_ids(paths: list[Path]) -> dict[Path, str]:
    """File stems as image ids (VOC ids for VOC images); a repeated stem gets -2, -3, ..."""
    ids: dict[Path, str] = {}
    seen: dict[str, int] = {}
    for p in paths:
        n = seen[p.stem] = seen.get(p.stem, 0) + 1
        ids[p] = p.stem if n == 1 else f"{p.stem}-{n}"
    return ids
