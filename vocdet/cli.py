"""The ``vocdet`` command line: thin Typer wrappers over the library functions.

Every subcommand reads the same config tree: ``--config FILE`` (repeatable) then dotted ``KEY=VALUE`` overrides.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from vocdet import stopping
from vocdet.errors import VocdetError

app = typer.Typer(
    name="vocdet",
    help="Train, evaluate, export and run YOLOv8 detectors on PASCAL VOC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    help="Get VOC data: download the official archives or synthesize a demo set.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[
    Optional[list[Path]],  # noqa: UP045 - Typer needs Optional here
    typer.Option("--config", "-c", help="YAML overlay on the defaults (repeatable, applied in order)."),
]
OverridesArg = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Argument(help="Dotted config overrides, e.g. data.imgsz=320 train.epochs=10.", show_default=False),
]


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def train(
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
    gpus: Annotated[Optional[int], typer.Option(help="Train on N CUDA GPUs with DDP.")] = None,  # noqa: UP045
    nodes: Annotated[Optional[int], typer.Option(help="Number of nodes (multi-node DDP).")] = None,  # noqa: UP045
    accelerator: Annotated[Optional[str], typer.Option(help="cpu|gpu|cuda|mps|auto.")] = None,  # noqa: UP045
    devices: Annotated[Optional[int], typer.Option(help="Devices per node (DDP when > 1).")] = None,  # noqa: UP045
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run's last.ckpt (train.resume=true).")] = False,
    sync_batchnorm: Annotated[
        bool, typer.Option("--sync-batchnorm", help="BatchNorm statistics over all DDP ranks.")
    ] = False,
) -> None:
    """Train YOLOv8 on VOC, then evaluate the best checkpoint (writes <run.dir>/<run.name>/metrics.json)."""
    from vocdet.config import load_config
    from vocdet.training.run import train as run_train

    extra = list(overrides or [])
    if gpus is not None:
        import torch

        if gpus < 1:
            raise VocdetError(f"--gpus must be >= 1, got {gpus}")
        if not torch.cuda.is_available():
            raise VocdetError(
                f"--gpus {gpus} needs CUDA, which is not available here; "
                f"for DDP on the CPU use --accelerator cpu --devices {gpus}"
            )
        if gpus > torch.cuda.device_count():
            raise VocdetError(f"--gpus {gpus} but only {torch.cuda.device_count()} CUDA devices are visible")
        extra += ["trainer.accelerator=gpu", f"trainer.devices={gpus}"]
        if gpus > 1:
            extra.append("trainer.strategy=ddp")
    if accelerator is not None:
        extra.append(f"trainer.accelerator={accelerator}")
    if devices is not None:
        extra.append(f"trainer.devices={devices}")
        if devices > 1:
            extra.append("trainer.strategy=ddp")
    if nodes is not None:
        extra += [f"trainer.num_nodes={nodes}", "trainer.strategy=ddp"]
    if resume:
        extra.append("train.resume=true")
    if sync_batchnorm:
        extra.append("trainer.sync_batchnorm=true")
    cfg = load_config(config, extra)
    stopping.STATE["timeout_s"] = float(cfg.train.stop_timeout_s)
    stopping.pause_at("config")
    best = run_train(cfg)
    typer.echo(f"best checkpoint: {best}")


@app.command("eval")
def eval_(
    checkpoint: Annotated[Optional[Path], typer.Option(help="vocdet checkpoint to evaluate.")] = None,  # noqa: UP045
    detections: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Score this detections JSON instead of a model (needs data.root)."),
    ] = None,
    output: Annotated[Optional[Path], typer.Option(help="Write the metrics JSON here.")] = None,  # noqa: UP045
    predictions: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Write the model's detections JSON here."),
    ] = None,
    plots: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="Folder for PR curves, confusion matrix, per-class AP and a prediction grid "
            "(default: plots/ beside --output, else runs/eval/plots; logging.plots=false: none)."
        ),
    ] = None,
    summary: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Write just mAP50, mAP50-95, VOC07 mAP50 and the image count here (DVC metrics)."),
    ] = None,
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Evaluate a checkpoint (or a detections file) on the validation split: COCO mAP50, mAP50-95, VOC07 mAP50."""
    from vocdet.training.run import evaluate

    evaluate(
        checkpoint,
        config_files=config,
        overrides=overrides,
        detections=detections,
        output=output,
        predictions=predictions,
        plots=plots or (output.parent / "plots" if output else Path("runs/eval/plots")),
        summary=summary,
    )


