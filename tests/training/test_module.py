"""DetectionModule against Ultralytics: loss contract, optimiser groups, warmup schedule, EMA, NMS."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from vocdet.config import load_config, to_dict
from vocdet.core.boxes import non_max_suppression
from vocdet.core.voc import load_records, resolve_split
from vocdet.core.yolo import build_model, load_pretrained
from vocdet.data.dataset import VOCDataset, collate
from vocdet.training.module import DetectionModule, ModelEMA


@pytest.fixture(scope="module")
def batch(synth_root: Path) -> dict:
    cfg = load_config(None, [f"data.root={synth_root}", "data.imgsz=128"])
    records = load_records(resolve_split(synth_root, [], "train"), "train")
    ds = VOCDataset(records, 128, augment=True, hyp=cfg.data)
    random.seed(0)
    np.random.seed(0)
    return collate([ds[i] for i in range(4)])


def _module(*overrides: str) -> DetectionModule:
    torch.manual_seed(0)
    return DetectionModule(to_dict(load_config(None, list(overrides))))


@pytest.mark.parametrize("arch", ["yolov8", "yolo11"])
def test_loss_equals_ultralytics_detection_model_loss(batch: dict, arch: str) -> None:
    module = _module(f"model.arch={arch}")
    assert type(module.model.model[-1]).__name__ == "Detect" and len(module.model.model) == (
        23 if arch == "yolov8" else 24
    )
    module.model.train()
    ours, items = module.compute_loss(batch)
    # Ultralytics' own path: DetectionModel.loss -> init_criterion -> v8DetectionLoss, on float images in [0, 1].
    module.model.criterion = None
    theirs, their_items = module.model.loss({**batch, "img": batch["img"].float() / 255})
    assert ours.item() == pytest.approx(theirs.sum().item(), rel=1e-6)
    assert ours.item() > 0
    for k in ("box_loss", "cls_loss", "dfl_loss"):
        assert items[k].item() == pytest.approx(their_items[k].item(), rel=1e-6)
    # The recipe's gains are the ones the criterion applies.
    assert (module.model.args.box, module.model.args.cls, module.model.args.dfl) == (7.5, 0.5, 1.5)


def test_loss_is_computed_in_fp32_under_bf16_autocast(batch: dict) -> None:
    """Lightning's bf16-mixed wraps the training step in autocast; the loss still sees fp32 predictions."""
    module = _module()
    module.model.train()
    seen = []
    criterion = module._criterion()

    class Recording:
        device = criterion.device

        def __call__(self, preds: dict, b: dict) -> tuple:
            seen.append(preds)
            return criterion(preds, b)

    module.criterion = Recording()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = module.compute_loss(batch)
        raw = module.model(module._input(batch["img"]))
    assert raw["boxes"].dtype == torch.bfloat16  # the network itself did run in bf16
    assert seen[0]["boxes"].dtype == seen[0]["scores"].dtype == torch.float32
    assert all(f.dtype == torch.float32 for f in seen[0]["feats"])
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() > 0
    expected, _ = criterion({k: v.float() if k != "feats" else [f.float() for f in v] for k, v in raw.items()}, batch)
    assert loss.item() == pytest.approx(expected.sum().item(), rel=1e-5)


def test_loss_gains_come_from_config(batch: dict) -> None:
    a, _ = _module().compute_loss(batch)
    b_module = _module("train.box=0", "train.cls=0", "train.dfl=0")
    b, _ = b_module.compute_loss(batch)
    assert a.item() > 0 and b.item() == 0


