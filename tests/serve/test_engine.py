"""The serving engine in process: ``MicroBatcher`` and ``ModelSlot`` around a real ``Detector`` whose backend is a
small deterministic fake (no model file, no training).

The fake backend (also used by ``test_app.py``) "detects" the content of each letterboxed image: one confident box
around the pixels that are not letterbox grey (so it maps back to the whole original image), with a score that
encodes the image's red value (so a result can be traced to its request), plus one faint box. It records the
batch sizes it ran, can be held at a gate, and raises on a poison image or on demand.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from vocdet.core.boxes import PAD_VALUE
from vocdet.core.voc import VOC_CLASSES
from vocdet.infer.detector import Detector, Letterboxed
from vocdet.serve.engine import Job, MicroBatcher, ModelSlot, Overloaded, Result
from vocdet.serve.state import Metrics

WAIT_S = 10.0  # the bound on every wait in these tests
IMGSZ = 64
POISON_RED = 13  # an image with this red value makes the fake backend raise
FAINT_SCORE = 0.1  # the second, low-confidence box of every image


def score_of(red: float) -> float:
    """The fake's score for the main box of an image whose content has this red value."""
    return 0.3 + red / 512


class FakeBackend:
    """A plain callable: uint8 (B, 3, H, W) -> float32 (B, 4 + nc, 2) raw output (centre xywh, class scores)."""

    def __init__(self, cls: int = 11, nc: int = len(VOC_CLASSES)):
        self.cls, self.nc = cls, nc
        self.batches: list[int] = []  # batch size of every call, warm-up included
        self.lock = threading.Lock()
        self.gate = threading.Event()  # cleared: calls wait (at most WAIT_S) until it is set again
        self.gate.set()
        self.entered = threading.Event()  # set by every call, before it waits at the gate
        self.error: Exception | None = None  # raised by every call while set

    def __call__(self, x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1] == 3
        with self.lock:
            self.batches.append(x.shape[0])
        self.entered.set()
        if not self.gate.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")
        if self.error is not None:
            raise self.error
        if (x[:, 0] == POISON_RED).any():
            raise RuntimeError("boom: poison image")
        out = np.zeros((x.shape[0], 4 + self.nc, 2), np.float32)
        for i, img in enumerate(x):
            content = (img != PAD_VALUE).any(0)  # (H, W): not letterbox padding
            if not content.any():
                continue  # a blank (warm-up) image: nothing detected
            ys, xs = np.nonzero(content)
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            w, h = x2 - x1, y2 - y1
            out[i, :4, 0] = (x1 + x2) / 2, (y1 + y2) / 2, w, h
            out[i, 4 + self.cls, 0] = score_of(float(img[0][content].mean()))
            out[i, :4, 1] = x1 + w / 8, y1 + h / 8, w / 4, h / 4  # the top-left quarter of the content
            out[i, 4 + (self.cls + 1) % self.nc, 1] = FAINT_SCORE
        return out

    def calls_since(self, n: int) -> list[int]:
        with self.lock:
            return self.batches[n:]


def make_detector(backend: FakeBackend, source: str = "fake.onnx") -> Detector:
    return Detector(backend, VOC_CLASSES, IMGSZ, stride=32, conf=0.25, iou=0.7, max_det=300, source=source)