@app.command()
def predict(
    sources: Annotated[list[str], typer.Argument(help="Image files, globs or directories.", show_default=False)],
    checkpoint: Annotated[Optional[Path], typer.Option(help="vocdet checkpoint (.ckpt).")] = None,  # noqa: UP045
    onnx: Annotated[Optional[Path], typer.Option(help="ONNX model from `vocdet export`.")] = None,  # noqa: UP045
    out: Annotated[Path, typer.Option(help="Output folder: annotated images + detections.json.")] = Path(
        "runs/predict"
    ),
    conf: Annotated[Optional[float], typer.Option(min=0, max=1, help="Score threshold.")] = None,  # noqa: UP045
    iou: Annotated[Optional[float], typer.Option(min=0, max=1, help="NMS IoU threshold.")] = None,  # noqa: UP045
    max_det: Annotated[Optional[int], typer.Option(min=1, help="Detections per image.")] = None,  # noqa: UP045
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per forward pass.")] = None,  # noqa: UP045
    device: Annotated[Optional[str], typer.Option(help="cpu|cuda|cuda:N (checkpoints).")] = None,  # noqa: UP045
    save_images: Annotated[bool, typer.Option(help="Write annotated copies of the images.")] = True,
    threads: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="ONNX Runtime intra-op threads (default: predict.threads)."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Detect objects in images; writes OUT/detections.json (the `vocdet eval --detections` format) and
    annotated images. Thresholds default to the model's predict.* settings; ONNX Runtime's session options
    (predict.threads, predict.ort_*) come from --config."""
    from vocdet.config import load_config
    from vocdet.infer.predict import predict_files

    if (checkpoint is None) == (onnx is None):
        raise VocdetError("give exactly one of --checkpoint or --onnx")
    session = load_config(config, [f"predict.threads={threads}"] if threads else []).predict
    failed = predict_files(
        sources,
        checkpoint=checkpoint,
        onnx=onnx,
        out=out,
        conf=conf,
        iou=iou,
        max_det=max_det,
        batch_size=batch_size,
        device=device,
        save_images=save_images,
        session=session,
    )
    if failed:
        raise typer.Exit(1)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Option(help="vocdet checkpoint to export.")],
    format: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--format", "-f", help="onnx|torchscript|ultralytics (default: export.format)."),
    ] = None,
    output: Annotated[Optional[Path], typer.Option(help="Output file.")] = None,  # noqa: UP045
    dynamic_batch: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option("--dynamic-batch/--fixed-batch", help="ONNX: any batch size."),
    ] = None,
    nms: Annotated[Optional[bool], typer.Option("--nms/--no-nms", help="ONNX: NMS in the graph.")] = None,  # noqa: UP045
    half: Annotated[Optional[bool], typer.Option("--half/--full", help="fp16 weights (CUDA).")] = None,  # noqa: UP045
    int8: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option("--int8/--no-int8", help="ONNX: int8 quantization, kept if it passes the mAP gate."),
    ] = None,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset.")] = None,  # noqa: UP045
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Export a checkpoint to ONNX, TorchScript or an Ultralytics .pt, then check it against PyTorch on real
    images (a mismatch is an error and leaves no file)."""
    from vocdet.infer.export import export as run_export

    extra = list(overrides or [])
    for key, value in (
        ("format", format),
        ("output", output),
        ("dynamic_batch", dynamic_batch),
        ("nms", nms),
        ("half", half),
        ("int8", int8),
        ("opset", opset),
    ):
        if value is not None:
            extra.append(f"export.{key}={str(value).lower() if isinstance(value, bool) else value}")
    run_export(checkpoint, config_files=config, overrides=extra)


@app.command()
def serve(
    checkpoint: Annotated[Optional[Path], typer.Option(help="Serve this checkpoint.")] = None,  # noqa: UP045
    onnx: Annotated[Optional[Path], typer.Option(help="Serve this ONNX export.")] = None,  # noqa: UP045
    name: Annotated[str, typer.Option(help="Name of the --checkpoint/--onnx model.")] = "default",
    host: Annotated[Optional[str], typer.Option(help="Bind address (serve.host).")] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help="Port (serve.port).")] = None,  # noqa: UP045
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Serve models over HTTP: POST /predict, /predict/{model}, /predict/batch; GET /models, /healthz, /readyz,
    /metrics, and a web page at /."""
    from vocdet.config import load_config
    from vocdet.serve.run import serve as run_serve

    extra = list(overrides or [])
    if host is not None:
        extra.append(f"serve.host={host}")
    if port is not None:
        extra.append(f"serve.port={port}")
    cfg = load_config(config, extra)
    if checkpoint is not None and onnx is not None:
        raise VocdetError("give one of --checkpoint or --onnx (list more models in serve.models)")
    model = checkpoint or onnx
    models = {name: model} if model is not None else {}
    if not models and not cfg.serve.models:
        raise VocdetError("no model to serve: give --onnx M or --checkpoint C, or list serve.models in a config")
    run_serve(cfg, models)


@app.command()
def tune(
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Hyper-parameter search with Optuna over config keys (tune.space.KEY=uniform:A:B|loguniform:A:B|int:A:B|
    choice:A:B), pruning bad trials per epoch; each trial is a run in <run.dir>/<tune.study>/trial-<n>. Continues a
    stopped study; processes sharing tune.storage share the study. Writes best.yaml, trials.csv and plots."""
    from vocdet.training.tune import tune as run_tune

    run_tune(config, overrides)


