"""The documentation site (mkdocs.yml, docs/): it builds with ``mkdocs build --strict`` (every link, anchor and
reference checked), its generated CLI and config references are complete, the API reference carries the public
docstrings, and the built pages render in headless Chromium without errors and without fetching anything from
outside the site. A broken link fails the strict build.

Chromium as in ``tests/serve/test_serve_page.py``: Debian's ``chromium`` driven by Playwright (no downloaded
Playwright browsers); ``VOCDET_CHROMIUM`` may name another binary.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import threading
import typing
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import INSTALL_CHROMIUM as INSTALL
from tests.conftest import chromium_path

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 180
TIMEOUT_MS = 30_000
# The two plugins' banners about MkDocs' future, printed on every build: not warnings of this site.
QUIET = {"NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env={**os.environ, **QUIET},
        stdin=subprocess.DEVNULL,
    )


def page_text(page_html: str) -> str:
    """The visible text of a page, tags dropped and whitespace collapsed."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", page_html, flags=re.S)
    body = re.sub(r"</?(code|span|a|em|strong)\b[^>]*>", "", body)  # inline: no space where they were
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def plain(docstring: str) -> str:
    """A docstring's text as a page shows it: code-span backticks and reST roles gone, whitespace collapsed."""
    return " ".join(re.sub(r":\w+:`~?([^`]+)`", r"\1", docstring).replace("`", "").split())


# ------------------------------------------------------------------------------------------ what must be there


def cli_commands() -> list[tuple[str, list[str]]]:
    """``(command path, its option and argument names)`` for every command and group of the Typer app."""
    import typer

    from vocdet.cli import app

    out: list[tuple[str, list[str]]] = []

    def walk(cmd, ctx) -> None:
        names = [n for p in cmd.params if not getattr(p, "hidden", False) for n in [*p.opts, *p.secondary_opts]]
        out.append((ctx.command_path, names))
        for name in getattr(cmd, "list_commands", lambda _: [])(ctx):
            sub = cmd.get_command(ctx, name)
            if not getattr(sub, "hidden", False):
                walk(sub, sub.context_class(sub, info_name=name, parent=ctx))

    root = typer.main.get_command(app)
    walk(root, root.context_class(root, info_name="vocdet"))
    return out[1:]  # vocdet itself is the page


def config_keys() -> list[str]:
    """Every key of the schema as a dotted path: the dataclass fields of ``vocdet.config.Config``, recursively, and
    the built-in keys of a mapping section (``trainer``)."""
    from vocdet.config import Config

    keys: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            keys.append(key)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
            elif not prefix and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
                if isinstance(default, dict):  # a section of free-form keys (trainer) with built-in ones
                    keys.extend(f"{key}.{k}" for k in default)

    walk(Config, "")
    return keys


# ------------------------------------------------------------------------------------------ unit (no processes)


