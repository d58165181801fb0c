"""Writing files so that a reader never sees half of one, even after a SIGKILL or a power cut: the bytes go to a
temporary file in the same folder, are flushed and fsynced, then renamed over the target (atomic on POSIX), and the
folder is fsynced so the rename itself survives. A failed or interrupted write leaves the previous file as it was
and no temporary file behind (except after SIGKILL, which nothing can clean up: those are ``.<name>.*.tmp``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, committed only when the ``with`` block ends without an exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not fsync folders
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) at ``path``, atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | Path | None, data: Any) -> None:
    """``data`` as indented JSON at ``path``, atomically; nothing when ``path`` is empty."""
    if path:
        write_text(path, json.dumps(data, indent=2))


@contextlib.contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """A temporary folder inside ``target`` whose files move into ``target`` when the ``with`` block succeeds: an
    interrupted or failed writer leaves ``target`` as it was (and no temporary folder)."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target))
    try:
        yield staging
        for f in sorted(staging.iterdir()):
            f.replace(target / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def commit(tmp: str | Path, path: str | Path) -> None:
    """Move a finished ``tmp`` file (written by a library that wants a file name) over ``path``, durably."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)