@app.command()
def robustness(
    checkpoint: Annotated[Optional[Path], typer.Option(help="vocdet checkpoint to test.")] = None,  # noqa: UP045
    onnx: Annotated[Optional[Path], typer.Option(help="Or an export (needs data.root=...).")] = None,  # noqa: UP045
    corruptions: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Comma-separated: brightness,dark,contrast,blur,noise,jpeg,saturate (robustness.corruptions)."
        ),
    ] = None,
    severities: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="'1-5' or '1,3,5' (robustness.severities)."),
    ] = None,
    output: Annotated[Optional[Path], typer.Option(help="Report folder (default: the run's plots/).")] = None,  # noqa: UP045
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Score a model on the validation split under ImageNet-C-style corruptions at each severity: mAP50, mAP50-95
    and the drift alarm vocdet serve would raise; writes robustness.json/.csv/.png and logs them to W&B."""
    from vocdet.infer.robustness import check_corruptions, format_rows, parse_severities, run_robustness

    if (checkpoint is None) == (onnx is None):
        raise VocdetError("give one of --checkpoint or --onnx")
    extra = list(overrides or [])
    if corruptions is not None:
        names = check_corruptions([c.strip() for c in corruptions.split(",") if c.strip()])
        extra.append(f"robustness.corruptions=[{','.join(names)}]")
    if severities is not None:
        extra.append(f"robustness.severities=[{','.join(map(str, parse_severities(severities)))}]")
    if output is not None:
        extra.append(f"robustness.output={output}")
    rows, paths = run_robustness(checkpoint or onnx, config_files=config, overrides=extra)
    print(format_rows(rows))
    print(f"wrote {', '.join(str(p) for p in paths)}")


@app.command("config")
def config_(
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
    defaults: Annotated[
        bool,
        typer.Option("--defaults", help="Print the built-in defaults with every key's help (configs/default.yaml)."),
    ] = False,
) -> None:
    """Print the config tree a command would get (defaults < --config files < overrides) as commented YAML;
    --defaults prints the schema's defaults, from which configs/default.yaml is generated."""
    from vocdet.config import defaults_yaml, load_config, to_dict, to_yaml

    if defaults:
        if config or overrides:
            raise VocdetError("--defaults prints the built-in defaults; drop --config and the KEY=VALUE overrides")
        typer.echo(defaults_yaml(), nl=False)
        return
    tree = to_dict(load_config(config, overrides))
    if tree["serve"].get("admin_token"):  # a printed config ends up in logs and bug reports
        tree["serve"]["admin_token"] = "<set, not shown>"
    typer.echo(to_yaml(tree), nl=False)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    images: Annotated[int, typer.Option(min=1, help="Number of images.")] = 600,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    size: Annotated[int, typer.Option(min=32, help="Longest image side in pixels.")] = 256,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of images in val.txt.")] = 0.2,
    classes: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Comma-separated class names to draw (default: the 20 VOC names)."),
    ] = None,
    layout: Annotated[
        str, typer.Option(help="flat (Annotations/, JPEGImages/), roboflow (train/, valid/) or folder.")
    ] = "flat",
    box_origin: Annotated[int, typer.Option(min=0, max=1, help="1: VOC's 1-based corners; 0: 0-based.")] = 1,
) -> None:
    """Generate a synthetic VOC-format dataset (JPEG + XML, split as the layout does it)."""
    from vocdet.data.synth import synthesize_voc

    names = [n.strip() for n in classes.split(",")] if classes else None
    synthesize_voc(
        out,
        images=images,
        seed=seed,
        size=size,
        val_fraction=val_fraction,
        names=names,
        layout=layout,
        box_origin=box_origin,
    )
    typer.echo(f"wrote {images} images to {out}")