def image(red: int, h: int = 60, w: int = 90) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image of one colour (never letterbox grey)."""
    img = np.empty((h, w, 3), np.uint8)
    img[...] = (red, 30, 60)
    return img


# ----------------------------------------------------------------------------------------------- harness
class Engine:
    """A ModelSlot + running MicroBatcher over a fake backend, driven from an asyncio loop in the test."""

    def __init__(self, max_batch: int = 4, max_wait_ms: float = 5.0, max_queue: int = 64):
        self.backend = FakeBackend()
        self.detector = make_detector(self.backend)
        self.slot = ModelSlot("m", self.detector, Path("m.onnx"), max_queue)
        self.metrics = Metrics(max_batch)
        self.batcher = MicroBatcher(self.slot, max_batch, max_wait_ms, self.metrics)
        self.slot.batcher = self.batcher
        self.batcher.start()

    def job(self, red: int, loop: asyncio.AbstractEventLoop, conf: float | None = None) -> Job:
        return Job(self.detector.prepare(image(red)), conf, None, None, loop.create_future(), loop)

    def submit(self, reds: Sequence[int], conf: float | None = None) -> list[Job]:
        loop = asyncio.get_running_loop()
        jobs = [self.job(r, loop, conf) for r in reds]
        for j in jobs:
            self.batcher.submit(j)
        return jobs

    def sample(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"model": "m"})

    def close(self) -> None:
        self.backend.gate.set()
        self.batcher.stop(WAIT_S)
        assert not self.batcher.thread.is_alive()


@pytest.fixture
def engine():
    engines: list[Engine] = []

    def make(**kwargs) -> Engine:
        engines.append(Engine(**kwargs))
        return engines[-1]

    yield make
    for e in engines:
        e.close()


def run(coro) -> object:
    """Run one test coroutine, bounded."""
    return asyncio.run(asyncio.wait_for(coro, 3 * WAIT_S))


async def answers(jobs: Sequence[Job]) -> list[object]:
    """Each job's Result or exception, in job order (bounded)."""
    return await asyncio.wait_for(
        asyncio.gather(*(j.future for j in jobs), return_exceptions=True), WAIT_S
    )  # fmt: skip


async def until_entered(backend: FakeBackend) -> None:
    assert await asyncio.to_thread(backend.entered.wait, WAIT_S), "the backend was never called"


def assert_result_of(result: object, red: int, batch_size: int | None = None) -> None:
    """``result`` is the fake's answer for the image of this red value (90 x 60: the box is the whole image)."""
    assert isinstance(result, Result), result
    assert len(result.detections) == 1  # the faint box is under the default conf
    d = result.detections[0]
    assert abs(d.score - score_of(red)) < 1e-5
    assert (d.class_id, d.label) == (11, VOC_CLASSES[11])
    assert np.allclose(d.box, (0, 0, 90, 60), atol=1e-3)
    assert result.queue_ms >= 0 and result.inference_ms >= 0
    if batch_size is not None:
        assert result.batch_size == batch_size


# ----------------------------------------------------------------------------------------------- tests
def test_fake_detector_maps_boxes_back_to_the_original_image() -> None:
    det = make_detector(FakeBackend())
    prep = det.prepare(image(200))
    assert prep.image.shape == (64, 64, 3) and prep.pad == (0, 10)  # 90 x 60 -> 64 x 43, padded top and bottom
    (dets,) = det.infer([prep])
    assert len(dets) == 1 and np.allclose(dets[0].box, (0, 0, 90, 60), atol=1e-3)
    (dets,) = det.infer([prep], conf=0.05)
    assert [d.score for d in dets] == pytest.approx([score_of(200), FAINT_SCORE])
    assert np.allclose(dets[1].box, (0, 0, 22.5, 15), atol=1e-3) and dets[1].class_id == 12
    (dets,) = det.infer([det.prepare(np.full((64, 64, 3), PAD_VALUE, np.uint8))])
    assert dets == []


def test_concurrent_jobs_form_batches_and_each_gets_its_own_answer(engine) -> None:
    e = engine(max_batch=4, max_wait_ms=5)
    n0 = len(e.backend.batches)

    async def main() -> None:
        e.backend.gate.clear()
        first = e.submit([100])
        await until_entered(e.backend)  # the batcher holds the first job in the backend ...
        rest = e.submit(range(101, 110))  # ... while 9 more queue up
        e.backend.gate.set()
        results = await answers(first + rest)
        for red, r in zip(range(100, 110), results):
            assert_result_of(r, red)
        assert [r.batch_size for r in results] == [1, 4, 4, 4, 4, 4, 4, 4, 4, 1]

    run(main())
    assert e.backend.calls_since(n0) == [1, 4, 4, 1]
    assert e.sample("vocdet_batch_size_count") == 4 and e.sample("vocdet_batch_size_sum") == 10
    assert e.sample("vocdet_inference_seconds_count") == 4


def test_many_concurrent_jobs_never_exceed_max_batch_size(engine) -> None:
    e = engine(max_batch=3, max_wait_ms=20)
    n0 = len(e.backend.batches)

    async def main() -> None:
        jobs = []
        for k in range(5):  # bursts submitted while the batcher runs: any batching is fine, never > 3
            jobs += e.submit(range(150 + 6 * k, 156 + 6 * k))
            await asyncio.sleep(0.002)
        results = await answers(jobs)
        for red, r in zip(range(150, 180), results):
            assert_result_of(r, red)

    run(main())
    calls = e.backend.calls_since(n0)
    assert sum(calls) == 30 and max(calls) <= 3


