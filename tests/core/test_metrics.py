"""Tests of vocdet.core.metrics against independent references.

* pycocotools' COCOeval (bbox), with VOC ``difficult`` objects given as ``iscrowd=1``;
* a transcription of the VOC devkit's ``voc_eval`` (py-faster-rcnn version, ``use_07_metric=True``);
* hand-worked cases with known answers.

The real-data tests use the 100 genuine VOC images in ``../shared/data/voc2012-sample100`` (beside the repo).
"""

from __future__ import annotations

import contextlib
import io
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vocdet.core.metrics import GroundTruth, Predictions, evaluate_detections, fitness, format_table

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip
SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "voc2012-sample100"
# Same IoU arithmetic, same sorts, same summation order: the numbers should be bit-identical. Comparing with
# == rather than a tolerance also catches one-ulp differences in IoU that would flip a threshold elsewhere.


# ----------------------------------------------------------------------------------------------- data helpers


def load_sample() -> tuple[dict[str, GroundTruth], dict[str, Predictions]]:
    """Ground truth from the original VOC XML and the sample detections that came with the data."""
    if not SAMPLE.is_dir():
        pytest.skip(f"real VOC sample not found at {SAMPLE}")
    gts: dict[str, GroundTruth] = {}
    for xml_path in sorted((SAMPLE / "Annotations").glob("*.xml")):
        root = ET.parse(xml_path).getroot()
        boxes, labels, difficult = [], [], []
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            boxes.append([float(bb.find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax")])
            labels.append(VOC_CLASSES.index(obj.find("name").text.strip()))
            flag = obj.find("difficult")
            difficult.append(flag is not None and int(flag.text) == 1)
        gts[xml_path.stem] = GroundTruth(
            np.array(boxes, dtype=float).reshape(-1, 4),
            np.array(labels, dtype=int),
            np.array(difficult, bool),
        )
    preds: dict[str, Predictions] = {}
    for txt in sorted((SAMPLE / "extras" / "dets_abs_xyx2y2_classid_conf").glob("*.txt")):
        rows = [line.split() for line in txt.read_text().splitlines() if line.strip()]
        arr = np.array(rows, dtype=float).reshape(-1, 6)
        preds[txt.stem] = Predictions(arr[:, 2:6], arr[:, 1], arr[:, 0].astype(int))
    return gts, preds


def random_case(
    seed: int, n_images: int = 300, n_classes: int = 6
) -> tuple[dict[str, GroundTruth], dict[str, Predictions], list[str]]:
    """Random boxes with the awkward cases: ties, difficult objects, crowded images, empty images,
    images without predictions, predictions of classes without ground truth, >100 dets per image/class."""
    rng = np.random.default_rng(seed)
    names = [f"class{k}" for k in range(n_classes)]
    gt_classes = n_classes - 1  # the last class never has ground truth
    gts: dict[str, GroundTruth] = {}
    preds: dict[str, Predictions] = {}
    for i in range(n_images):
        image_id = f"img_{rng.integers(0, 10**6):06d}_{i}"
        n_gt = int(rng.choice([0, 1, 2, 3, 5, 8], p=[0.1, 0.3, 0.25, 0.15, 0.1, 0.1]))
        xy = rng.uniform(0, 400, size=(n_gt, 2))
        wh = rng.uniform(4, 150, size=(n_gt, 2))
        if rng.random() < 0.5:  # VOC-like integer pixel coordinates half of the time
            xy, wh = np.round(xy), np.round(wh)
        g_boxes = np.concatenate([xy, xy + wh], axis=1)
        g_labels = rng.integers(0, gt_classes, size=n_gt)
        if n_gt and rng.random() < 0.2:  # clusters of same-class objects that overlap each other
            g_labels[:] = rng.integers(0, gt_classes)
            base_xy, base_wh = g_boxes[:1, :2], g_boxes[:1, 2:] - g_boxes[:1, :2]
            cxy = base_xy + rng.normal(0, 8, size=(n_gt, 2))
            g_boxes = np.concatenate([cxy, cxy + base_wh * rng.uniform(0.8, 1.2, size=(n_gt, 2))], axis=1)
            if rng.random() < 0.5:  # identical or mirrored objects: equal IoUs to several of them
                g_boxes = np.round(g_boxes)
                g_boxes[1::2] = g_boxes[0]
        g_diff = rng.random(n_gt) < 0.25
        gts[image_id] = GroundTruth(g_boxes, g_labels, g_diff)
        if rng.random() < 0.1:
            continue  # no predictions for this image
        # Predictions: jittered copies of the ground truth (several per object), plus random false positives.
        copies = rng.integers(0, 4, size=n_gt)
        src = np.repeat(np.arange(n_gt), copies)
        jitter = rng.normal(0, rng.choice([2.0, 10.0, 30.0]), size=(len(src), 4))
        d_boxes = [g_boxes[src] + jitter]
        d_labels = [np.where(rng.random(len(src)) < 0.9, g_labels[src], rng.integers(0, n_classes, len(src)))]
        n_fp = int(rng.integers(0, 6))
        fxy = rng.uniform(0, 400, size=(n_fp, 2))
        d_boxes.append(np.concatenate([fxy, fxy + rng.uniform(4, 150, size=(n_fp, 2))], axis=1))
        d_labels.append(rng.integers(0, n_classes, size=n_fp))
        if rng.random() < 0.03 and n_gt:  # more than 100 detections of one class in one image
            many = 130
            d_boxes.append(g_boxes[:1] + rng.normal(0, 15, size=(many, 4)))
            d_labels.append(np.full(many, g_labels[0]))
        boxes = np.concatenate(d_boxes)
        labels = np.concatenate(d_labels)
        if rng.random() < 0.3:  # integer detections: exact IoU ties between objects become common
            boxes = np.round(boxes)
        # Coarse scores give plenty of exact ties, within images and across images.
        scores = np.round(rng.uniform(0.05, 1.0, size=len(labels)), 1)
        preds[image_id] = Predictions(boxes, scores, labels)
    return gts, preds, names


# ---------------------------------------------------------------------------------------------- pycocotools


def coco_reference(
    gts: dict[str, GroundTruth], preds: dict[str, Predictions], class_names: list[str]
) -> tuple[float, float, list[float | None], list[float | None]]:
    """(mAP50-95, mAP50, per-class AP50, per-class AP50-95) from pycocotools with difficult -> iscrowd=1."""
    image_ids = sorted(gts)
    int_id = {image_id: n + 1 for n, image_id in enumerate(image_ids)}
    annotations = []
    for image_id in image_ids:
        gt = gts[image_id]
        for box, label, diff in zip(gt.boxes, gt.labels, gt.difficult):
            x1, y1, x2, y2 = (float(v) for v in box)
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int_id[image_id],
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": int(bool(diff)),
                }
            )
    results = []
    for image_id in image_ids:
        if image_id not in preds:
            continue
        p = preds[image_id]
        for box, score, label in zip(p.boxes, p.scores, p.labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {
                    "image_id": int_id[image_id],
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": [{"id": int_id[i]} for i in image_ids],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(class_names)],
            "annotations": annotations,
        }
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"][:, :, :, 0, 2]  # area "all", maxDets 100
    ap50, ap50_95 = [], []
    for k in range(len(class_names)):
        pk = precision[:, :, k]
        ap50.append(float(np.mean(pk[0][pk[0] > -1])) if (pk[0] > -1).any() else None)
        ap50_95.append(float(np.mean(pk[pk > -1])) if (pk > -1).any() else None)
    return float(evaluator.stats[0]), float(evaluator.stats[1]), ap50, ap50_95


# -------------------------------------------------------------------------------- VOC devkit (transcription)


def voc_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """voc_ap(rec, prec, use_07_metric=True) from the devkit's voc_eval.py."""
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        if np.sum(rec >= t) == 0:
            p = 0
        else:
            p = np.max(prec[rec >= t])
        ap = ap + p / 11.0
    return ap


def voc_eval(
    gts: dict[str, GroundTruth], preds: dict[str, Predictions], classname: int, ovthresh: float = 0.5
) -> float | None:
    """voc_eval() from py-faster-rcnn's voc_eval.py, reading the same data from memory instead of files.

    The detection "file" of a class lists images in sorted-id order, each image's detections in array order.
    """
    imagenames = sorted(gts)
    class_recs = {}
    npos = 0
    for imagename in imagenames:
        gt = gts[imagename]
        R = [i for i in range(len(gt.labels)) if gt.labels[i] == classname]
        bbox = np.array([gt.boxes[i] for i in R])
        difficult = np.array([gt.difficult[i] for i in R]).astype(bool)
        det = [False] * len(R)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}
    if npos == 0:
        return None

    splitlines = []
    for imagename in imagenames:
        if imagename not in preds:
            continue
        p = preds[imagename]
        for box, score, label in zip(p.boxes, p.scores, p.labels):
            if label == classname:
                splitlines.append([imagename, float(score), *(float(v) for v in box)])
    image_ids = [x[0] for x in splitlines]
    confidence = np.array([float(x[1]) for x in splitlines])
    BB = np.array([[float(z) for z in x[2:]] for x in splitlines])

    sorted_ind = np.argsort(-confidence)
    if len(splitlines):
        BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]

    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = (
                (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0)
                - inters
            )
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return float(voc_ap(rec, prec))


