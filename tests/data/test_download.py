"""Tests for vocdet.data.download against a local HTTP mirror serving tiny VOC-shaped archives.

The ``voc_mirror`` fixture is a real ``ThreadingHTTPServer`` on 127.0.0.1 that serves small tars
laid out like the official ones (``voc2007/VOCtrainval_06-Nov-2007.tar`` containing
``VOCdevkit/VOC2007/...``). It supports ``Range`` requests (switchable off), can cut a transfer
short or stall it, and records every request so tests can prove what went over the wire.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import re
import shutil
import socket
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vocdet.data.download import Archive, download_voc
from vocdet.errors import VocdetError

# A real 32x24 grey JPEG (642 bytes), so that later tests may decode the mirrored images.
JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDABALDA4MChAODQ4SERATGCgaGBYWGDEjJR0oOjM9PDkzODdASFxOQERXRTc4UG1R"
    "V19iZ2hnPk1xeXBkeFxlZ2P/2wBDARESEhgVGC8aGi9jQjhCY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2Nj"
    "Y2NjY2NjY2NjY2NjY2P/wAARCAAYACADASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAA"
    "AgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6"
    "Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXG"
    "x8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREA"
    "AgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5"
    "OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPE"
    "xcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwAoooqyAooooAKKKKACiiigD//Z"
)


def _annotation(year: str, image_id: str, cls: str) -> bytes:
    return f"""<annotation>
  <folder>VOC{year}</folder>
  <filename>{image_id}.jpg</filename>
  <size><width>32</width><height>24</height><depth>3</depth></size>
  <segmented>0</segmented>
  <object>
    <name>{cls}</name>
    <pose>Unspecified</pose>
    <truncated>0</truncated>
    <difficult>0</difficult>
    <bndbox><xmin>4</xmin><ymin>3</ymin><xmax>28</xmax><ymax>20</ymax></bndbox>
  </object>
</annotation>
""".encode()


def _voc_members(year: str, splits: dict[str, list[str]], classes: dict[str, str]) -> dict[str, bytes]:
    base = f"VOCdevkit/VOC{year}"
    members: dict[str, bytes] = {}
    for image_id, cls in classes.items():
        members[f"{base}/Annotations/{image_id}.xml"] = _annotation(year, image_id, cls)
        members[f"{base}/JPEGImages/{image_id}.jpg"] = JPEG
    for split, ids in splits.items():
        members[f"{base}/ImageSets/Main/{split}.txt"] = "".join(f"{i}\n" for i in ids).encode()
    return members


# Relative paths mirror the real archives, so Archive.path values look exactly like VOC_ARCHIVES.
VOC_CONTENT: dict[str, dict[str, bytes]] = {
    "voc2007/VOCtrainval_06-Nov-2007.tar": _voc_members(
        "2007",
        {"train": ["000005"], "val": ["000007"], "trainval": ["000005", "000007"]},
        {"000005": "chair", "000007": "car"},
    ),
    "voc2007/VOCtest_06-Nov-2007.tar": _voc_members(
        "2007", {"test": ["000001", "000002"]}, {"000001": "dog", "000002": "train"}
    ),
    "voc2012/VOCtrainval_11-May-2012.tar": _voc_members(
        "2012",
        {"train": ["2008_000008"], "val": ["2008_000015"], "trainval": ["2008_000008", "2008_000015"]},
        {"2008_000008": "horse", "2008_000015": "bottle"},
    ),
}


def make_tar(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """An uncompressed tar (like the official ones) with directory entries, deterministic bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        dirs = sorted({str(p) for name in members for p in Path(name).parents if str(p) not in (".", "")})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_200_000_000
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_200_000_000
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


@dataclass
class Request:
    path: str
    range: str | None
    status: int
    body_bytes: int  # bytes of body the server sent (after any truncation)