def test_per_job_thresholds_in_one_batch(engine) -> None:
    e = engine(max_batch=4)

    async def main() -> None:
        e.backend.gate.clear()
        first = e.submit([120])
        await until_entered(e.backend)
        loop = asyncio.get_running_loop()
        low = Job(e.detector.prepare(image(121)), 0.05, None, None, loop.create_future(), loop)
        one = Job(e.detector.prepare(image(122)), 0.05, None, 1, loop.create_future(), loop)
        high = Job(e.detector.prepare(image(123)), 0.99, None, None, loop.create_future(), loop)
        for j in (low, one, high):
            e.batcher.submit(j)
        e.backend.gate.set()
        r0, r_low, r_one, r_high = await answers([*first, low, one, high])
        assert len(r0.detections) == 1
        assert r_low.batch_size == r_one.batch_size == r_high.batch_size == 3  # one batch, three thresholds
        assert [d.score for d in r_low.detections] == pytest.approx([score_of(121), FAINT_SCORE])
        assert [d.score for d in r_one.detections] == pytest.approx([score_of(122)])
        assert r_high.detections == []

    run(main())


def test_a_lone_job_runs_at_once_when_nothing_else_is_decoding(engine) -> None:
    e = engine(max_batch=4, max_wait_ms=3000)

    async def main() -> None:
        t0 = time.perf_counter()
        (r,) = await answers(e.submit([90]))
        assert_result_of(r, 90, batch_size=1)
        assert time.perf_counter() - t0 < 2.0 and r.queue_ms < 2000  # well under max_wait: no waiting for company

    run(main())


def test_the_first_job_waits_about_max_wait_ms_for_requests_still_decoding(engine) -> None:
    max_wait_ms = 300
    e = engine(max_batch=4, max_wait_ms=max_wait_ms)

    async def main() -> None:
        e.slot.decoding = 1  # another admitted request is being decoded: the batcher waits for it ...
        t0 = time.perf_counter()
        (r,) = await answers(e.submit([91]))  # ... but never gets it: it runs alone after max_wait_ms
        elapsed = time.perf_counter() - t0
        e.slot.decoding = 0
        assert_result_of(r, 91, batch_size=1)
        assert max_wait_ms / 2000 <= elapsed <= max_wait_ms / 1000 + 1.0, elapsed
        assert max_wait_ms / 2 <= r.queue_ms <= max_wait_ms + 1000, r.queue_ms

    run(main())


def test_a_request_that_finishes_decoding_joins_the_waiting_batch(engine) -> None:
    e = engine(max_batch=4, max_wait_ms=5000)

    async def main() -> None:
        e.slot.decoding = 1
        t0 = time.perf_counter()
        first = e.submit([92])
        await asyncio.sleep(0.05)  # the batcher now waits for the request being decoded
        second = e.submit([93])
        e.slot.decoding = 0  # its decoding is done: the batch (of 2, under max_batch 4) runs without more waiting
        r1, r2 = await answers(first + second)
        assert_result_of(r1, 92, batch_size=2)
        assert_result_of(r2, 93, batch_size=2)
        assert time.perf_counter() - t0 < 4.0  # not the 5 s max_wait

    run(main())


def test_admission_limit_is_all_or_nothing() -> None:
    slot = ModelSlot("m", make_detector(FakeBackend()), Path("m.onnx"), max_queue=3)
    slot.admit(2)
    slot.admit(1)
    with pytest.raises(Overloaded, match="m"):
        slot.admit(1)
    assert (slot.admitted, slot.decoding) == (3, 3)
    slot.decoding -= 1  # one image decoded (run_one counts this itself) ...
    slot.release(1, decoded=1)  # ... and answered
    assert (slot.admitted, slot.decoding) == (2, 2)
    with pytest.raises(Overloaded):
        slot.admit(2)  # a batch of 2 does not fit in the 1 place left: none of it is admitted
    assert (slot.admitted, slot.decoding) == (2, 2)
    slot.admit(1)
    slot.release(3, decoded=0)  # cancelled before decoding: release counts their decoding down too
    assert (slot.admitted, slot.decoding) == (0, 0)
    slot.admit(3)
    assert slot.admitted == 3