def load_gen_ref():
    spec = importlib.util.spec_from_file_location("gen_ref", REPO / "docs" / "gen_ref.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)  # named gen_ref, not <run_path>: writes no pages, prints nothing
    finally:
        del sys.modules[spec.name]
    return module


def test_generated_markdown_escapes_help_text() -> None:
    gen = load_gen_ref()
    assert gen.text("writes <run.dir>/<run.name> a|b predict.* x_y") == (
        r"writes &lt;run.dir&gt;/&lt;run.name&gt; a\|b predict.\* x\_y"
    )
    assert gen.text("keeps `code <b>|*` and ``double``") == "keeps `code <b>|*` and ``double``"
    assert gen.text("see :func:`defaults_yaml` and :class:`~vocdet.errors.VocdetError`") == (
        "see `defaults_yaml` and `VocdetError`"
    )
    sections = gen.sections()
    rendered = {key for s in sections for key, *_ in s.keys} | {s.path for s in sections}
    assert set(config_keys()) <= rendered


def table_rows(markdown: str) -> list[str]:
    """The rows of the Markdown tables in ``markdown``, each up to its last ``|`` (a row may run on into text)."""
    return [line[: line.rindex("|") + 1].strip() for line in markdown.splitlines() if line.startswith("|")]


def test_readme_tables_are_on_the_site() -> None:
    """The site copies the README's tables (endpoints, layouts, every measured figure) as they are: a table changed
    in one place and not the other fails here, naming the row."""
    site = "\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    site_rows = {row.replace(r"\|", "|") for row in table_rows(site)}  # a | escaped in a cell on the site
    missing = [row for row in table_rows((REPO / "README.md").read_text()) if row not in site_rows]
    assert not missing, "README table rows missing from docs/ (copy them, e.g. into docs/benchmarks.md):\n" + "\n".join(
        missing
    )


# ------------------------------------------------------------------------------------------ the built site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    proc = mkdocs_build(REPO / "mkdocs.yml", out)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log[-5000:]}"
    assert not re.search(r"^(WARNING|ERROR)\b", log, re.M), log[-5000:]
    return out


@pytest.mark.slow
def test_cli_reference_lists_every_command(site: Path) -> None:
    page = (site / "reference" / "cli" / "index.html").read_text()
    text = page_text(page)
    commands = cli_commands()
    assert {"vocdet train", "vocdet data synth"} <= {c for c, _ in commands}
    for command, names in commands:
        anchor = command.replace(" ", "-")
        assert re.search(rf'<h[2-4] id="{anchor}"[^>]*>.*?<code>{command}</code>', page, re.S), command
        assert f"$ {command} " in text, f"no usage line for {command}"
        for name in names:
            assert name in text, f"{command}: {name} missing from the CLI reference"


@pytest.mark.slow
def test_config_reference_lists_every_key(site: Path) -> None:
    page = (site / "reference" / "config" / "index.html").read_text()
    keys = config_keys()
    assert {"data.imgsz", "data.synth.images", "trainer.devices", "serve.max_batch_size"} <= set(keys)
    missing = [k for k in keys if f"<code>{k}</code>" not in page]
    assert not missing, f"config keys missing from the config reference: {missing}"
    from vocdet.config import schema_help

    text = page_text(page)
    missing = [h for h in schema_help().values() if plain(h) not in text]
    assert not missing, f"help texts missing from the config reference: {missing}"


@pytest.mark.slow
def test_api_reference_has_the_public_docstrings(site: Path) -> None:
    import vocdet
    from vocdet.config import load_config
    from vocdet.errors import VocdetError

    page = (site / "reference" / "api" / "index.html").read_text()
    for name in vocdet.__all__:
        assert f'id="vocdet.{name}"' in page, f"vocdet.{name} missing from the API reference"
    text = page_text(page)
    for obj in (load_config, VocdetError):
        first = plain(inspect.getdoc(obj).split("\n\n")[0])
        assert first in text, f"the docstring of {obj.__name__} is not on the API page: {first!r}"
    assert ":func:" not in text and ":class:" not in text, "reST roles leaked onto the API page"


@pytest.mark.slow
def test_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(REPO / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(REPO / "docs", copy / "docs")
    (copy / "vocdet").symlink_to(REPO / "vocdet")  # mkdocstrings reads the package beside mkdocs.yml
    with (copy / "docs" / "training.md").open("a") as fh:
        fh.write("\nSee [the missing page](no-such-page.md) and [an anchor](serving.md#no-such-anchor).\n")
    proc = mkdocs_build(copy / "mkdocs.yml", tmp_path / "site")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "no-such-page.md" in log and "no-such-anchor" in log and "strict mode" in log, log[-3000:]


# ------------------------------------------------------------------------------------------ in the browser


@pytest.fixture(scope="module")
def site_url(site: Path) -> Iterator[str]:
    """The built site over loopback, as a static web server would serve it."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed ({INSTALL})", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"], timeout=TIMEOUT_MS)
        yield b
        b.close()


class Page:
    """A fresh browser page on the served site that records console errors, failed requests and any request that
    leaves the site (the site must work offline: no fonts, scripts or analytics from elsewhere)."""

    def __init__(self, browser, site_url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.site_url = site_url
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))
        self.page.on("request", self._request)

    def _console(self, message) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def _request(self, request) -> None:
        if not request.url.startswith((self.site_url + "/", "data:", "blob:")):
            self.outside.append(request.url)

    def open(self, path: str) -> None:
        response = self.page.goto(self.site_url + path, wait_until="networkidle")
        assert response is not None and response.status == 200, path

    def close(self) -> None:
        self.context.close()
        assert not self.errors, self.errors
        assert not self.outside, f"the page fetched from outside the site: {self.outside}"


@pytest.fixture
def page(browser, site_url: str) -> Iterator[Page]:
    pg = Page(browser, site_url)
    yield pg
    pg.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "heading", "min_height"),
    [("/", "vocdet", 1000), ("/reference/api/", "Python API", 4000), ("/reference/cli/", "CLI reference", 4000)],
)
def test_page_renders(page: Page, tmp_path: Path, path: str, heading: str, min_height: int) -> None:
    page.open(path)
    pg = page.page
    assert "vocdet" in pg.title() and pg.inner_text("h1").strip().startswith(heading), pg.title()
    nav = pg.locator("nav.md-nav--primary")
    assert pg.is_visible("nav.md-nav--primary"), "no navigation"
    links = nav.locator("a.md-nav__link")
    assert links.count() >= 12, f"{links.count()} navigation links"
    for label in ("Getting started", "Training", "Benchmarks", "CLI", "Python API"):
        assert nav.get_by_text(label, exact=True).count(), f"{label} is not in the navigation"
    height = pg.evaluate("document.documentElement.scrollHeight")
    assert height >= min_height, f"{path} is {height} px high"
    shot = tmp_path / f"{path.strip('/').replace('/', '-') or 'home'}.png"
    pg.screenshot(path=shot, full_page=True)
    assert shot.stat().st_size > 20_000
    if os.environ.get("VOCDET_DOCS_SCREENSHOTS"):  # a folder to keep them in, to look at
        shutil.copy(shot, Path(os.environ["VOCDET_DOCS_SCREENSHOTS"]) / shot.name)


@pytest.mark.slow
def test_search_works_offline(page: Page) -> None:
    """The search index and its worker are part of the site: a query finds the page that has the word."""
    page.open("/")
    pg = page.page
    pg.click("input.md-search__input")
    pg.keyboard.type("mosaic", delay=20)  # key by key, as Material's search listens to the keyboard
    pg.locator(".md-search-result__item").first.wait_for()
    assert "mosaic" in pg.inner_text(".md-search-result").lower()
