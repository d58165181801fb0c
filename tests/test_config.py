"""The config tree: defaults, overlays, overrides, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from vocdet.config import Config, from_dict, load_config, to_dict
from vocdet.errors import VocdetError

REPO = Path(__file__).resolve().parents[1]


def test_default_yaml_is_the_schema_defaults() -> None:
    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    assert to_dict(load_config([REPO / "configs" / "default.yaml"])) == schema


def test_reference_recipe_values() -> None:
    cfg = load_config()
    assert (cfg.data.imgsz, cfg.data.batch_size, cfg.train.epochs, cfg.model.variant) == (640, 64, 100, "n")
    assert cfg.data.train_sets == ["2007/trainval", "2012/trainval"] and cfg.data.val_sets == ["2007/test"]
    t = cfg.train
    assert (t.lr0, t.lrf, t.momentum, t.weight_decay, t.nbs, t.warmup_epochs) == (0.01, 0.01, 0.937, 5e-4, 64, 3.0)
    assert (t.box, t.cls, t.dfl, t.ema_decay, t.ema_tau, t.grad_clip) == (7.5, 0.5, 1.5, 0.9999, 2000.0, 10.0)
    assert (cfg.eval.conf, cfg.eval.iou, cfg.eval.max_det) == (0.001, 0.7, 300)


def test_overlays_then_overrides_in_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("data:\n  imgsz: 320\n  batch_size: 8\n")
    b.write_text("data:\n  imgsz: 416\n")
    cfg = load_config([a, b], ["data.batch_size=4", "trainer.max_steps=3", "model.weights=null"])
    assert (cfg.data.imgsz, cfg.data.batch_size, cfg.trainer.max_steps) == (416, 4, 3)
    assert cfg.model.weights is None
    with pytest.raises(ReadonlyConfigError):  # nobody mutates the tree behind the CLI's back
        cfg.data.imgsz = 64


def test_quickstart_overlay_loads() -> None:
    cfg = load_config([REPO / "configs" / "quickstart.yaml"])
    assert cfg.data.synthesize and cfg.trainer.accelerator == "cpu"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.no_such_key=1"], "unknown config key 'data.no_such_key'"),
        (["data.imgsz=abc"], "invalid value for 'data.imgsz'"),
        (["data.imgsz=100"], "multiple of 32"),
        (["model.variant=q"], "model.variant must be one of"),
        (["trainer.max_epoch=3"], "did you mean: trainer.max_epochs"),
        (["trainer.callbacks=[]"], "set by vocdet itself"),
        (["imgsz"], "is not KEY=VALUE"),
        (["model.weights=/nonexistent.pt"], "model.weights file not found"),
    ],
)
def test_bad_input_is_one_line_error(overrides: list[str], message: str) -> None:
    with pytest.raises(VocdetError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_suggests_close_keys() -> None:
    with pytest.raises(VocdetError, match=r"did you mean: data\.imgsz"):
        load_config(None, ["data.imgsize=320"])


def test_missing_and_broken_config_files(tmp_path: Path) -> None:
    with pytest.raises(VocdetError, match="config file not found"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(VocdetError, match="cannot parse config file"):
        load_config([bad])
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(VocdetError, match=r"unknown config key 'trian'.*did you mean: train"):
        load_config([typo])


def test_checkpoint_round_trip() -> None:
    cfg = load_config(None, ["data.imgsz=96", "run.name=x"])
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)
    based = load_config(None, ["eval.conf=0.5"], base=to_dict(cfg))
    assert (based.data.imgsz, based.run.name, based.eval.conf) == (96, "x", 0.5)