def test_a_failing_batch_fails_each_of_its_jobs_and_the_batcher_goes_on(engine) -> None:
    e = engine(max_batch=2)
    n0 = len(e.backend.batches)

    async def main() -> None:
        e.backend.gate.clear()
        first = e.submit([140])
        await until_entered(e.backend)
        bad = e.submit([POISON_RED, 141])  # one batch: the poison image fails both of its jobs
        after = e.submit([142])  # the next batch is served
        e.backend.gate.set()
        r0, b1, b2, r3 = await answers(first + bad + after)
        assert_result_of(r0, 140)
        for b in (b1, b2):
            assert isinstance(b, RuntimeError) and "boom" in str(b)
        assert_result_of(r3, 142, batch_size=1)
        e.backend.error = ValueError("backend down")
        (failed,) = await answers(e.submit([143]))
        assert isinstance(failed, ValueError)
        e.backend.error = None
        (ok,) = await answers(e.submit([144]))
        assert_result_of(ok, 144)

    run(main())
    assert e.backend.calls_since(n0) == [1, 2, 1, 1, 1]
    assert e.batcher.thread.is_alive()
    assert e.sample("vocdet_batch_size_count") == 3  # failed batches are not observed


def test_jobs_whose_client_gave_up_are_skipped(engine) -> None:
    e = engine(max_batch=4)
    n0 = len(e.backend.batches)

    async def main() -> None:
        e.backend.gate.clear()
        first = e.submit([160])
        await until_entered(e.backend)
        gone, kept = e.submit([161, 162])
        gone.future.cancel()  # e.g. asyncio.wait_for timed out in the route
        e.backend.gate.set()
        r0, r2 = await answers([*first, kept])
        assert_result_of(r0, 160)
        assert_result_of(r2, 162, batch_size=1)

    run(main())
    assert e.backend.calls_since(n0) == [1, 1]


def test_stop_answers_queued_jobs_then_ends_the_thread(engine) -> None:
    e = engine(max_batch=2)

    async def main() -> None:
        e.backend.gate.clear()
        jobs = e.submit([170])
        await until_entered(e.backend)
        jobs += e.submit([171, 172, 173])
        stopper = asyncio.create_task(asyncio.to_thread(e.batcher.stop, WAIT_S))  # joins the thread
        await asyncio.sleep(0.05)
        assert e.batcher.thread.is_alive()
        e.backend.gate.set()
        for red, r in zip(range(170, 174), await answers(jobs)):
            assert_result_of(r, red)
        await asyncio.wait_for(stopper, WAIT_S)

    run(main())
    assert not e.batcher.thread.is_alive()


def test_warm_up_and_info() -> None:
    backend = FakeBackend()
    slot = ModelSlot("m", make_detector(backend), Path("dir/m.ONNX"), max_queue=5)
    slot.warm_up()
    assert backend.batches == [1]
    info = slot.info()
    assert info["format"] == "onnx" and info["file"] == "m.ONNX" and info["imgsz"] == IMGSZ
    assert info["class_names"] == list(VOC_CLASSES) and info["nms_in_graph"] is False
    assert ModelSlot("c", slot.detector, Path("best.ckpt"), 1).info()["format"] == "checkpoint"
    assert ModelSlot("t", slot.detector, Path("m.torchscript"), 1).info()["format"] == "torchscript"


def test_letterboxed_images_of_other_shapes_run_in_one_batch(engine) -> None:
    e = engine(max_batch=4)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        e.backend.gate.clear()
        first = e.submit([100])
        await until_entered(e.backend)
        tall: Letterboxed = e.detector.prepare(image(101, h=120, w=40))
        job = Job(tall, None, None, None, loop.create_future(), loop)
        e.batcher.submit(job)
        rest = e.submit([102])
        e.backend.gate.set()
        r0, r1, r2 = await answers([*first, job, *rest])
        assert_result_of(r0, 100)
        assert_result_of(r2, 102, batch_size=2)
        assert r1.batch_size == 2 and np.allclose(r1.detections[0].box, (0, 0, 40, 120), atol=1e-3)

    run(main())
