"""``DetectionModule``: the training system around a YOLOv8 ``DetectionModel``.

It reproduces Ultralytics' trainer recipe explicitly: SGD (nesterov) with three parameter groups, weight decay
scaled to the nominal batch with gradient accumulation up to it, per-iteration warmup (bias lr falls from
``warmup_bias_lr``, the others rise from 0, momentum rises from ``warmup_momentum``), linear decay to ``lrf``,
gradient-norm clipping, and an EMA of the weights that is validated and saved. Optimisation is manual because
accumulation changes during warmup, which Lightning's automatic loop cannot express.
"""

from __future__ import annotations

import math
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import nn

from vocdet.config import from_dict, run_sections
from vocdet.core.boxes import non_max_suppression, unletterbox_boxes
from vocdet.core.checkpoint import checkpoint_meta
from vocdet.core.metrics import GroundTruth, Predictions, evaluate_detections, fitness
from vocdet.core.voc import box_offset, class_list
from vocdet.core.yolo import build_loss, build_model
from vocdet.errors import VocdetError


class NonFiniteLoss(VocdetError):
    """The loss became NaN or infinite; raised before the backward pass, so no weight update used it."""


class ModelEMA:
    """Exponential moving average of every floating-point tensor in a model's state dict (Ultralytics' ModelEMA).

    decay(updates) = decay * (1 - exp(-updates / tau)): the average follows the model closely early on.
    """

    def __init__(self, ema: nn.Module, decay: float, tau: float):
        self.ema, self.decay, self.tau = ema, decay, tau
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int) -> None:
        d = self.decay * (1 - math.exp(-updates / self.tau))
        if self._pairs is None or self._pairs[0][0].device != next(model.parameters()).device:
            msd = model.state_dict()
            pairs = [(v, msd[k]) for k, v in self.ema.state_dict().items() if v.dtype.is_floating_point]
            self._pairs = [p[0] for p in pairs], [p[1] for p in pairs]
        torch._foreach_lerp_(self._pairs[0], self._pairs[1], 1 - d)  # one fused kernel per op, not per tensor


