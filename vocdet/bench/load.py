"""Load test ``vocdet serve`` over real HTTP on loopback: ``python -m vocdet.bench.load [--onnx M] [--soak]``.

The servers run one after another, each in its own subprocess, on the same ONNX model and the same JPEGs:

* ``batched``: ``vocdet serve`` with micro-batching (``serve.max_batch_size=8 serve.max_wait_ms=5``);
* ``no-batching``: ``vocdet serve`` with ``serve.max_batch_size=1``;
* ``baseline``: :func:`baseline_app`, the original project's design (model loaded per request, on the event loop);
* ``batched-no-drift``: ``batched`` with drift detection off (``serve.drift=false``): what watching drift costs
  (the other servers run with it on, the default; the quickstart model carries a reference profile);
* ``batched-int8``: ``batched`` on the int8 export of the same model (``vocdet export --int8``; ``--int8 M``, or
  made from the quickstart checkpoint when no ``--onnx`` is given; skipped with a note otherwise).

For every server and concurrency level, N asyncio clients share one ``httpx.AsyncClient`` and POST real JPEG
bytes (multipart field ``file``, cycling through ``--images``) back to back until ``--requests`` have been sent
or ``--max-seconds`` have passed; one request per client first warms the connections up, unmeasured.

How to read the numbers:

* ``req/s`` counts good answers only (200 with a ``detections`` list) over the level's wall time, from the first
  request to the last answer. ``errors`` is everything else: non-200 statuses, bad bodies, transport errors.
* ``p50/p95/p99`` are client-side latencies (ms) of every request sent, queueing in the server included: at N
  clients a request waits for the ones ahead of it, so latency grows with N once the server is saturated.
* ``batch`` is the mean server-side batch size the good answers ran in (``timing_ms.batch_size``; ``-`` for the
  baseline, which does not batch).
* ``bare`` is the in-process :class:`~vocdet.infer.detector.Detector` on the same images (decode + letterbox + infer)
  in batches of 8 and of 1: the ceiling a server of this model can approach on this machine. ``infer8_ms`` is
  the median time of ``Detector.infer`` alone on a batch of 8, used in the p99 latency goal.
* The clients run on the same machine as the server: on a small CPU they take cores from it, so the server
  ratios are lower bounds. Numbers from a busy machine are noisy; compare runs made on an idle one.

``--soak`` sends 10,000 requests at 32 clients to the batched server and compares its resident memory after
1,000 and after 10,000 requests (a leak shows as growth). Results go to ``<out>/loadtest.json`` and
``<out>/soak.json``. Server logs go to ``<out>/loadtest-<server>.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from fastapi import FastAPI, File, UploadFile

from vocdet.bench.common import SAMPLE

DEFAULT_CKPT = Path("runs/quickstart/checkpoints/best.ckpt")
BATCH, WAIT_MS = 8, 5.0
SOAK_MAX_SECONDS = 1800.0  # time cap of each soak phase
PORT = "{port}"  # placeholder in server arguments, replaced by a free port
SERVERS: dict[str, list[str]] = {
    "batched": ["vocdet", "serve", "--port", PORT, "--onnx", "{onnx}", "--name", "voc",
                f"serve.max_batch_size={BATCH}", f"serve.max_wait_ms={WAIT_MS:g}"],
    "no-batching": ["vocdet", "serve", "--port", PORT, "--onnx", "{onnx}", "--name", "voc", "serve.max_batch_size=1"],
    "baseline": ["vocdet.bench.load", "--baseline-app", "--port", PORT, "--onnx", "{onnx}"],
    "batched-int8": ["vocdet", "serve", "--port", PORT, "--onnx", "{int8}", "--name", "voc",
                     f"serve.max_batch_size={BATCH}", f"serve.max_wait_ms={WAIT_MS:g}"],
    "batched-no-drift": ["vocdet", "serve", "--port", PORT, "--onnx", "{onnx}", "--name", "voc",
                         f"serve.max_batch_size={BATCH}", f"serve.max_wait_ms={WAIT_MS:g}", "serve.drift=false"],
}  # fmt: skip


# ----------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: Sequence[str], log: Path | None = None, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``python -m *args`` (``{port}`` replaced by a free port); returns once ``GET /readyz`` answers 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps writing to it
    proc = subprocess.Popen(
        [sys.executable, "-m", *(str(port) if a == PORT else a for a in args)],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,  # Ctrl-C reaches us; we stop it
    )  # fmt: skip
    if log:
        out.close()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log.read_text()[-2000:] if log else ""
                raise RuntimeError(f"server {' '.join(args[:2])} exited with {proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server {' '.join(args[:2])} was not ready within {timeout:g} s (log: {log})")
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM (the server drains), then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()


def server_args(name: str, onnx: Path, int8: Path | None = None) -> list[str]:
    return [{"{onnx}": str(onnx), "{int8}": str(int8)}.get(a, a) for a in SERVERS[name]]


@contextmanager
def serving(name: str, onnx: Path, out: Path, int8: Path | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    proc, url = start_server(server_args(name, onnx, int8), out / f"loadtest-{name}.log")
    try:
        yield proc, url
    finally:
        stop(proc)


def baseline_app(onnx: Path) -> FastAPI:
    """The seed project's serving design, reproduced as the "before" that ``vocdet serve`` replaces.

    Its ``async def`` endpoint loads the model from disk on EVERY request (``Detector.from_onnx``) and then runs
    ``predict``, all inside the event loop: no model cache, no thread pool, no batching, so requests are served
    strictly one at a time and each pays for a session build. Do not use it for anything but this comparison.
    """
    from vocdet.core.images import decode_image
    from vocdet.infer.detector import Detector

    app = FastAPI(title="vocdet load-test baseline")

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}  # nothing to load up front: that is the point

    @app.post("/predict/{model}")
    async def predict(model: str, file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008
        detector = Detector.from_onnx(onnx)  # blocking, on the event loop, every request
        detections = detector.predict(decode_image(await file.read(), file.filename or "upload"))[0]
        return {"model": model, "detections": [d.to_dict() for d in detections]}

    return app


# ----------------------------------------------------------------------------------------------- load
async def hammer(
    client: httpx.AsyncClient, images: list[tuple[str, bytes]], clients: int, n: int, max_seconds: float
) -> tuple[list[float], list[str], list[int], float]:
    """``clients`` tasks POST images until ``n`` requests are sent or ``max_seconds`` pass (in-flight ones finish).

    Returns per-request latencies (s), outcomes ("200", another status, "bad-body", "transport"), the server's
    batch sizes (``timing_ms.batch_size`` of good answers that report one) and the wall time."""
    counter, latencies, outcomes, batches = itertools.count(), [], [], []
    start = time.perf_counter()
    deadline = start + max_seconds

    async def worker() -> None:
        while time.perf_counter() < deadline and (i := next(counter)) < n:
            name, data = images[i % len(images)]
            t = time.perf_counter()
            try:
                r = await client.post("/predict/voc", files={"file": (name, data, "image/jpeg")})
                outcome = str(r.status_code)
                if r.status_code == 200:
                    body = r.json()
                    outcome = "200" if isinstance(body.get("detections"), list) else "bad-body"
                    if "timing_ms" in body:  # vocdet serve reports the batch each image ran in
                        batches.append(body["timing_ms"]["batch_size"])
            except (httpx.HTTPError, ValueError):
                outcome = "transport"
            latencies.append(time.perf_counter() - t)
            outcomes.append(outcome)

    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, outcomes, batches, time.perf_counter() - start


def summarize(server: str, clients: int, latencies: list[float], outcomes: list[str], batches: list[int],
              seconds: float) -> dict:  # fmt: skip
    ms = np.asarray(latencies) * 1000
    p50, p95, p99 = (float(np.percentile(ms, q)) for q in (50, 95, 99)) if len(ms) else (None,) * 3
    ok = outcomes.count("200")
    return {
        "server": server, "concurrency": clients, "requests": len(outcomes), "ok": ok,
        "errors": len(outcomes) - ok, "seconds": seconds, "req_s": ok / seconds if seconds > 0 else 0.0,
        "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": float(ms.mean()) if len(ms) else None,
        "mean_batch": float(np.mean(batches)) if batches else None, "outcomes": dict(Counter(outcomes)),
    }  # fmt: skip


def make_client(url: str, clients: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(120.0))


async def measure(name: str, url: str, images: list[tuple[str, bytes]], s: argparse.Namespace) -> list[dict]:
    rows = []
    async with make_client(url, max(s.levels)) as client:
        for c in s.levels:
            await hammer(client, images, c, c, s.max_seconds)  # warm-up: open the connections
            rows.append(summarize(name, c, *await hammer(client, images, c, s.requests, s.max_seconds)))
            print(format_row(rows[-1]), flush=True)
    return rows


def bare_detector(onnx: Path, images: list[tuple[str, bytes]], n: int) -> dict[str, float]:
    """In-process decode + letterbox + infer on ``n`` images, in batches of 8 and of 1."""
    from vocdet.core.images import decode_image
    from vocdet.infer.detector import Detector

    d = Detector.from_onnx(onnx)
    if getattr(d.backend, "fixed_batch", None) == 1:
        print(f"warning: {onnx} takes batch 1 only (export with export.dynamic_batch=true): batching gains nothing")
    items = [images[i % len(images)] for i in range(max(n, BATCH))]
    d.infer([d.prepare(decode_image(data)) for _, data in items[:16]])  # warm-up, every letterbox shape
    out: dict[str, float] = {}
    for bs in (BATCH, 1):
        infer_s = []
        start = time.perf_counter()
        for i in range(0, len(items), bs):
            preps = [d.prepare(decode_image(data, name)) for name, data in items[i : i + bs]]
            t = time.perf_counter()
            d.infer(preps)
            infer_s.append(time.perf_counter() - t)
        out[f"batch{bs}_img_s"] = len(items) / (time.perf_counter() - start)
        out[f"infer{bs}_ms"] = statistics.median(infer_s) * 1000
    return out


def goals(rows: list[dict], bare: dict[str, float], at: int) -> list[dict]:
    """The goal checks at ``at`` clients; a goal whose inputs were not measured is n/a (ok: None)."""
    r = {row["server"]: row for row in rows if row["concurrency"] == at}
    b, base, nob = r.get("batched"), r.get("baseline"), r.get("no-batching")
    ratio = lambda x, y: x / y if x is not None and y else None  # noqa: E731
    bound = 2 * WAIT_MS + bare["infer8_ms"]
    checks = [
        ("batched / baseline req/s", ratio(b and b["req_s"], base and base["req_s"]), ">=", 3.0),
        ("batched req/s / bare Detector img/s (batch 8)", ratio(b and b["req_s"], bare["batch8_img_s"]), ">=", 0.85),
        ("batched / no-batching req/s", ratio(b and b["req_s"], nob and nob["req_s"]), ">=", 1.2),
        ("batched p99 ms vs 2 x max_wait_ms + bare infer8_ms", b and b["p99_ms"], "<=", bound),
    ]
    if nd := r.get("batched-no-drift"):
        checks.append(("batched (drift on) / batched-no-drift req/s", ratio(b and b["req_s"], nd["req_s"]), ">=", 0.95))
    if q := r.get("batched-int8"):  # no goal of its own: how much int8 adds to a served model
        checks.append(("batched-int8 / batched req/s", ratio(q["req_s"], b and b["req_s"]), ">=", 1.0))
    return [
        {"name": n, "at": at, "value": v, "op": op, "goal": g,
         "ok": None if v is None else (v >= g if op == ">=" else v <= g)}
        for n, v, op, g in checks
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------- output
HEADER = (
    f"{'server':<16} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7} {'batch':>6}"
)


def format_row(r: dict) -> str:
    f = lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}"  # noqa: E731
    c, req = r["concurrency"], r["req_s"]
    batch = f"{r['mean_batch']:6.2f}" if r["mean_batch"] else f"{'-':>6}"
    return f"{r['server']:<16} {c:>7} {req:8.1f} {f(r['p50_ms'])} {f(r['p95_ms'])} {f(r['p99_ms'])} {r['errors']:>7} {batch}"


def format_goal(g: dict) -> str:
    verdict = {True: "PASS", False: "MISS", None: "n/a"}[g["ok"]]
    value = f"{g['value']:.2f}" if g["value"] is not None else "-"
    return f"  {g['name']:<52} {value:>8}  goal {g['op']} {g['goal']:<6.4g} {verdict}"


# ----------------------------------------------------------------------------------------------- main
def resolve_model(onnx: str | None, out: Path, int8: bool = False) -> Path:
    """``onnx``, else ``runs/quickstart``'s best.ckpt exported (dynamic batch) to ``<out>/loadtest[-int8].onnx``."""
    if onnx:
        if not Path(onnx).is_file():
            raise SystemExit(f"error: --{'int8' if int8 else 'onnx'} {onnx}: no such file")
        return Path(onnx).resolve()
    if not DEFAULT_CKPT.is_file():
        raise SystemExit(f"error: no model: give --onnx MODEL.onnx, or train {DEFAULT_CKPT} first (make quickstart)")
    target = out / ("loadtest-int8.onnx" if int8 else "loadtest.onnx")
    if not target.is_file() or target.stat().st_mtime < DEFAULT_CKPT.stat().st_mtime:
        from vocdet.infer.export import export

        overrides = ["export.dynamic_batch=true", f"export.int8={int8}", f"export.output={target}"]
        export(DEFAULT_CKPT, overrides=overrides)
    return target.resolve()