def test_optimizer_groups_and_weight_decay_scaling() -> None:
    module = _module("data.batch_size=16")
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    groups = {g["param_group"]: g for g in opt.param_groups}
    n_bias = sum(1 for n, _ in module.model.named_parameters() if "bias" in n)
    n_bn = sum(1 for m in module.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert len(groups["bias"]["params"]) == n_bias
    assert len(groups["bn"]["params"]) == n_bn
    assert len(groups["weight"]["params"]) == sum(1 for _ in module.model.parameters()) - n_bias - n_bn
    assert groups["bias"]["weight_decay"] == groups["bn"]["weight_decay"] == 0
    # batch 16 -> accumulate 4 to the nominal 64 -> decay scaled by 16 * 4 / 64 = 1
    assert module.nominal_accumulate() == 4
    assert groups["weight"]["weight_decay"] == pytest.approx(5e-4)
    assert all(g["nesterov"] and g["momentum"] == 0.937 for g in opt.param_groups)
    odd = _module("data.batch_size=24")  # round(64 / 24) = 3 -> 24 * 3 / 64
    assert odd.configure_optimizers().param_groups[1]["weight_decay"] == pytest.approx(5e-4 * 72 / 64)


def test_warmup_and_linear_decay_schedule() -> None:
    m = _module("data.batch_size=16", "train.epochs=10", "train.warmup_epochs=2")
    nb = 50  # batches per epoch -> 100 warmup iterations
    acc, lrs, mom = m.schedule(0, 0, nb)
    assert acc == 1 and lrs == [0.1, 0.0, 0.0] and mom == pytest.approx(0.8)
    acc, lrs, mom = m.schedule(50, 1, nb)  # half-way: lf(1) = 0.9 * 0.99 + 0.01
    target = 0.01 * ((1 - 1 / 10) * 0.99 + 0.01)
    assert lrs[1] == pytest.approx(target / 2) and lrs[0] == pytest.approx((0.1 + target) / 2)
    assert mom == pytest.approx((0.8 + 0.937) / 2) and acc == round(1 + 3 * 0.5)
    acc, lrs, mom = m.schedule(100, 2, nb)  # end of warmup lands exactly on the targets
    assert acc == 4 and mom == pytest.approx(0.937)
    assert lrs == pytest.approx([0.01 * ((1 - 2 / 10) * 0.99 + 0.01)] * 3)
    acc, lrs, _ = m.schedule(9 * nb + 3, 9, nb)
    assert lrs == pytest.approx([0.01 * (0.1 * 0.99 + 0.01)] * 3) and acc == 4
    assert m.lr_factor(10) == pytest.approx(0.01)


def test_ema_follows_ultralytics_formula() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema_net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema_net.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in ema_net.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema = ModelEMA(ema_net, decay=0.9999, tau=2000)
    ema.update(model, updates=10)
    d = 0.9999 * (1 - math.exp(-10 / 2000))
    for k, v in ema_net.state_dict().items():
        if v.dtype.is_floating_point:
            expected = before[k] * d + model.state_dict()[k] * (1 - d)
            torch.testing.assert_close(v, expected)
    assert int(ema_net.state_dict()["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"])


def test_nms_matches_reference_torchvision() -> None:
    torch.manual_seed(0)
    nc, anchors = 20, 500
    raw = torch.rand(2, 4 + nc, anchors)
    raw[:, :2] *= 200  # centres
    raw[:, 2:4] = raw[:, 2:4] * 60 + 4  # sizes
    raw[:, 4:] = raw[:, 4:] ** 4  # mostly low scores
    out = non_max_suppression(raw, conf=0.25, iou=0.5, max_det=50)
    for b in range(2):
        p = raw[b].T
        xy, wh = p[:, :2], p[:, 2:4] / 2
        boxes = torch.cat((xy - wh, xy + wh), 1)
        score, cls = p[:, 4:].max(1)
        keep = score > 0.25
        ref = torchvision.ops.batched_nms(boxes[keep], score[keep], cls[keep], 0.5)[:50]
        torch.testing.assert_close(out[b][:, :4], boxes[keep][ref])
        torch.testing.assert_close(out[b][:, 4], score[keep][ref])
        assert out[b].shape[1] == 6 and len(out[b]) <= 50
    multi = non_max_suppression(raw, conf=0.25, iou=0.5, max_det=300, multi_label=True)
    assert sum(len(m) for m in multi) > sum(len(o) for o in out)  # one box may score for several classes


def test_pretrained_transfer_is_shape_matched(tmp_path: Path) -> None:
    # An 80-class "COCO" checkpoint in Ultralytics' format: everything but the class logits transfers.
    coco = build_model("n", num_classes=80)
    torch.save({"model": coco, "ema": None}, tmp_path / "coco.pt")
    voc = build_model("n", num_classes=20)
    fresh = {k: v.clone() for k, v in voc.state_dict().items()}
    matched, total = load_pretrained(voc, tmp_path / "coco.pt")
    src, dst = coco.state_dict(), voc.state_dict()
    same_shape = [k for k in dst if dst[k].shape == src[k].shape]
    assert matched == len(same_shape) and 0 < matched < total
    assert all(torch.equal(dst[k], src[k]) for k in same_shape)
    other = [k for k in dst if k not in same_shape]
    assert other and all(k.startswith("model.22.cv3") for k in other)  # only the class branch differs
    assert all(torch.equal(dst[k], fresh[k]) for k in other)


def test_pretrained_class_head_is_kept_only_when_its_names_match(tmp_path: Path) -> None:
    from vocdet.core.yolo import save_ultralytics_checkpoint

    src = build_model("n", num_classes=3, arch="yolo11")
    save_ultralytics_checkpoint(src, ["cat", "dog", "fox"], 128, tmp_path / "src.pt")
    head = [k for k in src.state_dict() if re.fullmatch(r"model\.23\.cv3\.\d\.2\.(weight|bias)", k)]
    assert len(head) == 6  # weight and bias of the 3 class-logit convs
    for names, kept in ((["cat", "dog", "fox"], True), (["cat", "dog", "owl"], False)):
        dst = build_model("n", num_classes=3, arch="yolo11")
        fresh = {k: v.clone() for k, v in dst.state_dict().items()}
        matched, total = load_pretrained(dst, tmp_path / "src.pt", names)
        assert matched == total - (0 if kept else len(head))
        for k, v in dst.state_dict().items():
            expected = src.state_dict()[k] if kept or k not in head else fresh[k]
            assert torch.equal(v, expected), k


def test_channels_last_is_off_on_the_cpu_unless_asked_for() -> None:
    """train.channels_last=null (the default): NHWC on CUDA only; NHWC trained worse models on the CPU."""
    default, forced = _module(), _module("train.channels_last=true")
    default.setup("fit")
    forced.setup("fit")
    assert default._channels_last is False
    assert default.model.model[0].conv.weight.is_contiguous()
    assert forced._channels_last is True
    assert forced.model.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
