"""vocdet's training against Ultralytics' trainer, piece by piece.

- Trajectory equivalence: the same initial weights and the same collated batches through vocdet's
  ``DetectionModule`` (inside a real Lightning ``Trainer``) and through Ultralytics' trainer logic (``BaseTrainer``'s
  optimizer, scheduler, warmup, accumulation and ``optimizer_step``, ``ModelEMA``) end in the same weights, EMA,
  momentum buffers, learning rates and accumulation position.
- Augmentation statistics: over the same images and many draws, vocdet's training pipeline and Ultralytics'
  ``YOLODataset`` produce the same distributions of boxes and pixels (a two-sample test that passes for Ultralytics
  against itself and fails for a deliberately broken pipeline).
"""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from vocdet.bench.common import to_yolo
from vocdet.config import load_config, to_dict
from vocdet.core.voc import load_records, resolve_split
from vocdet.data.dataset import VOCDataset
from vocdet.training.module import DetectionModule

# ----------------------------------------------------------------------------------------------- trajectory

NB, EPOCHS, BATCH, NBS, IMGSZ = 6, 3, 2, 8, 64  # accumulate 4; 18 iterations; warmup ends at iteration 6


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 5, (), generator=g))
        idx = torch.randint(0, BATCH, (k,), generator=g).sort().values
        xy = torch.rand(k, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(k, 2, generator=g) * 0.3 + 0.1
        out.append(
            {
                "img": torch.randint(0, 256, (BATCH, 3, IMGSZ, IMGSZ), dtype=torch.uint8, generator=g),
                "batch_idx": idx.float(),
                "cls": torch.randint(0, 20, (k, 1), generator=g).float(),
                "bboxes": torch.cat([xy, wh], 1),
            }
        )
    return out


_TRAINING_ONLY = dict(
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    limit_val_batches=0,
    num_sanity_val_steps=0,
)


def _training_only(epochs: int) -> L.Trainer:
    """A real Lightning Trainer on the CPU that trains and does nothing else (no validation, logs or checkpoints)."""
    return L.Trainer(max_epochs=epochs, **_TRAINING_ONLY)


def _vocdet_run(batches: list[dict[str, Any]], init: dict[str, torch.Tensor]) -> DetectionModule:
    cfg = load_config(
        None,
        [
            f"data.batch_size={BATCH}",
            f"train.nbs={NBS}",
            f"train.epochs={EPOCHS}",
            "train.warmup_epochs=1",
        ],
    )
    module = DetectionModule(to_dict(cfg))
    module.model.load_state_dict(init)
    module.ema_model.load_state_dict(init)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    _training_only(EPOCHS).fit(module, train_dataloaders=loader)
    return module


def _ultralytics_run(batches: list[dict[str, Any]], init: dict[str, torch.Tensor]) -> SimpleNamespace:
    """Ultralytics' training loop (``BaseTrainer._do_train``'s warmup/accumulation lines), on its own pieces."""
    from ultralytics.cfg import get_cfg
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.utils.torch_utils import ModelEMA

    from vocdet.core.yolo import build_model

    args = get_cfg(overrides={"nbs": NBS, "batch": BATCH, "epochs": EPOCHS, "warmup_epochs": 1, "optimizer": "SGD"})
    model = build_model("n", 20)
    model.load_state_dict(init)
    model.args = args
    t = SimpleNamespace(args=args, epochs=EPOCHS, batch_size=BATCH, device=torch.device("cpu"), model=model)
    t.accumulate = max(round(args.nbs / t.batch_size), 1)
    decay = args.weight_decay * t.batch_size * t.accumulate / args.nbs
    with contextlib.redirect_stdout(io.StringIO()):
        t.optimizer = BaseTrainer.build_optimizer(t, model, "SGD", args.lr0, args.momentum, decay, 1)
    BaseTrainer._setup_scheduler(t)
    t.scheduler.last_epoch = -1
    t.scaler = torch.amp.GradScaler("cpu", enabled=False)
    t.ema = ModelEMA(model)
    nw, last_opt_step, acc0 = BaseTrainer._get_warmup_iterations(t, NB), -1, t.accumulate
    model.train()
    for epoch in range(EPOCHS):
        t.scheduler.step()
        for i, batch in enumerate(batches):
            ni = i + NB * epoch
            if nw and ni <= nw:
                xi = [0, nw]
                t.accumulate = max(1, int(np.interp(ni, xi, [1, acc0]).round()))
                for x in t.optimizer.param_groups:
                    start = args.warmup_bias_lr if x.get("param_group") == "bias" else 0.0
                    x["lr"] = float(np.interp(ni, xi, [start, x["initial_lr"] * t.lf(epoch)]))
                    x["momentum"] = float(np.interp(ni, xi, [args.warmup_momentum, args.momentum]))
            loss, _ = model({**batch, "img": batch["img"].float() / 255})  # DetectionTrainer.preprocess_batch
            t.scaler.scale(loss.sum()).backward()
            if ni - last_opt_step >= t.accumulate:
                BaseTrainer.optimizer_step(t)
                last_opt_step = ni
    t.last_opt_step = last_opt_step
    return t


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_trajectory_equals_ultralytics_trainer_with_accumulation_and_warmup() -> None:
    """K optimiser steps at nbs 8 / batch 2 (accumulate ramping 1 -> 4 through warmup, then 4) end in the same
    state on both sides: weights, BatchNorm statistics, EMA, SGD momentum buffers, lr per group, last step."""
    from vocdet.core.yolo import build_model

    torch.manual_seed(0)
    init = build_model("n", 20).state_dict()
    batches = _batches(NB)
    ours = _vocdet_run(batches, init)
    theirs = _ultralytics_run(batches, init)

    assert ours._channels_last is False  # the default on the CPU: NCHW, as Ultralytics trains there
    assert ours._last_opt_step == theirs.last_opt_step
    assert int(ours.ema_updates) == theirs.ema.updates >= 5  # several steps, warmup crossed
    opt_ours, opt_theirs = ours.trainer.optimizers[0], theirs.optimizer
    their_groups = {g["param_group"]: g for g in opt_theirs.param_groups}
    for ours_group in opt_ours.param_groups:
        their_group = their_groups[ours_group["param_group"]]
        assert len(ours_group["params"]) == len(their_group["params"])
        for p, q in zip(ours_group["params"], their_group["params"]):
            a, b = opt_ours.state.get(p, {}), opt_theirs.state.get(q, {})
            assert a.keys() == b.keys()  # the frozen DFL projection has no momentum on either side
            if a:
                assert _close(a["momentum_buffer"], b["momentum_buffer"])
        assert ours_group["lr"] == pytest.approx(their_group["lr"], rel=1e-9)
        assert ours_group["momentum"] == pytest.approx(their_group["momentum"], rel=1e-9)
        assert ours_group["weight_decay"] == pytest.approx(their_group["weight_decay"], rel=1e-9)
    init_changed = 0
    for (k, a), b in zip(ours.model.state_dict().items(), theirs.model.state_dict().values()):
        assert _close(a, b), f"weights differ at {k}: max |d| {(a.float() - b.float()).abs().max():.3g}"
        init_changed += not torch.equal(a, init[k])
    assert init_changed > 100  # training moved the weights
    for (k, a), b in zip(ours.ema_model.state_dict().items(), theirs.ema.ema.state_dict().values()):
        assert _close(a, b), f"EMA differs at {k}"


# ----------------------------------------------------------------------------------------------- augmentation


def _ks_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov test, asymptotic p-value (Stephens' small-sample correction)."""
    a, b = np.sort(a), np.sort(b)
    both = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, both, side="right") / len(a) - np.searchsorted(b, both, side="right") / len(b)).max()
    en = np.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (en + 0.12 + 0.11 / en) * d
    p = 2 * sum((-1) ** (k - 1) * np.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return float(min(max(p, 0.0), 1.0))


def _statistics(items: list[tuple[torch.Tensor, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per image: box count, pixel mean/std, share of padding; per box: normalised centre, width, height, area."""
    boxes = np.concatenate([b for _, b in items]).reshape(-1, 4)
    pix = np.array(
        [[x.float().mean().item(), x.float().std().item(), (x == 114).all(0).float().mean().item()] for x, _ in items]
    )
    return {
        "boxes per image": np.array([len(b) for _, b in items], float),
        "box centre x": boxes[:, 0],
        "box centre y": boxes[:, 1],
        "box width": boxes[:, 2],
        "box height": boxes[:, 3],
        "box area": boxes[:, 2] * boxes[:, 3],
        "pixel mean": pix[:, 0],
        "pixel std": pix[:, 1],
        "padding share": pix[:, 2],
    }


def _draw(dataset: Any, get: Any, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` training samples in shuffled epochs (as a loader draws them), seeded like a dataloader worker."""
    random.seed(seed)
    np.random.seed(seed)
    order = np.random.default_rng(seed)
    items: list[tuple[torch.Tensor, np.ndarray]] = []
    while len(items) < n:
        items += [get(dataset[int(i)]) for i in order.permutation(len(dataset))]
    return _statistics(items[:n])


AUG_SIZE, AUG_DRAWS = 64, 800


@pytest.fixture(scope="module")
def pipelines(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Factories of (dataset, item -> (CHW uint8 image, normalised xywh boxes)) for both libraries."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from vocdet.core.voc import xyxy_to_xywhn

    yaml = to_yolo(synth_root, tmp_path_factory.mktemp("yolo"))
    records = load_records(resolve_split(synth_root, [], "train"), "train")

    def vocdet(**hyp: Any) -> tuple[Any, Any]:
        cfg = load_config(None, [f"data.imgsz={AUG_SIZE}", *(f"data.{k}={v}" for k, v in hyp.items())])
        ds = VOCDataset(records, AUG_SIZE, augment=True, hyp=cfg.data, buffer_size=64)
        return ds, lambda it: (it["img"], xyxy_to_xywhn(it["boxes"].reshape(-1, 4), AUG_SIZE, AUG_SIZE))

    def ultralytics(**hyp: Any) -> tuple[Any, Any]:
        with contextlib.redirect_stdout(io.StringIO()):
            data = check_det_dataset(str(yaml))
            args = get_cfg(overrides={"imgsz": AUG_SIZE, "cache": False, "close_mosaic": 0, **hyp})
            ds = build_yolo_dataset(args, data["train"], 8, data, mode="train")
        return ds, lambda it: (it["img"], it["bboxes"].numpy().reshape(-1, 4))

    return SimpleNamespace(vocdet=vocdet, ultralytics=ultralytics)


def _differing(a: dict[str, np.ndarray], b: dict[str, np.ndarray], alpha: float = 0.001) -> dict[str, float]:
    """The statistics whose distributions differ at level ``alpha`` (KS p-values)."""
    p = {k: _ks_pvalue(a[k], b[k]) for k in a}
    return {k: v for k, v in p.items() if v < alpha}


@pytest.mark.slow
@pytest.mark.parametrize("mosaic", [1.0, 0.0], ids=["mosaic", "close_mosaic"])
def test_augmentation_statistics_match_ultralytics(pipelines: Any, mosaic: float) -> None:
    """Ultralytics against itself (another seed) passes, vocdet against Ultralytics passes, and a deliberately
    broken vocdet pipeline (half the zoom range: scale 0.25 instead of 0.5) fails on box sizes."""
    reference = _draw(*pipelines.ultralytics(mosaic=mosaic), AUG_DRAWS, seed=0)
    assert not _differing(_draw(*pipelines.ultralytics(mosaic=mosaic), AUG_DRAWS, seed=1), reference)
    ours = _draw(*pipelines.vocdet(mosaic=mosaic), AUG_DRAWS, seed=0)
    assert not _differing(ours, reference)
    # The share of boxes the affine's box_candidates filter drops shows in boxes per image: equal means.
    assert ours["boxes per image"].mean() == pytest.approx(reference["boxes per image"].mean(), rel=0.05)
    broken = _differing(_draw(*pipelines.vocdet(mosaic=mosaic, scale=0.25), AUG_DRAWS, seed=0), reference)
    assert {"box width", "box height", "box area"} <= broken.keys()


# ----------------------------------------------------------------------------------------------- close_mosaic


@pytest.mark.slow
class _RecordingDataset(VOCDataset):
    """Each training item says whether mosaic was on when a worker made it (module level: workers start from a fork
    server and receive the dataset and the collate function pickled, by reference)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**super().__getitem__(index), "mosaic": bool(self.mosaic_on.item())}


def _recording_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    from vocdet.data.dataset import collate

    return {**collate(items), "mosaic": [it.get("mosaic") for it in items]}


def test_close_mosaic_reaches_persistent_workers_at_the_right_epoch(
    synth_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ultralytics rebuilds its loader at epoch ``epochs - close_mosaic``; vocdet flips a shared flag that the
    persistent workers read. Every sample of the closing epoch, prefetched ones included, must see it."""
    import vocdet.data.datamodule as data

    monkeypatch.setattr(data, "VOCDataset", _RecordingDataset)
    monkeypatch.setattr(data, "collate", _recording_collate)
    epochs, close = 4, 2
    cfg = load_config(
        None,
        [
            f"data.root={synth_root}",
            "data.imgsz=64",
            "data.batch_size=4",
            "data.num_workers=2",
            f"data.close_mosaic={close}",
            f"train.epochs={epochs}",
            "train.nbs=4",
        ],
    )
    seen: dict[int, list[bool]] = {}

    class Recording(DetectionModule):
        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            seen.setdefault(self.current_epoch, []).extend(batch["mosaic"])
            return super().training_step(batch, batch_idx)

    _training_only(epochs).fit(Recording(to_dict(cfg)), datamodule=data.VOCDataModule(cfg.data))
    assert sorted(seen) == list(range(epochs)) and all(len(v) == 24 for v in seen.values())  # 24 train images
    assert all(all(seen[e]) for e in range(epochs - close))
    assert not any(any(seen[e]) for e in range(epochs - close, epochs))


@pytest.mark.slow
def test_gradient_clipping_sees_unscaled_fp16_gradients() -> None:
    """Under 16-mixed, Lightning's GradScaler multiplies the loss by 65536; the clip must see true gradients."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    seen: list[float] = []

    class Recording(DetectionModule):
        def clip_gradients(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
            super().clip_gradients(optimizer, *args, **kwargs)

    def run(plugins: list[Any]) -> float:
        seen.clear()
        torch.manual_seed(0)
        cfg = load_config(None, [f"data.batch_size={BATCH}", f"train.nbs={BATCH}", "train.epochs=1"])
        trainer = L.Trainer(**{**_TRAINING_ONLY, "max_epochs": 1, "max_steps": 1, "plugins": plugins})
        trainer.fit(
            Recording(to_dict(cfg)), train_dataloaders=torch.utils.data.DataLoader(_batches(1), batch_size=None)
        )
        return seen[0]

    fp32 = run([])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    fp16 = run([MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert scaler.get_scale() >= 2.0**15  # the loss really was scaled (halved at most once, on an overflow)
    assert fp16 == pytest.approx(fp32, rel=0.05)  # the clip saw unscaled gradients (scaled: ~65536x larger)