def load_images(directory: Path) -> list[tuple[str, bytes]]:
    files = sorted(p for p in Path(directory).glob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"error: no JPEG images in {directory} (give --images DIR)")
    return [(p.name, p.read_bytes()) for p in files]


def run_load(onnx: Path, images: list[tuple[str, bytes]], s: argparse.Namespace) -> dict[str, Any]:
    int8 = None
    if "batched-int8" in s.servers:
        if s.int8 or not s.onnx:
            int8 = resolve_model(s.int8, s.out, int8=True)
        else:
            print("note: no --int8 model for --onnx; the batched-int8 server is skipped", flush=True)
            s.servers = [x for x in s.servers if x != "batched-int8"]
    print(f"bare Detector on {s.requests} images ...", flush=True)
    bare = bare_detector(onnx, images, s.requests)
    print("  " + ", ".join(f"{k} {v:.1f}" for k, v in bare.items()), flush=True)
    rows: list[dict] = []
    servers: dict[str, dict] = {}
    print(HEADER, flush=True)
    for name in s.servers:
        with serving(name, onnx, s.out, int8) as (proc, url):
            servers[name] = {"pid": proc.pid, "url": url, "args": server_args(name, onnx, int8)}
            rows += asyncio.run(measure(name, url, images, s))
    at = 16 if 16 in s.levels else max(s.levels)
    checks = goals(rows, bare, at)
    print(f"\n{HEADER}\n" + "\n".join(format_row(r) for r in rows))
    print(f"\ngoal checks at {at} clients:\n" + "\n".join(format_goal(g) for g in checks))
    return {"settings": settings(onnx, images, s), "bare": bare, "servers": servers, "results": rows, "goals": checks}


