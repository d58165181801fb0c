"""What inference loads, in a fresh interpreter: the ONNX path (``Detector.from_onnx``, ``vocdet predict --onnx``,
the service on an ONNX model, the CLI, the config) loads none of torch, torchvision, Lightning, Ultralytics or
W&B; the checkpoint path may load torch and Ultralytics, never Lightning or W&B.

The models are built here, untrained, in about a second (a checkpoint the way ``vocdet.bench.race`` writes one,
at 64 px, then ``vocdet.infer.export`` of it): no training. ``tests/serve/test_serve_venv.py`` goes further and
serves ONNX from a venv where torch is not even installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # starts python processes

HEAVY = ("torch", "torchvision", "lightning", "lightning_fabric", "pytorch_lightning", "ultralytics", "wandb")
TRAINING = ("lightning", "lightning_fabric", "pytorch_lightning", "wandb")

# Runs in a fresh `python -c`: argv = model, image, out dir, "onnx"|"checkpoint". Prints {step: [heavy top-level
# packages in sys.modules after that step]} as JSON on its last line.
PROBE = r"""
import json, sys, time
from pathlib import Path

model, image, out, kind = sys.argv[1:5]
HEAVY = set(sys.argv[5].split(","))
seen = {}

def after(step):
    seen[step] = sorted({name.partition(".")[0] for name in list(sys.modules)} & HEAVY)

import vocdet
after("import vocdet")
from vocdet.config import load_config
cfg = load_config(None, [])
after("load_config(None, [])")
import vocdet.cli
after("import vocdet.cli")
detector = vocdet.Detector.from_onnx(model) if kind == "onnx" else vocdet.Detector.from_checkpoint(model)
results = detector.predict(image)
assert len(results) == 1 and isinstance(results[0], list), results
after("Detector.predict")

from typer.testing import CliRunner
res = CliRunner().invoke(vocdet.cli.app, ["predict", f"--{kind}", model, image, "--out", out])
assert res.exit_code == 0, res.output
assert isinstance(json.loads((Path(out) / "detections.json").read_text()), list)
after("vocdet predict")

import vocdet.serve.run
from fastapi.testclient import TestClient
from vocdet.serve.app import create_app

with TestClient(create_app(cfg, {"m": model})) as client:  # the lifespan loads and warms the model up
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").text
        time.sleep(0.05)
    r = client.post("/predict", files={"file": ("image.jpg", Path(image).read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (80, 60) and isinstance(body["detections"], list), body
after("vocdet serve: load, /readyz, POST /predict")
print(json.dumps(seen))
"""


class Probe:
    """``PROBE`` started in the background on one model (the two probes run while the other model is made)."""

    def __init__(self, model: Path, image: Path, kind: str, workdir: Path):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PROBE, str(model), str(image), str(workdir / "out"), kind, ",".join(HEAVY)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workdir,
            env={**env, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip

    def result(self, timeout: float = 180) -> dict[str, list[str]]:
        """{step: heavy packages loaded after it}."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"the probe took over {timeout} s:\n{out}{err}")
        assert self.proc.returncode == 0, out + err
        return json.loads(out.strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory):
    """An untrained yolov8n checkpoint at 64 px (as ``vocdet.bench.race.ultralytics_pt_to_vocdet`` writes one) and
    its ONNX export, each probed in a fresh process on an 80x60 JPEG."""
    import torch

    from vocdet.config import load_config, to_dict
    from vocdet.core.checkpoint import checkpoint_meta
    from vocdet.infer.export import export
    from vocdet.training.module import DetectionModule

    base = tmp_path_factory.mktemp("light")
    image = base / "image.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)).save(image)
    torch.manual_seed(0)
    module = DetectionModule(to_dict(load_config(None, ["data.imgsz=64"])))
    meta = checkpoint_meta(module.hparams["config"], module.class_names, module.cfg.data.imgsz)
    ckpt = base / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "vocdet": meta}, ckpt)
    started = [Probe(ckpt, image, "checkpoint", tmp_path_factory.mktemp("probe-checkpoint"))]
    try:
        # Untrained: the parity check finds no boxes to compare (a warning) and still compares the raw outputs.
        onnx = export(ckpt, overrides=["export.parity_min_match=0", f"export.output={base / 'tiny.onnx'}"])
        started.append(Probe(onnx, image, "onnx", tmp_path_factory.mktemp("probe-onnx")))
        yield SimpleNamespace(checkpoint=started[0], onnx=started[1])
    finally:
        for p in started:
            p.stop()


STEPS = 6


def test_onnx_inference_serving_and_cli_load_no_torch(probes: SimpleNamespace) -> None:
    seen = probes.onnx.result()
    assert len(seen) == STEPS, seen
    assert {step: loaded for step, loaded in seen.items() if loaded} == {}, (
        "the ONNX path loaded training packages; find the import with "
        "`python -X importtime -c 'import vocdet.serve.app' 2>&1 | grep -E \"torch|lightning|ultralytics|wandb\"`"
    )


def test_checkpoint_inference_loads_torch_but_not_lightning_or_wandb(probes: SimpleNamespace) -> None:
    seen = probes.checkpoint.result()
    assert len(seen) == STEPS, seen
    assert "torch" in seen["Detector.predict"]  # the probe does see what is loaded
    assert {step: sorted(set(loaded) & set(TRAINING)) for step, loaded in seen.items()} == {s: [] for s in seen}
    assert seen["import vocdet"] == seen["load_config(None, [])"] == seen["import vocdet.cli"] == []
