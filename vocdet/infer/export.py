"""``vocdet export``: a checkpoint as ONNX (optionally with NMS in the graph), TorchScript or an Ultralytics ``.pt``.

Every export is written to ``<output>.partial``, read back through :class:`~vocdet.infer.detector.Detector` and compared
with the PyTorch model on real images; only a file that passes the check is renamed into place, so a failed
export leaves nothing behind.

ONNX graph: input ``images`` float32 (B, 3, H, W) RGB in 0..1, letterboxed (grey 114 padding). Output
``output0`` (B, 4 + nc, anchors): centre xywh in input pixels, then class scores (Ultralytics' layout); or, with
``export.nms``, ``detections`` (N, 7): batch index, x1, y1, x2, y2 (input pixels), score, class id — final boxes,
at most ``predict.max_det`` per image, each box in its best class only (as Ultralytics' predictor).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
import torchvision
from omegaconf import DictConfig
from torch import nn

from vocdet.config import Config, load_config
from vocdet.core.boxes import xywh_to_xyxy
from vocdet.core.checkpoint import load_checkpoint, network_from_checkpoint
from vocdet.core.detections import match_detections
from vocdet.core.files import commit
from vocdet.core.images import find_images, read_image
from vocdet.core.voc import split_records
from vocdet.core.yolo import save_ultralytics_checkpoint
from vocdet.errors import VocdetError
from vocdet.infer.backends import TorchBackend, check_device
from vocdet.infer.detector import Detector, stack
from vocdet.infer.drift import export_profile

log = logging.getLogger("vocdet")

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript", "ultralytics": ".pt"}
RAW_ATOL = 0.05  # fp32 exports: max |difference| of raw outputs (pixels or scores); measured ~1e-4


class _GraphNMS(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (batched, per class) when exported; the same computation in eager mode."""

    @staticmethod
    def forward(ctx: Any, boxes: torch.Tensor, scores: torch.Tensor, max_det: int, iou: float, conf: float):
        out = [torch.zeros((0, 3), dtype=torch.int64)]
        for b in range(boxes.shape[0]):
            for c in range(scores.shape[1]):
                s = scores[b, c]
                idx = (s > conf).nonzero().flatten()
                keep = idx[torchvision.ops.nms(boxes[b, idx], s[idx], iou)[:max_det]]
                out.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], 1))
        return torch.cat(out)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, max_det: int, iou: float, conf: float) -> Any:
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            g.op("Constant", value_t=torch.tensor([max_det], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([conf], dtype=torch.float32)),
        )


class ExportModel(nn.Module):
    """What is traced: float 0..1 images -> raw outputs, or final (N, 7) detections with ``nms``."""

    def __init__(self, net: nn.Module, half: bool, nms: dict[str, float] | None = None):
        super().__init__()
        self.net, self.half, self.nms = net, half, nms

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raw = self.net(images.half() if self.half else images)
        raw = (raw[0] if isinstance(raw, (tuple, list)) else raw).float()
        return raw if self.nms is None else graph_nms(raw, **self.nms)


def graph_nms(raw: torch.Tensor, conf: float, iou: float, max_det: int) -> torch.Tensor:
    """Raw (B, 4 + nc, A) -> (N, 7) [batch, x1, y1, x2, y2, score, class], the predictor's NMS in exportable ops."""
    boxes = xywh_to_xyxy(raw[:, :4].transpose(1, 2))  # (B, A, 4)
    scores = raw[:, 4:]  # (B, C, A)
    best, cls = scores.max(1, keepdim=True)
    scores = torch.zeros_like(scores).scatter(1, cls, best)  # a box competes in its best class only
    sel = _GraphNMS.apply(boxes, scores, int(max_det), float(iou), float(conf))  # (N, 3): batch, class, anchor
    b, c, a = sel[:, 0], sel[:, 1], sel[:, 2]
    box, score = boxes[b, a], scores[b, c, a]
    # Keep the max_det best of each image: sort by (image, -score), then rank within the image.
    order = torch.argsort(b.to(score.dtype) * 2 - score)
    b, c, box, score = b[order], c[order], box[order], score[order]
    counts = torch.zeros(raw.shape[0], dtype=torch.int64).scatter_add(0, b, torch.ones_like(b))
    rank = torch.arange(b.shape[0]) - (counts.cumsum(0) - counts)[b]
    keep = rank < max_det
    return torch.cat([b[:, None].float(), box, score[:, None], c[:, None].float()], 1)[keep]


def ultralytics_assets() -> list[Path]:
    """bus.jpg and zidane.jpg, the real photos that ship inside the ultralytics package."""
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    return [assets / "bus.jpg", assets / "zidane.jpg"]


PARITY_VAL_IMAGES = 4