def run_soak(onnx: Path, images: list[tuple[str, bytes]], s: argparse.Namespace) -> dict[str, Any]:
    first, clients, cap = s.soak_requests // 10, 32, SOAK_MAX_SECONDS
    with serving("batched", onnx, s.out) as (proc, url):

        async def soak() -> list[dict]:
            async with make_client(url, clients) as client:
                await hammer(client, images, clients, clients, cap)
                a = summarize("batched", clients, *await hammer(client, images, clients, first, cap))
                a["rss"] = psutil.Process(proc.pid).memory_info().rss
                b = summarize("batched", clients, *await hammer(client, images, clients, s.soak_requests - first, cap))
                b["rss"] = psutil.Process(proc.pid).memory_info().rss
                return [a, b]

        a, b = asyncio.run(soak())
    errors, ratio = a["errors"] + b["errors"], b["rss"] / a["rss"]
    print(f"{HEADER}\n{format_row(a)}   (first {a['requests']})\n{format_row(b)}   (next {b['requests']})")
    print(f"\nsoak: {a['requests'] + b['requests']} requests at {clients} clients, errors {errors}")
    print(f"  RSS after {a['requests']}: {a['rss'] / 2**20:.1f} MiB")
    print(f"  RSS after {a['requests'] + b['requests']}: {b['rss'] / 2**20:.1f} MiB")
    print(
        f"  ratio {ratio:.3f}  goal <= 1.05  {'PASS' if ratio <= 1.05 else 'MISS'}   errors: {'PASS' if not errors else 'MISS'}"
    )
    return {
        "settings": settings(onnx, images, s), "pid": proc.pid, "requests": a["requests"] + b["requests"],
        "errors": errors, "rss_first": a["rss"], "rss_last": b["rss"], "rss_ratio": ratio, "ok": ratio <= 1.05,
        "phases": [a, b],
    }  # fmt: skip


