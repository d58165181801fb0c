"""A trained model carries its model sections only: a ``serve.admin_token`` in the run's config file reaches
neither the checkpoints, the run's ``config.yaml`` nor the W&B offline run."""

from __future__ import annotations

from pathlib import Path

import pytest

import vocdet
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

TOKEN = "tok-9f1c2e7a5b-not-for-checkpoints"


def test_admin_token_leaves_no_trace_in_the_run(synth_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "all-in-one.yaml"
    config.write_text(f"serve:\n  admin_token: {TOKEN}\n  port: 8123\n")
    overrides = [o for o in tiny_overrides(synth_root, tmp_path / "runs", "secret") if o != "logging.wandb=false"]
    cfg = vocdet.load_config([config], [*overrides, "logging.wandb=true", "logging.wandb_mode=offline"])
    assert cfg.serve.admin_token == TOKEN
    best = vocdet.train(cfg)
    run = best.parent.parent
    files = [p for p in run.rglob("*") if p.is_file()]
    assert best in files and run / "config.yaml" in files
    assert any("wandb" in p.parts for p in files), "the W&B offline run was not written"
    leaks = [str(p.relative_to(run)) for p in files if TOKEN.encode() in p.read_bytes()]
    assert leaks == []
    from vocdet.core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(best)
    assert set(ckpt["vocdet"]["config"]) == {
        "run",
        "data",
        "model",
        "train",
        "trainer",
        "eval",
        "predict",
        "export",
        "drift",
    }
    assert "serve" not in (run / "config.yaml").read_text()
