"""What the benchmark harnesses share: the environment and data they run on (the real VOC sample, synthetic sets,
their YOLO-format copies), measured child processes, and moving models between vocdet's and Ultralytics' formats to
score each with both metrics."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import threading
import time
from pathlib import Path

BENCH_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_VERBOSE": "0", "WANDB_MODE": "disabled"}
# The real VOC sample, relative to the working directory (the repository root, where `make bench` runs).
SAMPLE = Path(os.environ.get("VOCDET_SAMPLE", "../shared/data/voc2012-sample100"))


# ----------------------------------------------------------------------------------------------- data


def to_yolo(voc_root: Path, out: Path) -> Path:
    """Write a YOLO-format copy of a flat VOC folder (images linked, labels converted); returns its data.yaml.

    Labels follow Ultralytics' own VOC conversion: difficult objects dropped, normalised centre xywh, with VOC's
    1-based corners turned into continuous pixels (the same convention vocdet trains on).
    """
    from vocdet.core.voc import VOC_CLASSES, VOC_OFFSET, load_records, resolve_split, xyxy_to_xywhn

    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        # val_fraction=0: data without a split of its own (the VOC sample) trains and validates on all of it, on
        # both sides (vocdet's side gets data.val_fraction=0), as the published figures did.
        for r in load_records(resolve_split(voc_root, [], split, val_fraction=0), split):
            link = out / "images" / split / f"{r.id}.jpg"
            if not link.exists():
                link.symlink_to(Path(r.image).resolve())
            xywhn = xyxy_to_xywhn(r.boxes[~r.difficult] - VOC_OFFSET, r.width, r.height)
            lines = [f"{c} " + " ".join(f"{v:.6f}" for v in b) for b, c in zip(xywhn, r.labels[~r.difficult])]
            (out / "labels" / split / f"{r.id}.txt").write_text("".join(line + "\n" for line in lines))
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(VOC_CLASSES))
    yaml = out / "data.yaml"
    yaml.write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return yaml


def synthetic_set(root: Path, images: int, seed: int, imgsz: int) -> Path:
    """The race's synthetic VOC folder (80/20 train/val), made once."""
    if not root.exists():
        from vocdet.data.synth import synthesize_voc

        synthesize_voc(root, images=images, seed=seed, size=imgsz, val_fraction=0.2)
    return root


# ----------------------------------------------------------------------------------------------- processes


class PeakMemory:
    """Samples a training process: its own RSS, and the PSS summed over it and its descendants.

    Summing RSS over forked dataloader workers counts the pages they share with the parent once per process;
    PSS splits shared pages between their users, so the tree sum is the memory the run really holds. Reading PSS
    walks every page of every process (~90 ms of CPU for a training tree here), so it is sampled every
    ``pss_interval`` seconds: at 5 times a second it took an eighth of this 2-core machine from the run it timed.
    """

    def __init__(self, pid: int, interval: float = 0.2, pss_interval: float = 5.0):
        import psutil

        self.proc, self.interval, self.pss_interval = psutil.Process(pid), interval, pss_interval
        self.peak_rss = self.peak_tree_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        next_pss = 0.0
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
                if time.monotonic() >= next_pss:
                    next_pss = time.monotonic() + self.pss_interval
                    total = 0
                    for p in [self.proc, *self.proc.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):
                            total += p.memory_full_info().pss
                    self.peak_tree_pss = max(self.peak_tree_pss, total)
            except psutil.Error:
                break
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_mb": self.peak_rss / 2**20, "peak_tree_pss_mb": self.peak_tree_pss / 2**20}


def run_measured(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> tuple[dict[str, float], float]:
    """Run ``cmd`` with its output in ``log``; returns (peak memory figures in MB, wall seconds)."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})
        rss = PeakMemory(proc.pid)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise SystemExit(f"bench: {cmd[2:5]} ran past {timeout:.0f} s (log: {log})") from None
        peak = rss.stop()
    if code != 0:
        raise SystemExit(f"bench: {' '.join(cmd[:5])} ... failed with exit {code}; see {log}")
    return peak, time.perf_counter() - t0


def thread_env(s: argparse.Namespace) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)}


# ----------------------------------------------------------------------------------------------- cross-scoring


def score_with_ultralytics(weights_pt: Path, data_yaml: Path, s: argparse.Namespace) -> dict[str, float]:
    """Ultralytics' validator (conf 0.001, iou 0.7, as its trainer validates) on an Ultralytics .pt."""
    from ultralytics import YOLO

    with contextlib.redirect_stdout(io.StringIO()):
        m = YOLO(str(weights_pt)).val(
            data=str(data_yaml), imgsz=s.imgsz, batch=s.batch * 2, conf=0.001, iou=0.7, device="cpu",
            workers=0, plots=False, verbose=False, project=str(Path(weights_pt).parent), name="val", exist_ok=True,
        )  # fmt: skip
    return {"map50": float(m.box.map50), "map50_95": float(m.box.map)}


def vocdet_ckpt_to_ultralytics(ckpt_path: Path, out: Path) -> Path:
    from vocdet.core.checkpoint import load_checkpoint, network_from_checkpoint
    from vocdet.core.yolo import save_ultralytics_checkpoint

    ckpt = load_checkpoint(ckpt_path)  # the EMA weights, which vocdet validates
    return save_ultralytics_checkpoint(
        network_from_checkpoint(ckpt), ckpt["vocdet"]["class_names"], ckpt["vocdet"]["imgsz"], out
    )


def ultralytics_pt_to_vocdet(pt: Path, voc_root: Path, s: argparse.Namespace, out: Path) -> Path:
    """A vocdet checkpoint holding an Ultralytics model's weights, so vocdet's metric code can score it."""
    import torch

    from vocdet.config import load_config, to_dict
    from vocdet.core.checkpoint import checkpoint_meta
    from vocdet.core.yolo import load_pretrained
    from vocdet.training.module import DetectionModule

    cfg = load_config(
        None,
        [
            f"data.root={voc_root}",
            f"data.imgsz={s.imgsz}",
            f"data.batch_size={s.batch}",
            f"data.num_workers={s.workers}",
        ],
    )
    module = DetectionModule(to_dict(cfg))
    matched, total = load_pretrained(module.model, pt)
    if matched != total:
        raise SystemExit(f"bench: only {matched}/{total} tensors of {pt} fit yolov8n with 20 classes")
    module.ema_model.load_state_dict(module.model.state_dict())
    meta = checkpoint_meta(module.hparams["config"], module.class_names, module.cfg.data.imgsz)
    torch.save({"state_dict": module.state_dict(), "vocdet": meta}, out)
    return out


def score_with_vocdet(ckpt: Path, s: argparse.Namespace) -> dict[str, float]:
    from vocdet.training.run import evaluate

    with contextlib.redirect_stdout(io.StringIO()):
        m = evaluate(ckpt, overrides=[f"data.batch_size={s.batch}", "trainer.enable_progress_bar=false"])
    return {"map50": m["map50"], "map50_95": m["map50_95"]}


# ----------------------------------------------------------------------------------------------- micro-benchmarks