def voc_reference(
    gts: dict[str, GroundTruth], preds: dict[str, Predictions], class_names: list[str]
) -> tuple[float, list[float | None]]:
    aps = [voc_eval(gts, preds, k) for k in range(len(class_names))]
    valid = [ap for ap in aps if ap is not None]
    return float(np.mean(valid)) if valid else 0.0, aps


# ---------------------------------------------------------------------------------------------------- checks


def assert_matches_references(
    gts: dict[str, GroundTruth], preds: dict[str, Predictions], class_names: list[str]
) -> dict:
    result = evaluate_detections(gts, preds, class_names)
    map50_95, map50, ap50, ap50_95 = coco_reference(gts, preds, class_names)
    voc_map, voc_aps = voc_reference(gts, preds, class_names)
    assert result["map50"] == map50
    assert result["map50_95"] == map50_95
    assert result["voc07_map50"] == voc_map
    for k, name in enumerate(class_names):
        got = result["per_class"][name]
        for key, want in (("ap50", ap50[k]), ("ap50_95", ap50_95[k]), ("voc07_ap50", voc_aps[k])):
            assert got[key] == want, (name, key, got[key], want)
    return result


def test_real_voc_sample_matches_pycocotools_and_devkit() -> None:
    gts, preds = load_sample()
    result = assert_matches_references(gts, preds, VOC_CLASSES)
    assert result["num_images"] == 100
    assert sum(c["num_gt"] for c in result["per_class"].values()) == 235
    assert sum(c["num_difficult"] for c in result["per_class"].values()) == 38
    n_pred = sum(len(p.scores) for p in preds.values())
    assert sum(c["num_pred"] for c in result["per_class"].values()) == n_pred
    assert result["per_class"]["person"]["num_gt"] + result["per_class"]["person"]["num_difficult"] == 91
    # A sanity bound so that the comparison above is not between two zeros.
    assert 0.2 < result["map50"] <= 1.0


