"""COCO box mAP (pycocotools `COCOeval`) of a detector over an evaluation stream, on any number of hosts.

    evaluator = CocoEvaluator(category_ids=source.category_ids)      # or ground_truth_json=...
    evaluator.add(detections, batch)     # numpy, every image of the global batch
    evaluator.compute()                  # {"AP": ..., "AP50": ..., "AP75": ..., "APs": ...}

Detections are what `training.step.make_eval_step` returns: per image the top-k (query,
class) pairs, `scores (bs, k)`, `labels (bs, k)`, `boxes (bs, k, 4)` normalised (x0, y0, x1, y1),
the DETR/Deformable-DETR `PostProcess` (top 100 over queries x classes, no threshold). Boxes are
scaled to each image's original (height, width) and labels mapped to COCO category ids.

Ground truth is either the COCO annotations file itself (`ground_truth_json`, the official
protocol: crowd regions ignored, segmentation areas for the small/medium/large split) or built
from the evaluation batches (`labels`, `boxes`, `mask`, `orig_size` of each valid image): box
areas, no crowd regions, at most `max_boxes` per image. The latter works for any source (the
synthetic shapes, YOLO folders); on COCO it differs from the official figure only through crowd
regions and segment areas.

Several hosts: `coco_evaluate_stream` runs the jitted step on every process's share of each
global batch, gathers detections and targets of every image to every process
(`process_allgather`), and process 0 accumulates and scores them; the others return None.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from deformable_detr_jax.box_format import cxcywh_to_xyxy

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
_TARGET_KEYS = ("image_id", "orig_size", "labels", "boxes", "mask", "valid")


def _require_pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("COCO evaluation needs pycocotools: `pip install pycocotools`") from err
    return COCO, COCOeval


class CocoEvaluator:
    """Accumulates detections (and, without `ground_truth_json`, targets) and scores them.

    Args:
      category_ids: COCO category id of each label (`source.category_ids`); default: the label
        itself.
      label_names: names for the built ground truth's categories (optional).
      ground_truth_json: a COCO instances json whose image ids are the batches' `image_id`s.
    """

    def __init__(
        self,
        category_ids: Sequence[int] | None = None,
        *,
        label_names: Sequence[str] | None = None,
        ground_truth_json: str | None = None,
    ):
        self.category_ids = None if category_ids is None else tuple(int(c) for c in category_ids)
        self.label_names = label_names
        self.ground_truth_json = ground_truth_json
        self.images: dict[int, tuple[int, int]] = {}
        self.annotations: list[dict[str, Any]] = []
        self.detections: list[dict[str, Any]] = []

    def _category(self, label: int) -> int:
        if self.category_ids is None:
            return int(label)
        return self.category_ids[int(label)]

    def add(self, detections: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray]) -> None:
        """One global batch: `detections` as `make_eval_step` returns them (numpy), `batch` with
        `image_id (bs,)`, `orig_size (bs, 2)` (height, width), `valid (bs,)`, and the targets
        `labels`, `boxes` (cxcywh normalised), `mask` when the ground truth is built here."""
        scores = np.asarray(detections["scores"], dtype=np.float64)
        labels = np.asarray(detections["labels"])
        boxes = np.asarray(detections["boxes"], dtype=np.float64)
        valid = np.asarray(batch.get("valid", np.ones(len(scores), bool)), dtype=bool)
        for i in np.flatnonzero(valid):
            image_id = int(batch["image_id"][i])
            if image_id in self.images:
                raise ValueError(
                    f"image id {image_id} was evaluated twice; image ids must be unique"
                )
            height, width = (int(v) for v in batch["orig_size"][i])
            self.images[image_id] = (height, width)
            scale = np.asarray([width, height, width, height], dtype=np.float64)
            xyxy = boxes[i] * scale
            for score, label, (x0, y0, x1, y1) in zip(scores[i], labels[i], xyxy):
                self.detections.append(
                    {
                        "image_id": image_id,
                        "category_id": self._category(label),
                        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                        "score": float(score),
                    }
                )
            if self.ground_truth_json is None:
                mask = np.asarray(batch["mask"][i], dtype=bool)
                # (n, 4) cxcywh in pixels, float64 -> COCO's (x0, y0, w, h)
                pixels = np.asarray(batch["boxes"][i][mask], dtype=np.float64) * scale
                corners = cxcywh_to_xyxy(pixels)
                for label, (x0, y0, _, _), (_, _, w, h) in zip(
                    batch["labels"][i][mask], corners.tolist(), pixels.tolist(), strict=True
                ):
                    self.annotations.append(
                        {
                            "id": len(self.annotations) + 1,
                            "image_id": image_id,
                            "category_id": self._category(label),
                            "bbox": [x0, y0, w, h],
                            "area": w * h,
                            "iscrowd": 0,
                        }
                    )

    def _ground_truth(self):
        COCO, _ = _require_pycocotools()
        with contextlib.redirect_stdout(io.StringIO()):
            if self.ground_truth_json is not None:
                return COCO(self.ground_truth_json)
            if self.category_ids is None:
                labels = {a["category_id"] for a in self.annotations} | {
                    d["category_id"] for d in self.detections
                }
                ids = sorted(labels) or [0]
            else:
                ids = sorted(set(self.category_ids))
            names = dict(zip(self.category_ids or ids, self.label_names or ()))
            coco = COCO()
            coco.dataset = {
                "images": [{"id": i, "height": h, "width": w} for i, (h, w) in self.images.items()],
                "annotations": self.annotations,
                "categories": [{"id": c, "name": str(names.get(c, c))} for c in ids],
            }
            coco.createIndex()
            return coco

    def compute(self) -> dict[str, float]:
        """The 12 COCOeval box statistics (AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l), in
        [0, 1]; -1 where COCOeval has nothing to score (e.g. no small objects)."""
        _, COCOeval = _require_pycocotools()
        if not self.images:
            raise ValueError("no images were evaluated")
        gt = self._ground_truth()
        missing = sorted(set(self.images) - set(gt.getImgIds()))
        if missing:
            raise ValueError(
                f"{len(missing)} evaluated image ids are not in the ground truth (e.g. "
                f"{missing[:5]}); evaluate with the annotations file of the evaluation images"
            )
        if not self.detections:
            return dict.fromkeys(STAT_NAMES, 0.0)
        with contextlib.redirect_stdout(io.StringIO()):
            results = gt.loadRes(self.detections)
            evaluator = COCOeval(gt, results, iouType="bbox")
            evaluator.params.imgIds = sorted(self.images)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}


def coco_evaluate_stream(
    predict: Callable[[dict[str, Any]], Any],
    batches: Iterable[Mapping[str, np.ndarray]],
    evaluator: CocoEvaluator,
    *,
    to_device: Callable[[dict[str, np.ndarray]], Any],
    gather: Callable[[Any], Any],
    is_primary: bool,
) -> dict[str, float] | None:
    """Runs `predict` over `batches` (this process's share of each global batch) and scores them.

    Args:
      predict: device batch -> detections (global arrays split over the data axis).
      batches: this process's evaluation batches (the same count on every process).
      to_device: this process's numpy batch -> global device arrays (`mesh.host_to_global`).
      gather: a pytree of global arrays or of this process's numpy arrays -> numpy arrays of the
        whole batch on every process (`mesh.gather_to_host`).
      is_primary: whether this process scores (`jax.process_index() == 0`).

    Returns:
      `evaluator.compute()` on the primary process, None on the others.
    """
    for batch in batches:
        detections = predict(to_device({k: batch[k] for k in ("pixel_values", "pixel_mask")}))
        targets = {k: np.asarray(batch[k]) for k in _TARGET_KEYS}
        ids = targets["image_id"]
        if ids.size and (ids.max() >= 2**31 or ids.min() < -(2**31)):
            raise ValueError(f"image ids must fit in int32 for evaluation, got {ids.max()}")
        targets["image_id"] = ids.astype(np.int32)
        detections, targets = gather((detections, targets))
        if is_primary:
            evaluator.add(detections, targets)
    return evaluator.compute() if is_primary else None
