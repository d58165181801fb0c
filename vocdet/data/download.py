"""Download, verify and extract the official PASCAL VOC archives.

``download_voc(root)`` fetches the VOC2007 trainval/test and VOC2012 trainval tars into
``root/downloads``, checks their md5, and extracts them so that ``root/VOCdevkit/VOC2007`` and
``root/VOCdevkit/VOC2012`` exist. It is safe to interrupt and re-run at any point:

* a partial download lives in ``<archive>.part`` and is resumed with an HTTP ``Range`` request
  (or restarted from zero when the server ignores ``Range``);
* an archive is only renamed to its final name once its md5 matches, so a file under the final
  name is always a verified one;
* extraction happens in a temporary directory inside ``root`` and is then moved into place, and a
  ``<archive>.extracted`` marker is written only afterwards, so a re-run after a crash simply
  extracts again, and a re-run after success makes no network request at all.

Only the standard library is used for HTTP (``urllib.request``) so that a mirror can be any plain
HTTP server, or even a ``file://`` URL pointing at a directory of archives.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from vocdet.errors import VocdetError

__all__ = ["DEFAULT_BASE_URL", "VOC_ARCHIVES", "Archive", "download_voc"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    """One downloadable archive: its path relative to the base URL and its expected md5."""

    path: str  # relative to base_url, e.g. "voc2007/VOCtrainval_06-Nov-2007.tar"
    md5: str

    @property
    def basename(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]


DEFAULT_BASE_URL = "http://host.robots.ox.ac.uk/pascal/VOC/"
VOC_ARCHIVES: tuple[Archive, ...] = (
    Archive("voc2007/VOCtrainval_06-Nov-2007.tar", "c52e279531787c972589f7e41ab4ae64"),
    Archive("voc2007/VOCtest_06-Nov-2007.tar", "b6e924de25625d8de591ea690078ad9f"),
    Archive("voc2012/VOCtrainval_11-May-2012.tar", "6cd6e144f989b92b3379bac3b3de84fd"),
)

CHUNK_SIZE = 1 << 20  # 1 MiB: large enough for throughput, small enough for a smooth progress bar
DEVKIT = "VOCdevkit"
_MIRROR_HINT = "check the network connection, or set a mirror via download.base_url"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
# Errors that mean "the transfer failed", as opposed to local disk errors while writing.
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)
# tarfile.FilterError exists only where PEP 706 ("data" filter) is available; `except ()` catches nothing.
_FILTER_ERROR = getattr(tarfile, "FilterError", ())


def download_voc(
    root: str | Path,
    base_url: str = DEFAULT_BASE_URL,
    archives: Sequence[Archive] = VOC_ARCHIVES,
    *,
    progress: bool = True,
    timeout: float = 60.0,
    keep_archives: bool = False,
) -> Path:
    """Download + verify + extract every archive; returns the VOCdevkit directory (root/"VOCdevkit").

    Archives already extracted (marker file present and the directories they provided still there)
    are skipped without any network access; an already downloaded archive with the right md5 is not
    downloaded again. Raises ``VocdetError`` for every failure a user can act on.
    """
    root = Path(root).expanduser()
    downloads = root / "downloads"
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VocdetError(f"cannot create download directory {downloads}: {e}; choose a writable root") from e

    # Decide what is already done before extracting anything: VOC2007 trainval and test share
    # VOCdevkit/VOC2007, so re-extracting one must not make the other's stale marker look valid.
    done = [_is_extracted(downloads / f"{a.basename}.extracted", a, root) for a in archives]
    for archive, extracted in zip(archives, done, strict=True):
        marker = downloads / f"{archive.basename}.extracted"
        if extracted:
            log.info("%s already extracted, skipping", archive.basename)
            continue
        dest = downloads / archive.basename
        if dest.is_file():
            if _md5(dest) == archive.md5:
                log.info("%s already downloaded and verified", archive.basename)
            else:
                # A file under the final name is normally verified (see _download); one that is not
                # was put there by hand or is stale, so fetching a fresh copy is the right fix.
                log.warning("%s exists but its md5 does not match; downloading it again", dest)
                dest.unlink()
        if not dest.is_file():
            _download(_join_url(base_url, archive.path), dest, archive, progress=progress, timeout=timeout)
        provided = _extract(dest, root, archive)
        # The marker holds the md5 (so a different release is redone) and the directories this
        # archive provided (so deleting e.g. VOCdevkit/VOC2012 makes the next run restore it).
        marker.write_text("\n".join([archive.md5, *provided]) + "\n")
        if not keep_archives:
            dest.unlink()

    devkit = root / DEVKIT
    if not devkit.is_dir():
        names = ", ".join(a.basename for a in archives) or "no archives"
        raise VocdetError(
            f"archive did not contain {DEVKIT}/… ({names}); check that download.base_url points to "
            f"the PASCAL VOC archives"
        )
    return devkit


# --------------------------------------------------------------------------------------------------
# download


def _join_url(base_url: str, path: str) -> str:
    # Plain concatenation rather than urljoin: urljoin drops the last path segment of a base URL
    # without a trailing slash, which silently breaks mirrors given as ".../VOC".
    return base_url.rstrip("/") + "/" + path.lstrip("/")


def _is_extracted(marker: Path, archive: Archive, root: Path) -> bool:
    # A marker alone is not enough: if the user deleted what the archive provided, it is stale.
    try:
        md5, *provided = marker.read_text().split()
    except (OSError, ValueError):
        return False
    return md5 == archive.md5 and bool(provided) and all((root / p).is_dir() for p in provided)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # integrity check, not security
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, archive: Archive, *, progress: bool, timeout: float) -> None:
    """Fetch ``url`` into ``dest`` via ``dest.part`` (resuming it), verify md5, then rename."""
    part = dest.with_name(dest.name + ".part")
    # At most two attempts: the second one only happens after a range request went wrong
    # (server sent the wrong range, or the .part is already complete/oversized) and starts from zero.
    for attempt in range(2):
        offset = part.stat().st_size if part.is_file() else 0
        outcome = _fetch(url, part, offset, desc=archive.basename, progress=progress, timeout=timeout)
        if outcome == "restart" and attempt == 0:
            part.unlink(missing_ok=True)
            continue
        # 416: the server has no bytes after our offset, i.e. the .part is probably complete already
        # (a previous run was interrupted between download and rename); if it is not, start over.
        if outcome == "unsatisfiable" and attempt == 0 and _md5(part) != archive.md5:
            part.unlink()
            continue
        break

    actual = _md5(part)
    if actual != archive.md5:
        part.unlink()
        raise VocdetError(
            f"md5 mismatch for {archive.path}: expected {archive.md5}, got {actual}; the corrupted "
            f"download was deleted, re-run to fetch it again (or set another mirror via download.base_url)"
        )
    part.replace(dest)


def _fetch(url: str, part: Path, offset: int, *, desc: str, progress: bool, timeout: float) -> str:
    """Stream ``url`` into ``part`` starting at ``offset``.

    Returns "done", "restart" (server answered with a range we cannot use) or "unsatisfiable"
    (HTTP 416 for our range). Network failures raise VocdetError and keep ``part`` so the next run
    resumes from where this one stopped.
    """
    headers = {"User-Agent": "vocdet"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        request = urllib.request.Request(url, headers=headers)
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            return "unsatisfiable"
        raise VocdetError(f"download of {url} failed: HTTP {e.code} {e.reason}; {_MIRROR_HINT}") from e
    except _NETWORK_ERRORS as e:
        reason = getattr(e, "reason", e)
        raise VocdetError(f"download of {url} failed: {reason}; {_MIRROR_HINT}") from e
    except ValueError as e:  # malformed URL, e.g. a base_url without a scheme
        raise VocdetError(f"invalid download URL {url!r}: {e}; fix download.base_url") from e

    with response:
        # file:// responses have no status; they behave like a server without range support.
        status = getattr(response, "status", None) or 200
        length = response.headers.get("Content-Length")
        total: int | None = None
        if offset and status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                return "restart"
            if match.group(3) != "*":
                total = int(match.group(3))
            mode = "ab"
        else:
            # 200 (or a server that ignores Range): the body is the whole file, start over.
            offset = 0
            mode = "wb"
        if total is None and length is not None and length.isdigit():
            total = offset + int(length)

        try:
            out = part.open(mode)
        except OSError as e:
            raise VocdetError(f"cannot write {part}: {e}; check permissions and free disk space") from e
        with (
            out,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=not progress,
            ) as bar,
        ):
            written = offset + _copy(response, out, bar, url, part)

    if total is not None and written != total:
        # http.client does not raise when a server closes the connection early on a sized read,
        # so compare against the announced size ourselves. Keep the .part: the next run resumes.
        raise VocdetError(
            f"download of {url} was interrupted after {written} of {total} bytes; re-run to resume ({_MIRROR_HINT})"
        )
    return "done"


def _copy(response: BinaryIO, out: BinaryIO, bar: tqdm, url: str, part: Path) -> int:
    copied = 0
    while True:
        try:
            chunk = response.read(CHUNK_SIZE)
        except _NETWORK_ERRORS as e:
            out.flush()  # make sure what we have is on disk, so the next run resumes from it
            raise VocdetError(
                f"download of {url} was interrupted after {part.stat().st_size} bytes ({e}); re-run "
                f"to resume ({_MIRROR_HINT})"
            ) from e
        if not chunk:
            return copied
        try:
            out.write(chunk)
        except OSError as e:
            raise VocdetError(f"cannot write {part}: {e}; check free disk space, then re-run") from e
        copied += len(chunk)
        bar.update(len(chunk))


# --------------------------------------------------------------------------------------------------
# extraction


def _extract(archive_path: Path, root: Path, archive: Archive) -> list[str]:
    """Extract into a temporary directory inside ``root``, then merge it into ``root``.

    Returns the directories the archive provided, relative to ``root`` (e.g. ``["VOCdevkit/VOC2007"]``).

    The temporary directory is on the same filesystem, so the final move is a cheap rename, and a
    crash during the (slow) extraction leaves nothing under ``root/VOCdevkit``.
    """
    staging = root / f".extract-{archive.basename}.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
    staging.mkdir(parents=True)
    try:
        try:
            with tarfile.open(archive_path) as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member, staging, archive)
                if hasattr(tarfile, "data_filter"):
                    # Defence in depth: the "data" filter also rejects device files, absolute link
                    # targets and strips dangerous permission bits.
                    tar.extractall(staging, members=members, filter="data")
                else:  # Python without PEP 706; _check_member already vetted every member
                    tar.extractall(staging, members=members)
        except _FILTER_ERROR as e:
            raise VocdetError(
                f"refusing to extract {archive.basename}: unsafe member ({e}); delete "
                f"{archive_path} and re-run, or use a trusted mirror"
            ) from e
        except (tarfile.TarError, EOFError) as e:
            raise VocdetError(f"cannot read {archive_path}: {e}; delete it and re-run to download it again") from e
        except OSError as e:
            raise VocdetError(
                f"extracting {archive_path} failed: {e}; check free disk space in {root}, then re-run"
            ) from e
        if not (staging / DEVKIT).is_dir():
            raise VocdetError(
                f"archive {archive.basename} did not contain {DEVKIT}/…; check that download.base_url "
                f"points to the PASCAL VOC archives"
            )
        provided = sorted(f"{DEVKIT}/{p.name}" for p in (staging / DEVKIT).iterdir() if p.is_dir())
        _merge_into(staging, root)
        return provided or [DEVKIT]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_member(member: tarfile.TarInfo, dest: Path, archive: Archive) -> None:
    """Refuse members that would land outside ``dest`` (absolute paths, ``..``, escaping links)."""
    dest = dest.resolve()
    target = (dest / member.name).resolve()
    unsafe = member.name.startswith(("/", "\\")) or not target.is_relative_to(dest)
    if not unsafe and (member.issym() or member.islnk()):
        base = target.parent if member.issym() else dest
        link = (base / member.linkname).resolve()
        unsafe = member.linkname.startswith(("/", "\\")) or not link.is_relative_to(dest)
    if unsafe:
        raise VocdetError(
            f"refusing to extract {archive.basename}: member {member.name!r} would escape the target "
            f"directory; the archive is corrupted or malicious, use a trusted mirror"
        )
    if member.isdev():
        raise VocdetError(
            f"refusing to extract {archive.basename}: member {member.name!r} is a device file; the "
            f"archive is corrupted or malicious, use a trusted mirror"
        )


def _merge_into(src: Path, dst: Path) -> None:
    """Move the tree ``src`` into ``dst``, merging directories that already exist.

    VOC2007 trainval and test both unpack into VOCdevkit/VOC2007, so the second archive must be
    merged; whole subtrees that do not exist yet are moved with a single rename.
    """
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
            _merge_into(entry, target)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            entry.replace(target)