def test_real_voc_sample_means_bit_identical_to_pycocotools() -> None:
    gts, preds = load_sample()
    result = evaluate_detections(gts, preds, VOC_CLASSES)
    map50_95, map50, _, _ = coco_reference(gts, preds, VOC_CLASSES)
    assert result["map50"] == map50
    assert result["map50_95"] == map50_95


def test_real_voc_sample_shuffled_dict_order_gives_same_result() -> None:
    gts, preds = load_sample()
    rng = np.random.default_rng(0)
    keys = list(gts)
    rng.shuffle(keys)
    shuffled_gts = {k: gts[k] for k in keys}
    shuffled_preds = {k: preds[k] for k in keys if k in preds}
    assert evaluate_detections(shuffled_gts, shuffled_preds, VOC_CLASSES) == evaluate_detections(
        gts, preds, VOC_CLASSES
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_cases_match_pycocotools_and_devkit(seed: int) -> None:
    gts, preds, names = random_case(seed)
    result = assert_matches_references(gts, preds, names)
    assert result["per_class"][names[-1]]["ap50"] is None  # predictions but no ground truth
    assert result["per_class"][names[-1]]["num_pred"] > 0


def test_random_case_with_only_difficult_objects_in_a_class() -> None:
    gts, preds, names = random_case(7, n_images=120, n_classes=4)
    # Make every object of class 0 difficult: pycocotools then leaves the class at -1, the devkit has npos=0.
    gts = {k: g._replace(difficult=g.difficult | (g.labels == 0)) for k, g in gts.items()}
    result = assert_matches_references(gts, preds, names)
    assert result["per_class"][names[0]]["ap50"] is None
    assert result["per_class"][names[0]]["voc07_ap50"] is None
    assert result["per_class"][names[0]]["num_gt"] == 0
    assert result["per_class"][names[0]]["num_difficult"] > 0


# ---------------------------------------------------------------------------------------- hand-worked cases


def single(boxes: list[list[float]], labels: list[int], difficult: list[bool] | None = None) -> GroundTruth:
    return GroundTruth(
        np.array(boxes, dtype=float).reshape(-1, 4),
        np.array(labels, dtype=int),
        np.array(difficult if difficult is not None else [False] * len(labels), dtype=bool),
    )


def dets(boxes: list[list[float]], scores: list[float], labels: list[int]) -> Predictions:
    return Predictions(np.array(boxes, float).reshape(-1, 4), np.array(scores, float), np.array(labels, int))


def test_perfect_predictions_score_one() -> None:
    gts = {
        "a": single([[10, 10, 50, 60], [100, 100, 200, 220]], [0, 1]),
        "b": single([[5, 5, 40, 40]], [0]),
    }
    preds = {k: dets(g.boxes.tolist(), [0.9] * len(g.labels), g.labels.tolist()) for k, g in gts.items()}
    result = evaluate_detections(gts, preds, ["cat", "dog"])
    # pycocotools' precision is tp / (tp + fp + eps), so "1" can be 1 - 2.2e-16.
    for key in ("map50", "map50_95", "voc07_map50"):
        assert result[key] == pytest.approx(1.0, abs=1e-12)
    assert result["per_class"]["cat"]["num_gt"] == 2
    assert result["per_class"]["dog"]["num_pred"] == 1
    assert fitness(result) == pytest.approx(1.0, abs=1e-12)


def test_no_predictions_score_zero() -> None:
    gts = {"a": single([[10, 10, 50, 60]], [0]), "b": single([], [])}
    result = evaluate_detections(gts, {}, ["cat", "dog"])
    assert result["map50"] == 0.0 and result["map50_95"] == 0.0 and result["voc07_map50"] == 0.0
    assert result["per_class"]["cat"]["ap50"] == 0.0
    assert result["per_class"]["cat"]["voc07_ap50"] == 0.0
    assert result["per_class"]["dog"]["ap50"] is None
    assert result["num_images"] == 2


def test_no_ground_truth_at_all_gives_zero_means() -> None:
    gts = {"a": single([], [])}
    preds = {"a": dets([[0, 0, 10, 10]], [0.5], [0])}
    result = evaluate_detections(gts, preds, ["cat"])
    assert (result["map50"], result["map50_95"], result["voc07_map50"]) == (0.0, 0.0, 0.0)
    assert result["per_class"]["cat"] == {
        "ap50": None,
        "ap50_95": None,
        "voc07_ap50": None,
        "num_gt": 0,
        "num_difficult": 0,
        "num_pred": 1,
    }


def test_one_tp_then_one_fp_known_values() -> None:
    # Two objects; the best detection hits one of them at IoU 0.72 (COCO) / 73/101 (VOC, +1 pixels),
    # the second detection is a false positive with a lower score. The other object is missed.
    gts = {"a": single([[0, 0, 100, 100], [300, 300, 400, 400]], [0, 0])}
    preds = {"a": dets([[0, 0, 100, 72], [150, 150, 250, 250]], [0.9, 0.8], [0, 0])}
    result = evaluate_detections(gts, preds, ["cat"])
    # Recall 0.5 at precision 1: 51 of the 101 recall points (0.00 .. 0.50) have precision 1.
    assert result["map50"] == pytest.approx(51 / 101, abs=1e-12)
    # The TP survives IoU thresholds .50 .. .70 (5 of 10), the others score 0.
    assert result["map50_95"] == pytest.approx(51 / 101 / 2, abs=1e-12)
    # VOC07: recall points 0, .1, ..., .5 reach precision 1 -> 6 of 11.
    assert result["voc07_map50"] == pytest.approx(6 / 11, abs=1e-12)
    assert result["per_class"]["cat"]["voc07_ap50"] == pytest.approx(6 / 11, abs=1e-12)


def test_fp_ranked_above_tp_halves_precision() -> None:
    gts = {"a": single([[0, 0, 100, 100]], [0])}
    preds = {"a": dets([[0, 0, 100, 100], [150, 150, 250, 250]], [0.8, 0.9], [0, 0])}
    result = evaluate_detections(gts, preds, ["cat"])
    assert result["map50"] == pytest.approx(0.5, abs=1e-12)
    assert result["map50_95"] == pytest.approx(0.5, abs=1e-12)
    assert result["voc07_map50"] == pytest.approx(0.5, abs=1e-12)


def test_detection_on_difficult_object_is_neither_tp_nor_fp() -> None:
    gts = {"a": single([[0, 0, 100, 100], [200, 200, 300, 300]], [0, 0], [False, True])}
    # The highest-scoring detection sits on the difficult object; if it counted as an FP, AP would be 0.5.
    with_difficult_hit = {"a": dets([[200, 200, 300, 300], [0, 0, 100, 100]], [0.95, 0.9], [0, 0])}
    result = evaluate_detections(gts, with_difficult_hit, ["cat"])
    for key in ("map50", "map50_95", "voc07_map50"):
        assert result[key] == pytest.approx(1.0, abs=1e-12)
    assert result["per_class"]["cat"]["num_gt"] == 1
    assert result["per_class"]["cat"]["num_difficult"] == 1
    # Missing the difficult object costs nothing either.
    only_regular = {"a": dets([[0, 0, 100, 100]], [0.9], [0])}
    assert evaluate_detections(gts, only_regular, ["cat"])["map50"] == pytest.approx(1.0, abs=1e-12)


def test_second_detection_on_same_object_is_fp() -> None:
    gts = {"a": single([[0, 0, 100, 100]], [0])}
    preds = {"a": dets([[0, 0, 100, 100], [1, 1, 100, 100]], [0.9, 0.95], [0, 0])}
    result = evaluate_detections(gts, preds, ["cat"])
    # The duplicate has the higher score, takes the object, and the exact box becomes the FP: AP stays 1.
    assert result["map50"] == pytest.approx(1.0, abs=1e-12)
    assert result["voc07_map50"] == pytest.approx(1.0, abs=1e-12)
    # A duplicate far enough off to miss IoU 0.5 ranked first is an FP: precision 1/2 at full recall.
    preds = {"a": dets([[0, 0, 100, 100], [40, 0, 140, 100]], [0.9, 0.95], [0, 0])}
    assert evaluate_detections(gts, preds, ["cat"])["map50"] == pytest.approx(0.5, abs=1e-12)


def test_class_without_ground_truth_is_excluded_from_means() -> None:
    gts = {"a": single([[0, 0, 100, 100]], [0])}
    perfect = {"a": dets([[0, 0, 100, 100]], [0.9], [0])}
    with_stray = {"a": dets([[0, 0, 100, 100], [200, 200, 250, 250]], [0.9, 0.99], [0, 1])}
    base = evaluate_detections(gts, perfect, ["cat", "dog"])
    stray = evaluate_detections(gts, with_stray, ["cat", "dog"])
    assert stray["per_class"]["dog"]["ap50"] is None
    assert stray["per_class"]["dog"]["ap50_95"] is None
    assert stray["per_class"]["dog"]["voc07_ap50"] is None
    assert stray["per_class"]["dog"]["num_pred"] == 1
    for key in ("map50", "map50_95", "voc07_map50"):
        assert stray[key] == base[key] == pytest.approx(1.0, abs=1e-12)


def test_more_than_100_detections_per_image_and_class_are_cut_for_coco_only() -> None:
    # 101 FPs outrank the TP: COCO keeps the best 100 per image and class (all FPs), VOC07 keeps all.
    gts = {"a": single([[0, 0, 10, 10]], [0])}
    fps = [[500 + i, 500, 510 + i, 510] for i in range(100)]
    preds = {"a": dets([*fps, [0, 0, 10, 10]], [0.9] * 100 + [0.1], [0] * 101)}
    result = evaluate_detections(gts, preds, ["cat"])
    assert result["map50"] == 0.0
    assert result["voc07_map50"] == pytest.approx(1 / 101, abs=1e-12)
    assert_matches_references(gts, preds, ["cat"])


def test_iou_exactly_on_the_thresholds() -> None:
    # COCO: IoU 0.5 exactly counts (pycocotools skips only IoU < t). VOC: 5000/10000 with +1 pixels does not
    # (the devkit needs ovmax > 0.5).
    gts = {"a": single([[0, 0, 100, 100]], [0]), "b": single([[0, 0, 99, 99]], [1])}
    preds = {"a": dets([[0, 0, 100, 50]], [0.9], [0]), "b": dets([[0, 0, 99, 49]], [0.9], [1])}
    result = evaluate_detections(gts, preds, ["coco_half", "voc_half"])
    assert result["per_class"]["coco_half"]["ap50"] == pytest.approx(1.0, abs=1e-12)
    assert result["per_class"]["coco_half"]["ap50_95"] == pytest.approx(0.1, abs=1e-12)
    assert result["per_class"]["voc_half"]["voc07_ap50"] == 0.0
    assert result["per_class"]["coco_half"]["voc07_ap50"] == pytest.approx(1.0, abs=1e-12)  # 51/101 > 0.5
    assert_matches_references(gts, preds, ["coco_half", "voc_half"])


def test_equal_overlap_with_two_objects() -> None:
    # The detection overlaps a difficult and a regular object equally. The devkit's argmax takes the first
    # (difficult) one and ignores the detection; pycocotools prefers the regular object and scores a TP.
    gts = {"a": single([[0, 0, 100, 80], [0, 20, 100, 100]], [0, 0], [True, False])}
    preds = {"a": dets([[0, 0, 100, 100]], [0.9], [0])}
    result = assert_matches_references(gts, preds, ["cat"])
    assert result["per_class"]["cat"]["voc07_ap50"] == 0.0
    assert result["per_class"]["cat"]["ap50"] == pytest.approx(1.0, abs=1e-12)
    # Two regular objects, equal IoU 0.8: pycocotools gives the first detection the *later* object, so the
    # second detection only gets the other one at IoU 0.6 -- a different AP50-95 than "first wins" would give.
    gts = {"a": single([[0, 0, 100, 80], [0, 20, 100, 100]], [0, 0])}
    preds = {"a": dets([[0, 0, 100, 100], [0, 20, 100, 100]], [0.9, 0.8], [0, 0])}
    assert_matches_references(gts, preds, ["cat"])
    gts = {"a": single([[0, 20, 100, 100], [0, 0, 100, 80]], [0, 0])}
    assert_matches_references(gts, preds, ["cat"])


def test_area_range_edge_cases_match_pycocotools() -> None:
    # Boxes over 1e5 x 1e5 fall outside pycocotools' "all" area range: such a ground truth is ignored but,
    # unlike a difficult one, can be matched only once; such a detection, if unmatched, is ignored.
    huge = [0, 0, 2e5, 2e5]
    gts = {
        "a": single([huge, [10, 10, 50, 50]], [0, 0]),
        "b": single([[10, 10, 50, 50]], [0]),
    }
    preds = {
        "a": dets([huge, huge, [10, 10, 50, 50]], [0.9, 0.8, 0.7], [0, 0, 0]),
        "b": dets([[1e6, 1e6, 1e6 + 2e5, 1e6 + 2e5], [10, 10, 50, 50]], [0.95, 0.5], [0, 0]),
    }
    result = assert_matches_references(gts, preds, ["cat"])
    assert result["per_class"]["cat"]["num_gt"] == 3  # the area rule is COCO's, not a VOC "difficult"


def test_boundary_ious_match_references() -> None:
    # Detections whose IoU is nominally *exactly* one of the thresholds (0.50, 0.55, ..., 0.95) on boxes with
    # 0.1-pixel coordinates: whether such a detection counts is decided by the last bits of the IoU and by
    # the direction of each comparison (>= for COCO, > for VOC), so this pins both.
    rng = np.random.default_rng(42)
    gts: dict[str, GroundTruth] = {}
    preds: dict[str, Predictions] = {}
    for i in range(150):
        n_gt = int(rng.integers(1, 4))
        xy = np.round(rng.uniform(0, 30, size=(n_gt, 2)), 1)  # small x1 with x2 > 2 x1: x1 + w != x2
        wh = 20.0 * rng.integers(1, 6, size=(n_gt, 2))
        g_boxes = np.concatenate([xy, xy + wh], axis=1)
        g_labels = rng.integers(0, 2, size=n_gt)
        d_boxes, d_labels = [], []
        for g, label in zip(g_boxes, g_labels):
            for k in rng.choice(np.arange(9, 21), size=4, replace=False):
                d = g.copy()
                side = int(rng.integers(0, 4))  # shrink one side to k/20 of the width or height
                axis = side % 2
                extent = (g[axis + 2] - g[axis]) * k / 20
                d[side] = g[axis] + extent if side >= 2 else g[axis + 2] - extent
                d_boxes.append(d)
                d_labels.append(label)
        gts[f"b{i:03d}"] = GroundTruth(g_boxes, g_labels, rng.random(n_gt) < 0.15)
        scores = np.round(rng.uniform(0, 1, size=len(d_labels)), 2)
        preds[f"b{i:03d}"] = Predictions(np.array(d_boxes), scores, np.array(d_labels))
    assert_matches_references(gts, preds, ["cat", "dog"])


def test_coco_iou_is_bit_identical_to_pycocotools_mask_iou() -> None:
    from pycocotools import mask as mask_utils

    from vocdet.core.metrics import _coco_iou

    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 100, size=(60, 2))
    boxes = np.concatenate([xy, rng.uniform(1, 80, size=(60, 2))], axis=1)  # xywh, float coordinates
    boxes[:20] = np.round(boxes[:20], 1)
    dt, gt = boxes[:30], boxes[30:]
    crowd = rng.random(30) < 0.3
    want = mask_utils.iou(dt.tolist(), gt.tolist(), crowd.astype(np.uint8).tolist())  # (30 dets, 30 gts)
    di, gi = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    got = _coco_iou(dt[di.ravel()], gt[gi.ravel()], crowd[gi.ravel()]).reshape(30, 30)
    assert (want > 0).sum() > 50
    assert np.array_equal(got, want)