class DetectionModule(L.LightningModule):
    """YOLOv8 + ``v8DetectionLoss`` + EMA + the Ultralytics optimisation recipe.

    Args:
        config: the resolved config tree as a plain dict (``vocdet.config.to_dict``). Its ``RUN_SECTIONS`` (the
            sections the model uses: data, model, train, eval, ...) are kept, as the only hyperparameter, so
            ``load_from_checkpoint`` rebuilds the module from the checkpoint alone.
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        config = run_sections(config)  # what a checkpoint may carry: never serve.* (its admin token) or logging.*
        self.save_hyperparameters({"config": config})
        self.cfg = from_dict(config)
        self.class_names = class_list(self.cfg.data.classes)  # `vocdet train` resolved `auto` to a list
        self.box_offset = box_offset(self.cfg.data.box_origin)
        self.model = build_model(self.cfg.model.variant, len(self.class_names), self.cfg.model.arch)
        self.ema_model: nn.Module | None = None
        if self.cfg.train.ema:
            self.ema_model = deepcopy(self.model).eval()
            self.ema_model.requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.automatic_optimization = False
        self._channels_last = False  # decided in setup(), from train.channels_last and the device
        self.criterion: Any = None
        self._ema: ModelEMA | None = None
        self._last_opt_step = -1
        self._restored = False
        self._epoch_start, self._epoch_images = time.perf_counter(), 0
        self._last_step_end = self._epoch_start
        self._val_preds: dict[str, Predictions] = {}
        self._val_gts: dict[str, GroundTruth] = {}
        self.last_metrics: dict[str, Any] | None = None
        self.last_predictions: dict[str, Predictions] = {}
        self.last_ground_truth: dict[str, GroundTruth] = {}
        self.handoff: Path | None = None  # where rank 0 writes its validation result for the parent process

    # ------------------------------------------------------------------------------------------- model
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 or float (B, 3, H, W) RGB -> raw detections (B, 4 + nc, anchors) from the EMA (eval) weights."""
        net = self.ema_model if self.ema_model is not None else self.model
        return net(self._input(img))[0]

    def _input(self, img: torch.Tensor) -> torch.Tensor:
        img = _normalise(img)
        return img.contiguous(memory_format=torch.channels_last) if self._channels_last else img

    def setup(self, stage: str) -> None:
        # train.channels_last=null: NHWC on CUDA only. On the CPU (oneDNN), NHWC trained worse models than NCHW at the
        # default recipe (2.1 mAP50 points over 5 paired seeds, README), though each op agrees with NCHW; NCHW is also
        # the layout Ultralytics trains in there.
        cl = self.cfg.train.channels_last
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        self._channels_last = cl if cl is not None else device.type == "cuda"
        if self._channels_last:  # weights in NHWC too, so convolutions need no layout conversion
            self.model.to(memory_format=torch.channels_last)
            if self.ema_model is not None:
                self.ema_model.to(memory_format=torch.channels_last)

    def _criterion(self) -> Any:
        if self.criterion is None or self.criterion.device != self.device:
            t = self.cfg.train
            self.criterion = build_loss(self.model, t.box, t.cls, t.dfl)
        return self.criterion

    # ------------------------------------------------------------------------------------------- schedule
    def _global_batch(self) -> int:
        return self.cfg.data.batch_size

    def nominal_accumulate(self) -> int:
        acc = max(round(self.cfg.train.nbs / self._global_batch()), 1)
        trainer = self._trainer  # None outside fit (tests, notebooks)
        if trainer is not None and trainer.num_training_batches not in (0, float("inf")):
            acc = min(acc, int(trainer.num_training_batches) * self.cfg.train.epochs)
        return acc

    def lr_factor(self, epoch: int) -> float:
        """Linear decay from 1 to ``lrf`` over the run (Ultralytics' ``lf``)."""
        return max(1 - epoch / self.cfg.train.epochs, 0) * (1.0 - self.cfg.train.lrf) + self.cfg.train.lrf

    def schedule(self, ni: int, epoch: int, nb: int) -> tuple[int, list[float], float]:
        """(accumulate, lr per param group [bias, weight, bn], momentum) at iteration ``ni`` of epoch ``epoch``."""
        t = self.cfg.train
        acc0 = self.nominal_accumulate()
        target = t.lr0 * self.lr_factor(epoch)
        warm = min(t.warmup_epochs, max(t.epochs - 1, 0))
        nw = round(warm * nb) if warm > 0 else 0
        if nw and ni <= nw:
            xi = [0, nw]
            acc = max(1, int(np.interp(ni, xi, [1, acc0]).round()))
            lrs = [float(np.interp(ni, xi, [start, target])) for start in (t.warmup_bias_lr, 0.0, 0.0)]
            return acc, lrs, float(np.interp(ni, xi, [t.warmup_momentum, t.momentum]))
        return acc0, [target] * 3, t.momentum

    def configure_optimizers(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        bias, decay, no_decay = [], [], []
        norm_types = tuple(v for k, v in nn.__dict__.items() if "Norm" in k)
        for module in self.model.modules():
            for pname, p in module.named_parameters(recurse=False):
                if "bias" in pname:
                    bias.append(p)
                elif isinstance(module, norm_types):
                    no_decay.append(p)
                else:
                    decay.append(p)
        wd = t.weight_decay * self._global_batch() * self.nominal_accumulate() / t.nbs
        common = {"lr": t.lr0, "momentum": t.momentum, "nesterov": t.nesterov}
        return torch.optim.SGD(
            [
                {"params": bias, "weight_decay": 0.0, "param_group": "bias", **common},
                {"params": decay, "weight_decay": wd, "param_group": "weight", **common},
                {"params": no_decay, "weight_decay": 0.0, "param_group": "bn", **common},
            ],
            **common,
        )

    # ------------------------------------------------------------------------------------------- training
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Ultralytics' v8 detection loss of the training network on a collated batch.

        Returns the scalar sum (box + cls + dfl, each times the batch size, as Ultralytics back-propagates it)
        and the detached per-image components.
        """
        preds = self.model(self._input(batch["img"]))
        # The loss in fp32 under any autocast: Ultralytics decodes boxes in the predictions' dtype, and bf16's 8-bit
        # mantissa would put box edges several pixels off (~4 px at the far side of a 640 image).
        preds = apply_to_collection(preds, torch.Tensor, lambda t: t.float() if t.is_floating_point() else t)
        with torch.autocast(self.device.type, enabled=False):
            loss, items = self._criterion()(preds, batch)
        return loss.sum(), items

    def on_fit_start(self) -> None:
        if self.ema_model is not None:
            self._ema = ModelEMA(self.ema_model, self.cfg.train.ema_decay, self.cfg.train.ema_tau)
        if not self._restored:  # a resumed run keeps the restored accumulation position
            self._last_opt_step = -1
        self._restored = False

    def on_train_epoch_start(self) -> None:
        self._epoch_start, self._epoch_images = time.perf_counter(), 0
        d = self.cfg.data
        dm = getattr(self.trainer, "datamodule", None)
        if d.close_mosaic and self.current_epoch >= self.cfg.train.epochs - d.close_mosaic and dm is not None:
            dm.train_set.close_mosaic()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        nb = int(self.trainer.num_training_batches)
        ni = batch_idx + nb * self.current_epoch
        accumulate, lrs, momentum = self.schedule(ni, self.current_epoch, nb)
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"], group["momentum"] = lr, momentum

        loss, items = self.compute_loss(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"non-finite loss ({loss.item()}) at epoch {self.current_epoch}, batch {batch_idx} "
                f"(global step {self.global_step}): training stopped before the weights took it"
            )
        # Ultralytics' loss is a per-batch sum; DDP averages gradients, so scale back to a sum over all ranks.
        loss = loss * self.trainer.world_size
        self.manual_backward(loss)

        if ni - self._last_opt_step >= accumulate:
            opt.step()  # clips in on_before_optimizer_step
            opt.zero_grad(set_to_none=True)
            self._last_opt_step = ni
            if self._ema is not None:
                self.ema_updates += 1
                self._ema.update(self.model, int(self.ema_updates))

        bs = batch["img"].shape[0]
        self._epoch_images += bs
        self._last_step_end = time.perf_counter()
        vals = {f"train/{k}": v for k, v in items.items()}
        self.log_dict(vals, on_step=True, on_epoch=True, batch_size=bs, prog_bar=False)
        self.log("train/loss", sum(items.values()), on_step=True, on_epoch=True, batch_size=bs, prog_bar=True)
        self.log_dict({f"lr/{g['param_group']}": g["lr"] for g in opt.param_groups}, on_step=True, batch_size=bs)
        return loss.detach()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this inside opt.step(), after 16-mixed's GradScaler has unscaled the gradients: clipping
        # before opt.step() would clip the scaled gradients (65536x), i.e. crush every update on fp16 GPUs.
        if self.cfg.train.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.train.grad_clip, gradient_clip_algorithm="norm")

    def on_train_epoch_end(self) -> None:
        # Throughput of this rank's training loop (data wait included, the validation that follows excluded).
        seconds = self._last_step_end - self._epoch_start
        self.log("train/img_per_s", self._epoch_images / max(seconds, 1e-9), prog_bar=True)
        self.log("train/epoch_seconds", seconds)

    # ------------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_preds, self._val_gts = {}, {}

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        e = self.cfg.eval
        net = self.ema_model if self.ema_model is not None else self.model
        net.eval()
        raw = net(self._input(batch["img"]))[0]
        dets = non_max_suppression(raw, e.conf, e.iou, e.max_det, multi_label=e.multi_label)
        for det, image_id, (h, w), ratio, pad, gt in zip(
            dets, batch["ids"], batch["orig_size"], batch["ratio"], batch["pad"], batch["gt"]
        ):
            boxes = unletterbox_boxes(det[:, :4].cpu().numpy(), ratio, pad, w, h) + self.box_offset
            self._val_preds[image_id] = Predictions(
                boxes=boxes, scores=det[:, 4].cpu().numpy(), labels=det[:, 5].cpu().numpy().astype(np.int64)
            )
            self._val_gts[image_id] = GroundTruth(boxes=gt[0], labels=gt[1], difficult=gt[2])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        preds, gts = self._val_preds, self._val_gts
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # The distributed sampler pads ranks with repeated images: merging by image id counts each once.
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (preds, gts))
            preds, gts = {}, {}
            for p, g in gathered:
                preds.update(p)
                gts.update(g)
        result = evaluate_detections(gts, preds, self.class_names, curves=True)
        result["image_ids"] = sorted(gts)
        self.last_metrics, self.last_predictions, self.last_ground_truth = result, preds, gts
        if self.handoff is not None and self.global_rank == 0:  # ranks in child processes (ddp_notebook)
            import pickle

            with self.handoff.open("wb") as f:
                pickle.dump((result, preds, gts), f)
        self._val_preds, self._val_gts = {}, {}
        # Every rank holds the same numbers, so no reduction is needed (and none would be exact).
        self.log_dict(
            {
                "val/map50": result["map50"],
                "val/map50_95": result["map50_95"],
                "val/voc07_map50": result["voc07_map50"],
                "fitness": fitness(result),
            },
            prog_bar=True,
            sync_dist=False,
        )

    # ------------------------------------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vocdet"] = checkpoint_meta(self.hparams["config"], self.class_names, self.cfg.data.imgsz)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "drawn_split", False) and datamodule.val_set is not None:
            checkpoint["vocdet"]["val_ids"] = sorted(r.id for r in datamodule.val_set.records)  # for vocdet eval
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.trainer.loggers if self._trainer is not None else []:
            if isinstance(logger, WandbLogger):  # --resume continues the same W&B run
                checkpoint["vocdet"]["wandb_id"] = logger.version
        checkpoint["vocdet_state"] = {"last_opt_step": self._last_opt_step}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._last_opt_step = int(checkpoint.get("vocdet_state", {}).get("last_opt_step", -1))
        self._restored = True


def _normalise(img: torch.Tensor) -> torch.Tensor:
    """uint8 0-255 -> float 0-1 on the device (the copy to the device stays 4x smaller as uint8)."""
    return img.float().div_(255) if img.dtype == torch.uint8 else img
