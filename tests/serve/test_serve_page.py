"""The web page at ``GET /`` of ``vocdet serve``, driven in headless Chromium (Playwright + the system Chromium).

Needs ``apt-get install -y --no-install-recommends chromium`` and ``pip install playwright`` (no downloaded
Playwright browsers: the system one is used). ``VOCDET_CHROMIUM`` may name another Chromium/Chrome binary.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import INSTALL_CHROMIUM as INSTALL
from tests.conftest import chromium_path

pytestmark = pytest.mark.slow

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed ({INSTALL})", pytrace=False)
    executable = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"], timeout=TIMEOUT_MS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"uncaught JavaScript errors: {errors}"


def open_page(page, server) -> None:
    page.goto(server.url + "/")
    page.wait_for_function("[...document.querySelectorAll('#model option')].some(o => o.value === 'voc')")
    assert page.evaluate("document.body.dataset.state") == "ready"
    assert page.title() == "vocdet"
    page.fill("#conf", "0.01")
    page.dispatch_event("#conf", "change")


def until(page, action, state: str = "done") -> None:
    """Run ``action`` and wait for the page to settle in ``state`` (reset first: the last one may match)."""
    page.evaluate("document.body.dataset.state = ''")
    action()
    page.wait_for_function("s => document.body.dataset.state === s", arg=state)


def api_result(server, image: Path) -> dict:
    r = httpx.post(
        f"{server.url}/predict/voc", params={"conf": 0.01}, files={"file": (image.name, image.read_bytes())}, timeout=30
    )
    assert r.status_code == 200, r.text
    return r.json()


def table_rows(page) -> list[list[str]]:
    return page.eval_on_selector_all(
        "#detections tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent.trim()))"
    )


def check_results(page, server, image: Path) -> list[dict]:
    """The table and the canvas show what the API returns for the same image and threshold."""
    result = api_result(server, image)
    expected = result["detections"]
    assert expected, f"the test model finds nothing in {image.name} even at conf 0.01"
    rows = table_rows(page)
    assert len(rows) == len(expected)
    for row, det in zip(rows, expected):
        assert row[1:] == [det["label"], f"{det['score']:.2f}", ", ".join(str(round(v)) for v in det["box"])]
    status = page.inner_text("#status")
    assert re.match(rf"^{len(expected)} detections? in \d+ ms \(batch size \d+;", status), status
    assert page.is_visible("#canvas") and page.is_hidden("#error")
    assert page.evaluate("document.getElementById('canvas').width") == min(900, result["width"])  # scaled to fit

    # Not blank: the photo is there (many distinct pixel values) ...
    spread = page.evaluate(
        """() => {
            const c = document.getElementById('canvas'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const seen = new Set();
            for (let i = 0; i < d.length; i += 4 * 97) seen.add(d[i] << 16 | d[i + 1] << 8 | d[i + 2]);
            return {w: c.width, h: c.height, distinct: seen.size};
        }"""
    )
    assert spread["w"] > 100 and spread["h"] > 100 and spread["distinct"] > 200, spread
    # ... and the top box (the page draws by ascending score, a stable sort) sits where the API says, in its
    # class colour, on the scaled image.
    top = sorted(expected, key=lambda d: d["score"])[-1]
    probe = page.evaluate(
        """([box, cls, width]) => {
            const c = document.getElementById('canvas'), ctx = c.getContext('2d');
            const s = c.width / width, hex = colour(cls);
            const want = [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16));
            const x = Math.round(box[0] * s), y = Math.round((box[1] + box[3]) / 2 * s);
            const px = ctx.getImageData(Math.max(0, x - 3), y, 7, 1).data;
            let best = 1e9;
            for (let i = 0; i < px.length; i += 4) best = Math.min(best, Math.max(...want.map((v, k) => Math.abs(v - px[i + k]))));
            return best;
        }""",
        [top["box"], top["class_id"], result["width"]],
    )
    assert probe <= 40, f"no box edge in colour of class {top['class_id']} at the left edge of {top['box']}"
    return expected


def busiest_images(server, sample_root: Path, n: int = 2, scan: int = 30) -> list[Path]:
    """The ``n`` sample photos with the most detections (the test model is weak: many have none)."""
    counts = {
        p: len(api_result(server, p)["detections"]) for p in sorted((sample_root / "JPEGImages").glob("*.jpg"))[:scan]
    }
    best = sorted(counts, key=lambda p: -counts[p])[:n]
    assert len(best) == n and all(counts[p] for p in best), f"the test model finds nothing in {n} of {scan} photos"
    return best


def test_page_detects_draws_and_reports_errors(server, sample_root: Path, page, tmp_path: Path) -> None:
    image, other = busiest_images(server, sample_root)
    open_page(page, server)
    assert page.input_value("#conf") == "0.01" and page.input_value("#conf-range") == "0.01"

    until(page, lambda: page.set_input_files("#file", image))
    check_results(page, server, image)
    shot = tmp_path / "page.png"
    page.screenshot(path=shot, full_page=True)
    assert shot.is_file() and shot.stat().st_size > 10_000
    if os.environ.get("VOCDET_PAGE_SCREENSHOT"):  # keep one to look at
        shutil.copy(shot, os.environ["VOCDET_PAGE_SCREENSHOT"])

    # A non-image: the server's detail shows, and the stale results go away.
    fake = tmp_path / "notes.jpg"
    fake.write_text("these are notes, not a photo\n")
    until(page, lambda: page.set_input_files("#file", fake), "error")
    page.wait_for_selector("#error", state="visible")
    assert "cannot decode" in page.inner_text("#error")
    assert page.is_hidden("#canvas") and page.is_hidden("#detections")

    # The page recovers with the next good image, dropped on the drop zone (a synthetic drop event); it is
    # 1800 px wide, so the canvas shows it at 900 px and the boxes must scale with it.
    from PIL import Image

    big = tmp_path / f"big-{other.name}"
    with Image.open(other) as im:
        im.resize((1800, round(im.height * 1800 / im.width)), Image.Resampling.BICUBIC).save(big, quality=92)
    data = base64.b64encode(big.read_bytes()).decode()
    drop = """([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), ch => ch.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'image/jpeg'}));
        const zone = document.getElementById('drop');
        zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }"""
    until(page, lambda: page.evaluate(drop, [big.name, data]))
    check_results(page, server, big)
    assert big.name in page.inner_text("#status")


def test_page_without_models(server, page) -> None:
    page.route("**/models", lambda route: route.fulfill(json=[]))
    page.goto(server.url + "/")
    page.wait_for_function("document.body.dataset.state === 'ready'")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.textContent)") == ["no model loaded"]
    assert page.is_disabled("#model") and "no model loaded" in page.inner_text("#status")
