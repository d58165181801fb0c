"""The VOC ``LightningDataModule``: splits, datasets and loaders for training and validation."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from vocdet import stopping
from vocdet.core.files import write_text
from vocdet.core.voc import class_list, has_own_split, split_records
from vocdet.data.dataset import VOCDataset, collate
from vocdet.data.workers import worker_context, worker_init
from vocdet.errors import VocdetError

log = logging.getLogger("vocdet")


class VOCDataModule(L.LightningDataModule):
    """VOC07+12 trainval -> VOC07 test by default; ``data.*`` config keys (see ``vocdet.config.DataConfig``)."""

    def __init__(
        self,
        data_cfg: Any,
        classes: list[str] | None = None,
        seed: int = 0,
        val_ids: list[str] | None = None,
        splits_dir: Path | None = None,
    ):
        """``classes``: the class list (default: ``data.classes``); ``seed``: draws the split of data without one;
        ``val_ids``: exactly these images validate (a checkpoint's drawn split); ``splits_dir``: where the ids of
        each split are written (``<run>/splits``)."""
        super().__init__()
        self.cfg = data_cfg
        self.classes = classes if classes is not None else class_list(data_cfg.classes)
        self.seed = seed
        self.val_ids = val_ids
        self.splits_dir = splits_dir
        self.drawn_split = False  # the data had no split of its own: val_fraction of it was drawn by seed
        self.train_set: VOCDataset | None = None
        self.val_set: VOCDataset | None = None
        self._capped = False

    def prepare_data(self) -> None:
        root = Path(self.cfg.root)
        if self.cfg.synthesize and not root.exists():
            import shutil

            from vocdet.data.synth import synthesize_voc

            s = self.cfg.synth
            tmp = root.with_name(root.name + ".partial")  # an interrupted run never leaves a root that looks done
            shutil.rmtree(tmp, ignore_errors=True)
            synthesize_voc(tmp, images=s.images, seed=s.seed, size=s.size, val_fraction=s.val_fraction)
            tmp.rename(root)

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def setup(self, stage: str | None = None) -> None:
        stopping.pause_at("data")
        self.drawn_split = not has_own_split(self.cfg.root)
        if stage in ("fit", None) and self.train_set is None:
            recs = split_records(self.cfg, "train", self.classes, self.seed)
            self._write_split("train", recs)
            if not recs:
                raise VocdetError(f"no usable training images under {self.cfg.root}")
            if not any(len(r.labels) for r in recs):
                raise VocdetError(
                    f"the {len(recs)} training images under {self.cfg.root} have no objects in their XML "
                    f"(of the classes {', '.join(self.classes[:5])}{', ...' if len(self.classes) > 5 else ''}); "
                    "nothing to learn: check the annotations and data.classes"
                )
            self.train_set = VOCDataset(
                recs,
                self.cfg.imgsz,
                augment=True,
                hyp=self.cfg,
                cache=self.cfg.cache,
                buffer_size=min(8 * self.per_device_batch(), 1000),  # Ultralytics' max_buffer_length
                origin=self.cfg.box_origin,
            )
        if self.val_set is None:
            if self.val_ids is not None:  # the images a checkpoint validated on
                recs = split_records(self.cfg, "all", self.classes, self.seed, ids=self.val_ids)
            else:
                recs = split_records(self.cfg, "val", self.classes, self.seed)
            self._write_split("val", recs)
            if not recs:
                raise VocdetError(f"no usable validation images under {self.cfg.root}")
            self.val_set = VOCDataset(recs, self.cfg.imgsz, augment=False, origin=self.cfg.box_origin)

    def _write_split(self, split: str, records: list[Any]) -> None:
        if self.splits_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
            write_text(self.splits_dir / f"{split}.txt", "".join(f"{r.id}\n" for r in records))

    def per_device_batch(self) -> int:
        world = self._world_size()
        if self.cfg.batch_size % world:
            raise VocdetError(
                f"data.batch_size={self.cfg.batch_size} is the global batch and must divide by the {world} devices"
            )
        return self.cfg.batch_size // world

    def _workers(self) -> int:
        """``data.num_workers``, capped at the CPUs this process may use (one info line when capped)."""
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
        workers = min(self.cfg.num_workers, cpus)
        if workers < self.cfg.num_workers and not self._capped:
            log.info("data.num_workers=%d capped to %d: the CPUs this process may use", self.cfg.num_workers, cpus)
            self._capped = True
        return workers

    def _loader(self, dataset: VOCDataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        workers = self._workers()
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            collate_fn=collate,
            # Persistent workers: training buffers stay warm, and each worker starts once per run.
            persistent_workers=workers > 0,
            drop_last=drop_last,
            worker_init_fn=worker_init,
            multiprocessing_context=worker_context() if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        bs = self.per_device_batch()
        # A final batch of one image gives BatchNorm a single value per channel (an error): drop just that one.
        per_rank = math.ceil(len(self.train_set) / self._world_size())
        return self._loader(self.train_set, bs, shuffle=True, drop_last=bs > 1 and per_rank % bs == 1)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return self._loader(self.val_set, self.per_device_batch() * 2, shuffle=False)