@dataclass
class VocMirror:
    """State of the local mirror; tests flip the switches between calls."""

    files_dir: Path
    base_url: str = ""
    archives: list[Archive] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    support_range: bool = True
    wrong_range: bool = False  # answer a Range request with 206 for the whole file (a broken server)
    truncate_after: int | None = None  # send only this many body bytes, then close the connection
    stall: bool = False  # send headers, then wait (until teardown) before sending the body
    release: threading.Event = field(default_factory=threading.Event)

    def add_archive(self, rel_path: str, members: dict[str, bytes], links: dict[str, str] | None = None) -> Archive:
        """Serve a new tar at ``rel_path`` and return its Archive (not added to ``.archives``)."""
        data = make_tar(members, links)
        target = self.files_dir / rel_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return Archive(rel_path, hashlib.md5(data).hexdigest())

    def data(self, archive: Archive) -> bytes:
        return (self.files_dir / archive.path).read_bytes()

    @property
    def bytes_sent(self) -> int:
        return sum(r.body_bytes for r in self.requests)


class _MirrorHandler(BaseHTTPRequestHandler):
    server: _MirrorServer

    def do_GET(self) -> None:
        mirror = self.server.mirror
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        range_header = self.headers.get("Range")
        file = mirror.files_dir / rel
        if not rel or not file.is_file():
            mirror.requests.append(Request(rel, range_header, 404, 0))
            self.send_error(404)
            return
        data = file.read_bytes()
        start, status = 0, 200
        if range_header and mirror.support_range:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match, f"client sent an unexpected Range header {range_header!r}"
            start, status = (0 if mirror.wrong_range else int(match.group(1))), 206
            if start >= len(data):
                mirror.requests.append(Request(rel, range_header, 416, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        sent = body if mirror.truncate_after is None else body[: mirror.truncate_after]
        # Record before sending: the client may finish reading before this thread resumes.
        mirror.requests.append(Request(rel, range_header, status, len(sent)))
        self.send_response(status)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        try:
            if mirror.stall:
                self.wfile.flush()
                mirror.release.wait(timeout=10)
            self.wfile.write(sent)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test); nothing to do

    def log_message(self, *args: object) -> None:
        pass  # keep pytest output clean


class _MirrorServer(ThreadingHTTPServer):
    mirror: VocMirror


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours proxy variables; loopback tests must never be routed through a proxy.
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def voc_mirror(tmp_path: Path) -> Iterator[VocMirror]:
    """A loopback HTTP mirror serving the three VOC-shaped archives of VOC_CONTENT."""
    mirror = VocMirror(files_dir=tmp_path / "mirror")
    mirror.archives = [mirror.add_archive(path, members) for path, members in VOC_CONTENT.items()]
    server = _MirrorServer(("127.0.0.1", 0), _MirrorHandler)
    server.mirror = mirror
    mirror.base_url = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield mirror
    finally:
        mirror.release.set()  # unblock stalled handlers
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "data"


def _assert_voc_layout(devkit: Path) -> None:
    for year, ids, splits in (
        ("2007", ["000005", "000007", "000001", "000002"], ["train", "val", "trainval", "test"]),
        ("2012", ["2008_000008", "2008_000015"], ["train", "val", "trainval"]),
    ):
        voc = devkit / f"VOC{year}"
        for image_id in ids:
            assert (voc / "Annotations" / f"{image_id}.xml").read_text().startswith("<annotation>")
            assert (voc / "JPEGImages" / f"{image_id}.jpg").read_bytes() == JPEG
        for split in splits:
            assert (voc / "ImageSets" / "Main" / f"{split}.txt").is_file()


# --------------------------------------------------------------------------------------------------
# happy paths


def test_full_download_extracts_layout_and_removes_archives(voc_mirror: VocMirror, root: Path) -> None:
    devkit = download_voc(root, voc_mirror.base_url, voc_mirror.archives, progress=False)

    assert devkit == root / "VOCdevkit"
    _assert_voc_layout(devkit)
    # Both VOC2007 archives were merged into one VOC2007 directory.
    assert {p.name for p in devkit.iterdir()} == {"VOC2007", "VOC2012"}
    # Archives are gone, only the markers remain; no temporary extraction dirs are left behind.
    assert sorted(p.name for p in (root / "downloads").iterdir()) == sorted(
        f"{a.basename}.extracted" for a in voc_mirror.archives
    )
    assert {p.name for p in root.iterdir()} == {"VOCdevkit", "downloads"}
    assert [(r.path, r.range, r.status) for r in voc_mirror.requests] == [
        (a.path, None, 200) for a in voc_mirror.archives
    ]


def test_second_run_is_a_noop(voc_mirror: VocMirror, root: Path) -> None:
    download_voc(root, voc_mirror.base_url, voc_mirror.archives, progress=False)
    before = len(voc_mirror.requests)
    marker_xml = root / "VOCdevkit/VOC2007/Annotations/000005.xml"
    marker_xml.write_text("<annotation>edited</annotation>")

    devkit = download_voc(root, voc_mirror.base_url, voc_mirror.archives, progress=False)

    assert len(voc_mirror.requests) == before
    assert marker_xml.read_text() == "<annotation>edited</annotation>"  # nothing re-extracted
    assert devkit == root / "VOCdevkit"


def test_deleted_devkit_is_downloaded_again(voc_mirror: VocMirror, root: Path) -> None:
    download_voc(root, voc_mirror.base_url, voc_mirror.archives, progress=False)
    shutil.rmtree(root / "VOCdevkit")  # stale markers must not make us skip

    download_voc(root, voc_mirror.base_url, voc_mirror.archives, progress=False)

    assert len(voc_mirror.requests) == 2 * len(voc_mirror.archives)
    _assert_voc_layout(root / "VOCdevkit")


def test_deleted_year_is_restored_alone(voc_mirror: VocMirror, root: Path) -> None:
    download_voc(root, voc_mirror.base_url, voc_mirror.archives, progress=False)
    shutil.rmtree(root / "VOCdevkit" / "VOC2012")

    download_voc(root, voc_mirror.base_url, voc_mirror.archives, progress=False)

    assert [r.path for r in voc_mirror.requests[len(voc_mirror.archives) :]] == [voc_mirror.archives[2].path]
    _assert_voc_layout(root / "VOCdevkit")


def test_keep_archives(voc_mirror: VocMirror, root: Path) -> None:
    download_voc(root, voc_mirror.base_url, voc_mirror.archives, progress=False, keep_archives=True)

    for archive in voc_mirror.archives:
        assert (root / "downloads" / archive.basename).read_bytes() == voc_mirror.data(archive)
    _assert_voc_layout(root / "VOCdevkit")


def test_verified_archive_on_disk_is_not_downloaded(voc_mirror: VocMirror, root: Path) -> None:
    (root / "downloads").mkdir(parents=True)
    for archive in voc_mirror.archives:
        (root / "downloads" / archive.basename).write_bytes(voc_mirror.data(archive))

    download_voc(root, voc_mirror.base_url, voc_mirror.archives, progress=False)

    assert voc_mirror.requests == []
    _assert_voc_layout(root / "VOCdevkit")


def test_corrupt_archive_on_disk_is_downloaded_again(voc_mirror: VocMirror, root: Path) -> None:
    archive = voc_mirror.archives[0]
    (root / "downloads").mkdir(parents=True)
    (root / "downloads" / archive.basename).write_bytes(b"not a tar")

    download_voc(root, voc_mirror.base_url, [archive], progress=False)

    assert [r.status for r in voc_mirror.requests] == [200]
    assert (root / "VOCdevkit/VOC2007/Annotations/000005.xml").is_file()


def test_file_url_mirror(voc_mirror: VocMirror, root: Path) -> None:
    # A directory of archives (e.g. on a shared drive) works as a mirror through file:// URLs.
    download_voc(root, voc_mirror.files_dir.as_uri(), voc_mirror.archives, progress=False)

    assert voc_mirror.requests == []
    _assert_voc_layout(root / "VOCdevkit")


# --------------------------------------------------------------------------------------------------
# resume


def _write_part(root: Path, archive: Archive, data: bytes) -> Path:
    part = root / "downloads" / f"{archive.basename}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)
    return part


def test_resume_transfers_only_the_remaining_bytes(voc_mirror: VocMirror, root: Path) -> None:
    archive = voc_mirror.archives[0]
    data = voc_mirror.data(archive)
    half = len(data) // 2
    part = _write_part(root, archive, data[:half])

    # progress=True exercises the tqdm path (initial offset from the .part, total from Content-Range).
    download_voc(root, voc_mirror.base_url, [archive], progress=True)

    assert voc_mirror.requests == [Request(archive.path, f"bytes={half}-", 206, len(data) - half)]
    assert not part.exists()
    assert (root / "VOCdevkit/VOC2007/JPEGImages/000005.jpg").read_bytes() == JPEG


def test_server_without_range_support_restarts_from_zero(voc_mirror: VocMirror, root: Path) -> None:
    archive = voc_mirror.archives[0]
    data = voc_mirror.data(archive)
    voc_mirror.support_range = False
    # Garbage in the .part proves it was overwritten rather than appended to (md5 would fail).
    _write_part(root, archive, b"x" * (len(data) // 2))

    download_voc(root, voc_mirror.base_url, [archive], progress=False)

    [request] = voc_mirror.requests
    assert request.range == f"bytes={len(data) // 2}-"
    assert (request.status, request.body_bytes) == (200, len(data))
    assert (root / "VOCdevkit/VOC2007/Annotations/000007.xml").is_file()


def test_wrong_content_range_restarts_from_zero(voc_mirror: VocMirror, root: Path) -> None:
    archive = voc_mirror.archives[0]
    data = voc_mirror.data(archive)
    voc_mirror.wrong_range = True
    _write_part(root, archive, data[:100])

    download_voc(root, voc_mirror.base_url, [archive], progress=False)

    # The 206 for bytes 0- was not appended to the .part; a fresh request without Range followed.
    assert [(r.range, r.status) for r in voc_mirror.requests] == [("bytes=100-", 206), (None, 200)]
    assert (root / "VOCdevkit/VOC2007/Annotations/000005.xml").is_file()


def test_complete_part_is_verified_without_transferring(voc_mirror: VocMirror, root: Path) -> None:
    # A run interrupted between download and rename leaves a complete .part; the server answers 416.
    archive = voc_mirror.archives[1]
    _write_part(root, archive, voc_mirror.data(archive))

    download_voc(root, voc_mirror.base_url, [archive], progress=False)

    assert [(r.status, r.body_bytes) for r in voc_mirror.requests] == [(416, 0)]
    assert (root / "VOCdevkit/VOC2007/ImageSets/Main/test.txt").read_text() == "000001\n000002\n"


def test_interrupted_transfer_keeps_part_and_next_run_resumes(voc_mirror: VocMirror, root: Path) -> None:
    archive = voc_mirror.archives[2]
    data = voc_mirror.data(archive)
    voc_mirror.truncate_after = 3000

    with pytest.raises(VocdetError, match=r"interrupted after 3000 of"):
        download_voc(root, voc_mirror.base_url, [archive], progress=False)
    part = root / "downloads" / f"{archive.basename}.part"
    assert part.stat().st_size == 3000
    assert not (root / "VOCdevkit").exists()

    voc_mirror.truncate_after = None
    download_voc(root, voc_mirror.base_url, [archive], progress=False)

    assert voc_mirror.requests[-1] == Request(archive.path, "bytes=3000-", 206, len(data) - 3000)
    assert voc_mirror.bytes_sent == len(data)
    assert (root / "VOCdevkit/VOC2012/JPEGImages/2008_000015.jpg").read_bytes() == JPEG


# --------------------------------------------------------------------------------------------------
# failures


def test_md5_mismatch_removes_file(voc_mirror: VocMirror, root: Path) -> None:
    archive = voc_mirror.archives[0]
    wrong = dataclasses.replace(archive, md5="0" * 32)

    with pytest.raises(VocdetError, match="md5") as excinfo:
        download_voc(root, voc_mirror.base_url, [wrong], progress=False)

    message = str(excinfo.value)
    for needle in (archive.path, "0" * 32, archive.md5, "re-run"):
        assert needle in message
    assert "\n" not in message  # the CLI prints it as one line
    assert list((root / "downloads").iterdir()) == []
    assert not (root / "VOCdevkit").exists()


def test_unreachable_server(root: Path) -> None:
    with socket.socket() as sock:  # grab a free port and close it: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/pascal/VOC"
    archive = Archive("voc2007/VOCtrainval_06-Nov-2007.tar", "0" * 32)

    with pytest.raises(VocdetError, match=r"download\.base_url") as excinfo:
        download_voc(root, base_url, [archive], progress=False, timeout=5)

    assert f"{base_url}/{archive.path}" in str(excinfo.value)


def test_http_404(voc_mirror: VocMirror, root: Path) -> None:
    archive = Archive("voc2007/missing.tar", "0" * 32)

    with pytest.raises(VocdetError, match="HTTP 404") as excinfo:
        download_voc(root, voc_mirror.base_url, [archive], progress=False)

    assert f"{voc_mirror.base_url}voc2007/missing.tar" in str(excinfo.value)
    assert "download.base_url" in str(excinfo.value)


def test_stalled_server_times_out_and_keeps_part(voc_mirror: VocMirror, root: Path) -> None:
    archive = voc_mirror.archives[0]
    voc_mirror.stall = True

    with pytest.raises(VocdetError, match="interrupted"):
        download_voc(root, voc_mirror.base_url, [archive], progress=False, timeout=0.3)

    assert (root / "downloads" / f"{archive.basename}.part").exists()


def test_invalid_base_url(root: Path) -> None:
    with pytest.raises(VocdetError, match=r"download\.base_url"):
        download_voc(root, "host.example/VOC", [Archive("a.tar", "0" * 32)], progress=False)


@pytest.mark.parametrize(
    ("members", "links"),
    [
        ({"VOCdevkit/VOC2007/ok.txt": b"ok", "../evil": b"pwned"}, None),
        ({"VOCdevkit/VOC2007/ok.txt": b"ok", "VOCdevkit/../../evil": b"pwned"}, None),
        ({"VOCdevkit/VOC2007/ok.txt": b"ok"}, {"VOCdevkit/VOC2007/link": "../../../evil"}),
        ({"VOCdevkit/VOC2007/ok.txt": b"ok"}, {"VOCdevkit/VOC2007/link": "/etc/passwd"}),
    ],
    ids=["dotdot", "nested-dotdot", "symlink-escape", "symlink-absolute"],
)
def test_unsafe_member_is_refused(
    voc_mirror: VocMirror, root: Path, members: dict[str, bytes], links: dict[str, str] | None
) -> None:
    archive = voc_mirror.add_archive("evil/evil.tar", members, links)

    with pytest.raises(VocdetError, match=r"refusing to extract evil\.tar"):
        download_voc(root, voc_mirror.base_url, [archive], progress=False)

    assert not (root.parent / "evil").exists()
    assert not (root / "evil").exists()
    assert {p.name for p in root.iterdir()} == {"downloads"}  # nothing extracted, no temp dir left


def test_archive_without_devkit(voc_mirror: VocMirror, root: Path) -> None:
    archive = voc_mirror.add_archive("other/other.tar", {"something/else.txt": b"hi"})

    with pytest.raises(VocdetError, match=r"did not contain VOCdevkit/"):
        download_voc(root, voc_mirror.base_url, [archive], progress=False)

    assert {p.name for p in root.iterdir()} == {"downloads"}


# ------------------------------------------------------------------------------------------------ the real CLI


@pytest.mark.slow
def test_cli_download_then_train_reads_the_devkit(voc_mirror: VocMirror, tmp_path: Path) -> None:
    """`vocdet data download` with the mirror and checksums from a config file, then the data module reads it."""
    from tests.conftest import run_cli

    cfg = tmp_path / "mirror.yaml"
    archives = "\n".join(f"    - {{path: {a.path}, md5: {a.md5}}}" for a in voc_mirror.archives)
    cfg.write_text(f"download:\n  base_url: {voc_mirror.base_url}\n  archives:\n{archives}\n")
    proc = run_cli("data", "download", "--root", str(tmp_path / "voc"), "--config", str(cfg), timeout=120)
    assert proc.returncode == 0, proc.stderr
    devkit = tmp_path / "voc" / "VOCdevkit"
    assert f"VOC is ready in {devkit}" in proc.stdout
    assert {r.path for r in voc_mirror.requests} == {a.path for a in voc_mirror.archives}

    from vocdet.core.voc import load_records, resolve_split

    train = load_records(resolve_split(devkit, ["2007/trainval", "2012/trainval"], "train"), "train")
    test = load_records(resolve_split(devkit, ["2007/test"], "val"), "val")
    assert train and test and all(r.labels.size for r in train + test)

    # A wrong checksum is a one-line error and exit code 2.
    cfg.write_text(
        f"download:\n  base_url: {voc_mirror.base_url}\n  archives:\n    - {{path: x/missing.tar, md5: 0}}\n"
    )
    proc = run_cli("data", "download", "--root", str(tmp_path / "voc2"), "--config", str(cfg), timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
