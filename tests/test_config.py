"""The config tree: defaults, overlays, overrides, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError
from typer.testing import CliRunner

from vocdet.config import (
    PRECISIONS,
    TRAINER_DEFAULTS,
    TRAINER_HELP,
    Config,
    TrainConfig,
    defaults_yaml,
    from_dict,
    load_config,
    schema_help,
    to_dict,
)
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


def test_default_yaml_is_generated_from_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    committed = (REPO / "configs" / "default.yaml").read_text()
    assert committed == defaults_yaml(), (
        "configs/default.yaml is stale: vocdet config --defaults > configs/default.yaml"
    )
    assert to_dict(load_config([REPO / "configs" / "default.yaml"])) == to_dict(load_config())
    # A changed help text (of a field, or of a built-in trainer key) makes the committed file stale.
    epochs = next(f for f in dataclasses.fields(TrainConfig) if f.name == "epochs")
    monkeypatch.setattr(epochs, "metadata", MappingProxyType({"help": "changed help"}))
    assert "epochs: 100           # changed help\n" in defaults_yaml()
    assert committed != defaults_yaml()
    monkeypatch.undo()
    assert committed == defaults_yaml()
    monkeypatch.setitem(TRAINER_HELP, "devices", "changed help")
    assert committed != defaults_yaml()


def _sections(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """Every dataclass of the schema, by dotted name ("" for Config)."""
    out = [(prefix, cls)]
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        if dataclasses.is_dataclass(value):
            out += _sections(type(value), f"{prefix}{f.name}.")
    return out


def test_every_schema_key_has_one_line_help() -> None:
    for prefix, cls in _sections(Config):
        if cls is not Config:
            doc = cls.__doc__ or ""  # (dataclass writes its signature where the class has no docstring)
            assert doc.strip() and not doc.startswith(f"{cls.__name__}("), f"section {prefix[:-1]} has no docstring"
            for f in dataclasses.fields(cls):
                text = f.metadata.get("help", "")
                assert text.strip() and "\n" not in text and len(text) <= 110, f"{prefix}{f.name}: {text!r}"
    assert Config().trainer == TRAINER_DEFAULTS and set(TRAINER_HELP) == set(TRAINER_DEFAULTS)
    helps = schema_help()

    def leaves(node: dict, prefix: str = "") -> list[str]:
        return [
            k
            for key, v in node.items()
            for k in (leaves(v, f"{prefix}{key}.") if v and isinstance(v, dict) else [prefix + key])
        ]

    keys = leaves(to_dict(load_config()))
    assert "train.precision" in keys and "trainer.profiler" in keys and "data.synth.size" in keys
    assert all(helps.get(k, "").strip() for k in keys), [k for k in keys if not helps.get(k)]
    assert all(helps[section].strip() for section in to_dict(load_config()))


@pytest.mark.parametrize(
    ("key", "use"),
    [
        ("max_epochs=3", "train.epochs"),
        ("check_val_every_n_epoch=2", "train.val_every"),
        ("log_every_n_steps=1", "logging.log_every_n_steps"),
        ("precision=bf16-mixed", "train.precision"),
    ],
)
def test_trainer_keys_vocdet_derives_are_refused(key: str, use: str, tmp_path: Path) -> None:
    name = key.partition("=")[0]
    with pytest.raises(VocdetError) as err:
        load_config(None, [f"trainer.{key}"])
    assert f"trainer.{name}" in str(err.value) and f"set {use} instead" in str(err.value)
    assert "\n" not in str(err.value)
    overlay = tmp_path / "o.yaml"
    overlay.write_text(f"trainer:\n  {name}: {key.partition('=')[2]}\n")
    with pytest.raises(VocdetError, match=f"set {use} instead"):
        load_config([overlay])


@pytest.mark.parametrize("value", PRECISIONS)
def test_train_precision_values(value: str) -> None:
    assert load_config(None, [f"train.precision={value}"]).train.precision == value


def test_train_precision_unknown_is_refused() -> None:
    assert load_config().train.precision == "auto"
    with pytest.raises(VocdetError) as err:
        load_config(None, ["train.precision=fp8"])
    message = str(err.value)
    assert "train.precision" in message and "'fp8'" in message and "\n" not in message
    assert "auto, 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true, 64-true" in message


def test_precision_reaches_lightning_from_train_precision() -> None:
    pytest.importorskip("lightning")
    from vocdet.training.trainer import _precision

    cpu = {"accelerator": "cpu"}
    assert _precision(load_config(None, ["train.precision=bf16-mixed"]), dict(cpu)) == "bf16-mixed"
    assert _precision(load_config(None, ["train.precision=32-true"]), dict(cpu)) == "32-true"
    assert _precision(load_config(None, ["train.amp=true"]), dict(cpu)) == "32-true"  # auto: fp16 AMP on CUDA only


def test_config_command_prints_the_resolved_tree(tmp_path: Path) -> None:
    from vocdet.cli import app

    overlay = tmp_path / "o.yaml"
    overlay.write_text("data:\n  imgsz: 320\n")
    result = CliRunner().invoke(app, ["config", "--config", str(overlay), "train.epochs=3", "trainer.max_steps=5"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed == to_dict(load_config([overlay], ["train.epochs=3", "trainer.max_steps=5"]))
    assert (printed["train"]["epochs"], printed["data"]["imgsz"], printed["trainer"]["max_steps"]) == (3, 320, 5)
    assert "  epochs: 3             # training epochs" in result.stdout  # with the help comments
    result = CliRunner().invoke(app, ["config", "trainer.precision=16-mixed"])
    assert isinstance(result.exception, VocdetError) and "set train.precision instead" in str(result.exception)


def test_config_defaults_command_prints_the_committed_file() -> None:
    from vocdet.cli import app

    result = CliRunner().invoke(app, ["config", "--defaults"])
    assert result.exit_code == 0, result.output
    assert result.stdout == (REPO / "configs" / "default.yaml").read_text()
    result = CliRunner().invoke(app, ["config", "--defaults", "train.epochs=3"])
    assert isinstance(result.exception, VocdetError)


def test_config_command_does_not_print_the_admin_token() -> None:
    from vocdet.cli import app

    result = CliRunner().invoke(app, ["config", "serve.admin_token=s3cret-token"])
    assert result.exit_code == 0, result.output
    assert "s3cret-token" not in result.output and "admin_token: <set, not shown>" in result.output