def settings(onnx: Path, images: list[tuple[str, bytes]], s: argparse.Namespace) -> dict[str, Any]:
    keys = ("levels", "requests", "max_seconds", "servers", "soak_requests")
    return {
        "onnx": str(onnx), "images": str(s.images), "n_images": len(images), **{k: getattr(s, k) for k in keys},
        "max_batch_size": BATCH, "max_wait_ms": WAIT_MS, "cpus": os.cpu_count(), "machine": platform.platform(),
    }  # fmt: skip


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vocdet.bench.load", description=__doc__.split("\n")[0])
    p.add_argument("--onnx", help="model to serve (default: export runs/quickstart's best.ckpt)")
    p.add_argument("--int8", help="int8 model for the batched-int8 server (default: export it, without --onnx)")
    p.add_argument("--images", type=Path, default=SAMPLE / "JPEGImages", help="directory of JPEGs to send")
    p.add_argument("--levels", help="concurrency levels, comma-separated (default 1,4,16,32)")
    p.add_argument("--requests", type=int, help="measured requests per level (default 200)")
    p.add_argument("--max-seconds", type=float, help="time cap per level (default 60)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    p.add_argument("--soak", action="store_true", help="soak the batched server and watch its memory")
    p.add_argument("--soak-requests", type=int, help="requests in --soak (default 10000; RSS read at 1/10 and end)")
    p.add_argument("--quick", action="store_true", help="tiny settings for tests: levels 1,4, 20 requests")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="output directory")
    p.add_argument("--baseline-app", action="store_true", help=argparse.SUPPRESS)  # the baseline server process
    p.add_argument("--port", type=int, default=8000, help=argparse.SUPPRESS)
    s = p.parse_args(argv)
    q = s.quick
    s.levels = [int(x) for x in (s.levels or ("1,4" if q else "1,4,16,32")).split(",")]
    s.requests = s.requests or (20 if q else 200)
    s.max_seconds = s.max_seconds or (20.0 if q else 60.0)
    s.soak_requests = s.soak_requests or (200 if q else 10_000)
    s.servers = [x for x in s.servers.split(",") if x]
    if unknown := set(s.servers) - set(SERVERS):
        p.error(f"unknown --servers {', '.join(sorted(unknown))} (choose from {', '.join(SERVERS)})")
    if min(s.levels) < 1 or s.requests < 1 or s.soak_requests < 10:
        p.error("--levels and --requests must be positive, --soak-requests at least 10")
    return s


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the load test (or, with ``--soak``, the soak); writes and returns the report."""
    s = parse(argv)
    if s.baseline_app:
        import uvicorn

        uvicorn.run(baseline_app(resolve_model(s.onnx, s.out)), host="127.0.0.1", port=s.port, log_level="warning")
        return {}
    s.out.mkdir(parents=True, exist_ok=True)
    onnx, images = resolve_model(s.onnx, s.out), load_images(s.images)
    report = run_soak(onnx, images, s) if s.soak else run_load(onnx, images, s)
    path = s.out / ("soak.json" if s.soak else "loadtest.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return report


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks that stop the servers
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted (servers stopped)", file=sys.stderr)
        sys.exit(130)
