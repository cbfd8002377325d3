"""COCO box mAP (`deformable_detr_jax.inference.evaluation.CocoEvaluator`) against figures
computed by hand from COCO's definition, never against the evaluator itself.

One 100 x 120 image holds a small ground-truth box (20 x 20, area 400 < 32^2) and a medium one
(50 x 50); the detections are, by score, a copy of the small box (0.9), a 40 x 40 false
positive overlapping neither (0.8) and a copy of the medium box (0.7). Ranked: TP, FP, TP, so
precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1. COCO interpolates precision as the best at any
recall >= r, on the 101 recalls 0, 0.01, ..., 1: 1 at the 51 recalls up to 0.5, 2/3 at the 50
above, AP = (51 + 50 * 2/3) / 101 at every IoU threshold (the matches are exact). Small
objects alone: the medium box and the medium false positive are out of range, AP 1. Medium
alone: the small box's match is ignored, FP then TP: precision 1/2 at every recall.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from deformable_detr_jax.inference.evaluation import CocoEvaluator

HEIGHT, WIDTH = 100, 120  # not square: a swapped height and width shows
GROUND_TRUTH_XYWH = [(10, 10, 20, 20), (40, 40, 50, 50)]  # small, medium (pixels)
FALSE_POSITIVE_XYWH = (5, 55, 40, 30)  # 40 x 30 = 1200: medium; overlaps neither box
SCORES = (0.9, 0.8, 0.7)  # small copy, false positive, medium copy

TP_FP_TP = (51 + 50 * 2 / 3) / 101
EXPECTED = {
    "AP": TP_FP_TP,
    "AP50": TP_FP_TP,
    "AP75": TP_FP_TP,
    "APs": 1.0,
    "APm": 0.5,
    "APl": -1.0,  # no large objects: COCOeval's "nothing to score"
    "AR1": 0.5,  # the top detection only: one of two boxes
    "AR10": 1.0,
    "AR100": 1.0,
    "ARs": 1.0,
    "ARm": 1.0,
    "ARl": -1.0,
}
CATEGORY = 7  # label 0's COCO category id


def _normalised_cxcywh(x, y, w, h):
    return [(x + w / 2) / WIDTH, (y + h / 2) / HEIGHT, w / WIDTH, h / HEIGHT]


def _normalised_xyxy(x, y, w, h):
    return [x / WIDTH, y / HEIGHT, (x + w) / WIDTH, (y + h) / HEIGHT]


def _batch(image_id: int = 42) -> dict[str, np.ndarray]:
    """The image as an evaluation batch of 2, the second a filler (`valid` False)."""
    boxes = np.zeros((2, 3, 4))
    boxes[0, :2] = [_normalised_cxcywh(*b) for b in GROUND_TRUTH_XYWH]
    boxes[1, 0] = [0.5, 0.5, 0.2, 0.2]
    return {
        "image_id": np.array([image_id, image_id + 1]),
        "orig_size": np.array([[HEIGHT, WIDTH], [HEIGHT, WIDTH]]),
        "labels": np.zeros((2, 3), np.int64),
        "boxes": boxes,
        "mask": np.array([[True, True, False], [True, False, False]]),
        "valid": np.array([True, False]),
    }


def _detections() -> dict[str, np.ndarray]:
    found = [GROUND_TRUTH_XYWH[0], FALSE_POSITIVE_XYWH, GROUND_TRUTH_XYWH[1]]
    boxes = np.zeros((2, 3, 4))
    boxes[0] = [_normalised_xyxy(*b) for b in found]
    boxes[1] = [0.1, 0.1, 0.3, 0.3]  # the filler image's: must be left out
    return {
        "scores": np.array([SCORES, (0.99, 0.99, 0.99)]),
        "labels": np.zeros((2, 3), np.int64),
        "boxes": boxes,
    }


def test_built_ground_truth_gives_the_hand_computed_figures():
    evaluator = CocoEvaluator(category_ids=(CATEGORY,), label_names=("thing",))
    evaluator.add(_detections(), _batch())
    result = evaluator.compute()
    assert result == pytest.approx(EXPECTED, abs=1e-12)


def test_perfect_and_wrong_class_detections():
    perfect = _detections()
    perfect["scores"][0, 1] = 0.0  # the false positive, last
    perfect["boxes"][0, 1] = perfect["boxes"][0, 2]  # and a duplicate of the medium box
    evaluator = CocoEvaluator(category_ids=(CATEGORY, 9))
    evaluator.add(perfect, _batch())
    assert evaluator.compute()["AP"] == pytest.approx(1.0, abs=1e-12)

    wrong = _detections()
    wrong["labels"][:] = 1  # category 9: no box of it in the image
    evaluator = CocoEvaluator(category_ids=(CATEGORY, 9))
    evaluator.add(wrong, _batch())
    assert evaluator.compute()["AP"] == 0.0


def test_annotation_file_with_a_crowd_region(tmp_path):
    """The official protocol reads the file: a crowd region over the false positive makes it
    ignored (TP, TP: AP 1), and the file's `area`, not the box's, sets small/medium/large."""
    x, y, w, h = FALSE_POSITIVE_XYWH
    annotations = [
        {"id": 1, "bbox": list(GROUND_TRUTH_XYWH[0]), "area": 400.0, "iscrowd": 0},
        # a 50 x 50 box whose segment covers 900 pixels: small by the file's area
        {"id": 2, "bbox": list(GROUND_TRUTH_XYWH[1]), "area": 900.0, "iscrowd": 0},
        {"id": 3, "bbox": [x - 2, y - 2, w + 4, h + 4], "area": (w + 4) * (h + 4), "iscrowd": 1},
    ]
    ground_truth = {
        "images": [{"id": 42, "height": HEIGHT, "width": WIDTH}],
        "annotations": [{**a, "image_id": 42, "category_id": CATEGORY} for a in annotations],
        "categories": [{"id": CATEGORY, "name": "thing"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(ground_truth))
    evaluator = CocoEvaluator(category_ids=(CATEGORY,), ground_truth_json=str(path))
    evaluator.add(_detections(), _batch())
    result = evaluator.compute()
    assert result["AP"] == pytest.approx(1.0, abs=1e-12)
    assert result["APs"] == pytest.approx(1.0, abs=1e-12)
    assert result["APm"] == -1.0 and result["ARm"] == -1.0  # no medium object by area


def test_an_image_missing_from_the_annotation_file(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    evaluator = CocoEvaluator(ground_truth_json=str(path))
    evaluator.add(_detections(), _batch())
    with pytest.raises(ValueError, match=r"1 evaluated image ids are not in the ground truth"):
        evaluator.compute()