def test_result_is_json_serialisable() -> None:
    import json

    gts, preds, names = random_case(11, n_images=30, n_classes=3)
    result = evaluate_detections(gts, preds, names)
    assert json.loads(json.dumps(result)) == result


def test_rejects_bad_input() -> None:
    gts = {"a": single([[0, 0, 10, 10]], [0])}
    with pytest.raises(ValueError, match="without ground truth"):
        evaluate_detections(gts, {"b": dets([[0, 0, 1, 1]], [0.5], [0])}, ["cat"])
    with pytest.raises(ValueError, match="class ids"):
        evaluate_detections(gts, {"a": dets([[0, 0, 1, 1]], [0.5], [3])}, ["cat"])
    with pytest.raises(ValueError, match="shape"):
        evaluate_detections(gts, {"a": Predictions(np.zeros((2, 4)), np.zeros(3), np.zeros(2, int))}, ["cat"])


def test_format_table_lists_classes_and_all_row() -> None:
    gts, preds = load_sample() if SAMPLE.is_dir() else (None, None)
    if gts is None:
        gts, preds, names = random_case(5, n_images=20, n_classes=3)
    else:
        names = VOC_CLASSES
    result = evaluate_detections(gts, preds, names)
    table = format_table(result)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["class", "#gt", "#difficult", "#pred"]
    for name in names:
        assert any(line.split()[0] == name for line in lines)
    last = lines[-1].split()
    assert last[0] == "all"
    assert last[-3:] == [f"{result[k]:.4f}" for k in ("map50", "map50_95", "voc07_map50")]
    assert len({len(line) for line in lines}) == 1  # fixed width


