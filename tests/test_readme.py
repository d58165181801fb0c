"""The README's notebook session, executed as written (in a scratch copy of the repository's configs)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def notebook_code() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## In a notebook", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_notebook_session_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vocdet

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    namespace: dict = {}
    exec(compile(notebook_code(), "README.md", "exec"), namespace)
    assert namespace["best"] == tmp_path / "runs/notebook/checkpoints/best.ckpt" and namespace["best"].is_file()
    assert namespace["metrics"]["map50"] > 0.3
    detections = namespace["detections"]
    assert detections and all(isinstance(d, vocdet.Detection) for d in detections)
    figure = vocdet.plot(namespace["image"], detections)
    assert isinstance(figure, Image.Image) and figure.size == Image.open(namespace["image"]).size
    assert os.path.isdir("data/synthetic")
