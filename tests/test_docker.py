"""docker/: the Dockerfiles pass hadolint, and what the images run works: vocdet installed (not editable) into a
fresh venv the way the images install it, then the serve image's ENTRYPOINT + CMD and HEALTHCHECK commands run
as written (model path and port substituted). No Docker engine runs here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from vocdet.bench.load import free_port

pytestmark = pytest.mark.slow
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))


def instruction(dockerfile: Path, name: str) -> list[str]:
    """The JSON (exec-form) argument list of the last ``name`` instruction (HEALTHCHECK: its CMD part)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.startswith(name + " ")]
    assert lines, f"{dockerfile.name} has no {name}"
    return json.loads(re.search(r"(\[.*\])\s*$", lines[-1]).group(1))


def test_dockerfiles_pass_hadolint() -> None:
    assert {p.name for p in DOCKERFILES} == {"train.Dockerfile", "serve.Dockerfile"}
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run(
        [str(hadolint), "--config", str(REPO / ".hadolint.yaml"), *map(str, DOCKERFILES)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    serve = (REPO / "docker" / "serve.Dockerfile").read_text()
    assert "HEALTHCHECK" in serve and "/healthz" in serve and "\nUSER 1000" in serve
    assert "nvidia" not in serve.lower() and "FROM python:" in serve
    assert "FROM pytorch/pytorch:" in (REPO / "docker" / "train.Dockerfile").read_text()
    assert "runs" in (REPO / ".dockerignore").read_text().split()


def test_image_commands_work_in_a_fresh_install(onnx_model: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The heavy dependencies come from this environment (no network); vocdet itself installs as the images do it:
    # a regular, non-editable `pip install .`, so the package data (the web page) must be in the wheel.
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(
        next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir()).as_posix()
    )
    # This environment's pip and setuptools build the wheel; it is installed into the fresh venv.
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps"]
    pip += ["--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--quiet", str(REPO)], check=True, timeout=300, cwd=tmp_path)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import vocdet.serve.app as a; print(a.STATIC / 'index.html')"],
        capture_output=True, text=True, check=True, timeout=120, cwd=tmp_path,
    ).stdout.strip()  # fmt: skip
    assert str(venv) in installed and Path(installed).is_file()
    train = instruction(REPO / "docker" / "train.Dockerfile", "ENTRYPOINT")
    assert train[:3] == ["tini", "-g", "--"]  # an init as PID 1 (no tini here: the command after it runs)
    train = train[3:]
    help_ = subprocess.run(
        [str(venv / "bin" / train[0]), *train[1:], "--help"], capture_output=True, text=True, timeout=120
    )
    assert help_.returncode == 0 and "--gpus" in help_.stdout

    serve = REPO / "docker" / "serve.Dockerfile"
    port = str(free_port())
    cmd = instruction(serve, "ENTRYPOINT") + instruction(serve, "CMD")
    cmd = [
        str(venv / "bin" / cmd[0]),
        *(port if a == "8000" else str(onnx_model) if a == "/models/model.onnx" else a for a in cmd[1:]),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        health = instruction(serve, "HEALTHCHECK")
        health = [str(venv / "bin" / health[0]), *(a.replace(":8000/", f":{port}/") for a in health[1:])]
        assert subprocess.run(health, timeout=30).returncode == 0
        assert "<canvas" in httpx.get(f"http://127.0.0.1:{port}/").text
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