def test_fitness_weights() -> None:
    assert fitness({"map50": 0.5, "map50_95": 0.25}) == pytest.approx(0.1 * 0.5 + 0.9 * 0.25)


def test_5000_images_evaluate_quickly() -> None:
    # The requirement is <= 1 s on a developer machine; the bound here only catches accidental blow-ups.
    rng = np.random.default_rng(0)
    gts, preds = {}, {}
    for i in range(5000):
        n_gt, n_dt = int(rng.integers(1, 5)), int(rng.integers(0, 31))
        xy = rng.uniform(0, 400, (n_gt, 2))
        g = np.concatenate([xy, xy + rng.uniform(10, 100, (n_gt, 2))], axis=1)
        gl = rng.integers(0, 20, n_gt)
        src = rng.integers(0, n_gt, n_dt)
        d = g[src] + rng.normal(0, 10, (n_dt, 4))
        dl = np.where(rng.random(n_dt) < 0.7, gl[src], rng.integers(0, 20, n_dt))
        gts[f"{i:05d}"] = GroundTruth(g, gl, rng.random(n_gt) < 0.1)
        preds[f"{i:05d}"] = Predictions(d, rng.random(n_dt), dl)
    start = time.perf_counter()
    result = evaluate_detections(gts, preds, VOC_CLASSES)
    elapsed = time.perf_counter() - start
    assert 0.0 < result["map50"] < 1.0
    assert elapsed < 5.0, f"evaluation of 5000 images took {elapsed:.2f}s"