def default_parity_images(cfg: Any, class_names: list[str]) -> list[Path]:
    """Images of the model's own kind, so the boxes are compared too: ``PARITY_VAL_IMAGES`` of its validation split
    (evenly spread) when that data is at hand, and Ultralytics' two real photos."""
    from vocdet.core.drift import evenly

    try:
        val = [
            Path(r.image) for r in evenly(split_records(cfg.data, "val", class_names, cfg.run.seed), PARITY_VAL_IMAGES)
        ]
    except (VocdetError, OSError):
        val = []
    return [*val, *ultralytics_assets()]


def _writable_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VocdetError(f"cannot create output directory {directory}: {e.strerror or e}") from None
    if not os.access(directory, os.W_OK):
        raise VocdetError(f"cannot write to {directory}: permission denied (choose another --output)")


def export(
    checkpoint: str | Path,
    *,
    config_files: list[str | Path] | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Export ``checkpoint`` as ``export.format`` and check it against PyTorch; returns the written path.

    The checkpoint's own config is the base; ``config_files`` and dotted ``overrides`` (``export.*``,
    ``predict.*``) apply on top.
    """
    ckpt = load_checkpoint(checkpoint)
    base = dict(ckpt["vocdet"]["config"])
    base["trainer"] = Config().trainer
    cfg = load_config(config_files, overrides, base=base)
    e = cfg.export
    if e.int8 and e.format != "onnx":
        raise VocdetError(f"export.int8 quantizes an ONNX model; use it with --format onnx, not {e.format}")
    default = Path(checkpoint).with_suffix(SUFFIXES[e.format])
    out = Path(e.output) if e.output else default.with_name(default.stem + "-int8.onnx") if e.int8 else default
    if out.is_dir():
        raise VocdetError(
            f"--output {out} is a directory; give a file name such as {out / ('model' + SUFFIXES[e.format])}"
        )
    if e.nms and e.format != "onnx":
        raise VocdetError("export.nms puts NMS into an ONNX graph; use it with --format onnx")
    check_device(e.device, e.half)
    if e.format == "onnx" and not 7 <= e.opset <= 23:
        raise VocdetError(f"export.opset must be between 7 and 23, got {e.opset}")
    _writable_dir(out.parent)
    parity_paths = (
        find_images(e.parity_images) if e.parity_images else default_parity_images(cfg, ckpt["vocdet"]["class_names"])
    )

    net = network_from_checkpoint(ckpt).fuse()
    meta = _metadata(ckpt, cfg, out)
    stored = ckpt["vocdet"].get("drift")
    if cfg.drift.profile and stored and not e.half and float(stored.get("conf", -1)) == float(cfg.predict.conf):
        meta["drift"] = stored  # the checkpoint's own profile: the same fp32 model at the same threshold
    reference = Detector.from_loaded_checkpoint(ckpt, e.device, half=False, config=cfg, source=str(checkpoint))
    tmp = out.with_name(out.name + ".partial")
    try:
        if e.format == "onnx":
            _write_onnx(net, cfg, meta, tmp)
            candidate = Detector.from_onnx(tmp)
        elif e.format == "torchscript":
            _write_torchscript(net, cfg, meta, tmp)
            candidate = Detector.from_torchscript(tmp, device=e.device)
        else:
            save_ultralytics_checkpoint(network_from_checkpoint(ckpt), meta["class_names"], meta["imgsz"], tmp)
            # read back the way Ultralytics reads it: its pickled model
            written = torch.load(tmp, map_location="cpu", weights_only=False)["model"].float().fuse()
            candidate = reference.with_backend(TorchBackend(written, e.device, half=False))
        report = parity(reference, candidate, [read_image(p) for p in parity_paths], e.parity_conf, e.half)
        diff = "n/a (NMS in graph)" if candidate.nms_in_graph else f"{report['max_abs_diff']:.2e}"
        print(
            f"parity vs PyTorch on {len(parity_paths)} images: max |Δ| raw outputs {diff}, "
            f"boxes matched {report['matched']}/{report['total']} ({100 * report['agreement']:.1f}%)"
        )
        if report["agreement"] < e.parity_min_match or report["max_abs_diff"] > (1.0 if e.half else RAW_ATOL):
            raise VocdetError(
                f"the exported model disagrees with PyTorch (boxes matched {100 * report['agreement']:.1f}% < "
                f"{100 * e.parity_min_match:.0f}% or max |Δ| {report['max_abs_diff']:.3g}); nothing was written"
            )
        if e.int8:
            meta = _int8(tmp, candidate, cfg, meta)
        if e.format == "onnx" and cfg.drift.profile and ("drift" not in meta or meta["precision"] != "fp32"):
            profile = export_profile(ckpt, Detector.from_onnx(tmp) if e.int8 else candidate, cfg)
            if profile is not None:
                meta = {**meta, "drift": profile}
                _set_metadata(tmp, meta)
        commit(tmp, out)
        if report["total"] == 0:
            log.warning(
                "no detections above conf %.2f on the parity images; give export.parity_images where the model "
                "finds objects to compare boxes too",
                report["conf"],
            )
    except torch.cuda.OutOfMemoryError:
        raise VocdetError("out of GPU memory while exporting; use export.device=cpu") from None
    finally:
        tmp.unlink(missing_ok=True)
    print(f"exported {out} ({out.stat().st_size / 1e6:.1f} MB, {e.format})")
    from vocdet.core.artifacts import log_export

    log_export(
        Path(checkpoint), out, cfg, ckpt["vocdet"].get("wandb_id"), {k: v for k, v in meta.items() if k != "drift"}
    )
    return out


def _int8(tmp: Path, fp32: Detector, cfg: DictConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Quantize the checked fp32 export in ``tmp`` in place, if the int8 model passes the accuracy gate."""
    from vocdet.infer import quantize

    e = cfg.export
    images, source, skipped = quantize.calibration_images(cfg)
    fp32_score, n_val = quantize.score(fp32, cfg, e.int8_val_images)
    q = tmp.with_name(tmp.name + ".int8")
    try:
        kept = quantize.quantize(tmp, q, fp32, images)
        int8 = Detector.from_onnx(q)
        int8_score, _ = quantize.score(int8, cfg, e.int8_val_images)
        drop = fp32_score["map50"] - int8_score["map50"]
        print(
            f"int8 accuracy gate on {n_val} validation images: mAP50 / mAP50-95 fp32 {fp32_score['map50']:.4f} / "
            f"{fp32_score['map50_95']:.4f}, int8 {int8_score['map50']:.4f} / {int8_score['map50_95']:.4f} "
            f"(mAP50 drop {100 * drop:.2f} points)"
        )
        if drop > e.int8_max_map50_drop:
            raise VocdetError(
                f"the int8 model loses {100 * drop:.2f} mAP50 points against fp32 (limit export.int8_max_map50_drop="
                f"{e.int8_max_map50_drop}); nothing was written"
            )
        meta = {
            **meta,
            "precision": "int8",
            "int8": {
                "calibration": source,
                "calib_images": len(images),
                "calib_skipped": skipped,
                "val_images": n_val,
                "map50_fp32": fp32_score["map50"],
                "map50_int8": int8_score["map50"],
                "map50_95_fp32": fp32_score["map50_95"],
                "map50_95_int8": int8_score["map50_95"],
                "map50_drop": drop,
                "fp32_nodes": len(kept),
            },
        }
        _set_metadata(q, meta)
        q.replace(tmp)
    finally:
        q.unlink(missing_ok=True)
    return meta


