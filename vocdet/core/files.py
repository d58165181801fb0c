"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path | None, data: Any) -> None:
    """``data`` as indented JSON at ``path`` (folders created), written to a temporary name and renamed into place;
    nothing when ``path`` is empty."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