@data_app.command("download")
def data_download(
    root: Annotated[Path, typer.Option(help="Folder to download into; VOC ends up in ROOT/VOCdevkit.")],
    keep_archives: Annotated[bool, typer.Option(help="Keep the .tar files after extraction.")] = False,
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Download VOC2007 trainval+test and VOC2012 trainval (checksummed, resumable) and extract them."""
    from vocdet.config import load_config
    from vocdet.data.download import VOC_ARCHIVES, Archive, download_voc

    cfg = load_config(config, overrides)
    archives = tuple(Archive(a["path"], a["md5"]) for a in cfg.download.archives) or VOC_ARCHIVES
    devkit = download_voc(root, base_url=cfg.download.base_url, archives=archives, keep_archives=keep_archives)
    typer.echo(f"VOC is ready in {devkit} (train with data.root={devkit})")


def main() -> None:
    """Console entry point: a ``VocdetError`` is one line on stderr and exit code 2, never a traceback; SIGTERM and
    SIGINT at any moment are one line and exit code 143 / 130 (``vocdet.stopping``)."""
    stopping.install()  # first: as PID 1 in a container, a SIGTERM before this would be ignored
    stopping.STATE["training"] = sys.argv[1:2] == ["train"]
    try:
        stopping.pause_at("startup")
        _setup_logging()
        app()
    except VocdetError as e:
        _say(f"{e.label}: {e}")
        sys.exit(e.exit_code)
    except stopping.Interrupted as e:
        _say(f"stopped: {stopping.message(e.signum)}")
        sys.exit(stopping.exit_code(e.signum))
    except KeyboardInterrupt:  # SIGINT before the handler existed
        _say("stopped: SIGINT")
        sys.exit(130)


def _say(line: str) -> None:
    """One line on stderr; under DDP every rank gets here and only rank 0 speaks."""
    lightning = sys.modules.get("lightning.pytorch.utilities")
    if lightning is None or lightning.rank_zero_only.rank == 0:
        typer.echo(line, err=True)