def _set_metadata(path: Path, meta: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == "vocdet":
            prop.value = json.dumps(meta)
    onnx.save(proto, str(path))


def _metadata(ckpt: dict[str, Any], cfg: DictConfig, out: Path) -> dict[str, Any]:
    import ultralytics

    from vocdet import __version__

    e, p = cfg.export, cfg.predict
    config_json = json.dumps(ckpt["vocdet"]["config"], sort_keys=True)
    return {
        "format": e.format,
        "class_names": list(ckpt["vocdet"]["class_names"]),
        "imgsz": int(ckpt["vocdet"]["imgsz"]),
        "stride": 32,
        "conf": p.conf,
        "iou": p.iou,
        "max_det": p.max_det,
        "batch_size": p.batch_size,
        "nms": bool(e.nms),
        "dynamic_batch": bool(e.dynamic_batch),
        "rect": bool(e.rect) and e.format == "onnx",
        "half": bool(e.half),
        "precision": "fp16" if e.half else "fp32",
        "opset": e.opset if e.format == "onnx" else None,
        "vocdet_version": __version__,
        "ultralytics_version": ultralytics.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "config_hash": hashlib.sha256(config_json.encode()).hexdigest()[:16],
        "model": f"{cfg.model.arch}{cfg.model.variant}",
        "box_origin": int(cfg.data.box_origin),
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class ExportDFL(nn.Module):
    """Ultralytics' ``DFL`` (each box side = the softmax-weighted mean of 16 bins) in ops ONNX Runtime runs fast.

    The same numbers (max |Δ| 4e-6). ``DFL`` takes a softmax over axis 1 of a transposed (B, 16, 4, A) view and a
    1x1 conv; ONNX Runtime's CPU softmax on a non-last axis goes through internal transposes: 4.0 ms for one
    640 px image (6300 anchors), 14-18 % of the whole forward pass. Here the softmax is written out over the bins
    axis of the untransposed view and the mean taken by a multiply-sum: 0.21 ms (a softmax on the last axis after a
    transpose with a MatMul was 2.2 ms, with a multiply-sum 0.77 ms; the manual softmax with the conv 0.63 ms)."""

    def __init__(self, bins: int):
        super().__init__()
        self.register_buffer("bins", torch.arange(bins, dtype=torch.float32).view(1, 1, bins, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        y = x.view(b, 4, self.bins.shape[2], a)
        e = (y - y.amax(2, keepdim=True)).exp()
        return (e * self.bins.to(x.dtype)).sum(2) / e.sum(2)


def _traceable(net: nn.Module, cfg: DictConfig, dynamic_shape: bool) -> ExportModel:
    from ultralytics.nn.modules.block import DFL

    net = deepcopy(net).to(cfg.export.device)
    head = net.model[-1]
    if isinstance(getattr(head, "dfl", None), DFL):
        head.dfl = ExportDFL(head.dfl.c1).to(cfg.export.device)
    head.dynamic = dynamic_shape  # anchors from the traced feature shapes, not constants of the example
    head.export, head.format = True, "onnx"
    if cfg.export.half:
        net.half()
    p = cfg.predict
    nms = {"conf": p.conf, "iou": p.iou, "max_det": p.max_det} if cfg.export.nms else None
    return ExportModel(net, cfg.export.half, nms).eval()


def _write_onnx(net: nn.Module, cfg: DictConfig, meta: dict[str, Any], path: Path) -> None:
    import onnx

    e = cfg.export
    model = _traceable(net, cfg, e.rect)
    example = torch.zeros(1, 3, meta["imgsz"], meta["imgsz"], device=e.device)
    out_name = "detections" if e.nms else "output0"
    axes: dict[str, dict[int, str]] = {"images": {}, out_name: {}}
    if e.dynamic_batch:
        axes["images"][0] = "batch"
        if not e.nms:
            axes[out_name][0] = "batch"
    if e.rect:
        axes["images"].update({2: "height", 3: "width"})
        if not e.nms:
            axes[out_name][2] = "anchors"
    if e.nms:
        axes[out_name][0] = "detections"
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["images"],
            output_names=[out_name],
            opset_version=e.opset,
            dynamic_axes={k: v for k, v in axes.items() if v},
            dynamo=False,  # the TorchScript exporter keeps a dynamic batch axis (the dynamo one fixed it at 1)
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    for key, value in {"vocdet": json.dumps(meta), "names": json.dumps(meta["class_names"])}.items():
        proto.metadata_props.add(key=key, value=value)
    for key in ("imgsz", "stride", "vocdet_version", "ultralytics_version", "config_hash"):
        proto.metadata_props.add(key=key, value=str(meta[key]))
    proto.producer_name = "vocdet"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _write_torchscript(net: nn.Module, cfg: DictConfig, meta: dict[str, Any], path: Path) -> None:
    model = _traceable(net, cfg, dynamic_shape=False)
    example = torch.zeros(1, 3, meta["imgsz"], meta["imgsz"], device=cfg.export.device)
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False, strict=False)
    torch.jit.save(traced, str(path), _extra_files={"vocdet.json": json.dumps(meta)})


def parity(reference: Detector, candidate: Detector, images: list[Any], conf: float, half: bool) -> dict[str, Any]:
    """Compare two detectors on the same letterboxed images: raw outputs (max |Δ|) and final boxes.

    Boxes agree when the class is the same, IoU >= 0.99 and |Δ score| <= 0.01 (fp16: IoU >= 0.9, 0.05).
    """
    preps = [candidate.prepare(img) for img in images]  # the candidate's letterbox (square for fixed shapes)
    max_diff = 0.0
    if not candidate.nms_in_graph:
        for prep in preps:
            a, b = (torch.as_tensor(m.backend(stack([prep]))).cpu() for m in (reference, candidate))
            max_diff = max(max_diff, float((a - b).abs().max()))
    if candidate.nms_in_graph:
        conf = max(conf, candidate.conf)
    ref = [reference.infer([p], conf=conf)[0] for p in preps]
    cand = candidate.infer(preps, conf=conf)
    iou, tol = (0.9, 0.05) if half else (0.99, 0.01)
    matched = total = 0
    for a, b in zip(ref, cand):
        m, t = match_detections(a, b, iou, tol)
        matched, total = matched + m, total + t
    return {
        "max_abs_diff": max_diff,
        "matched": matched,
        "total": total,
        "agreement": matched / total if total else 1.0,
        "conf": conf,
    }


__all__ = ["export", "graph_nms", "parity"]
