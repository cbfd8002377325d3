"""A COCO detection annotation of one image -> the model's training target (transformers'
`prepare_coco_detection_annotation`, boxes kept normalised to the unpadded image)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from deformable_detr_jax.box_format import xyxy_to_cxcywh


def convert_coco_detection_annotation(
    annotation: Mapping[str, Any],
    image_size: tuple[int, int],
    *,
    resized_size: tuple[int, int] | None = None,
    normalize: bool = True,
) -> dict[str, np.ndarray]:
    """COCO detection target of one image -> the model's target.

    `annotation` is `{"image_id": int, "annotations": [{"bbox": [x, y, w, h], "category_id": int,
    "area": float, "iscrowd": 0/1}, ...]}` for an image of `image_size` (height, width). Crowd boxes
    are dropped, boxes are clipped to the image, empty boxes dropped; boxes and areas are scaled to
    `resized_size` when given; with `normalize` the boxes become (cx, cy, w, h) in [0, 1] of the
    (resized) image, else (x0, y0, x1, y1) pixels. Float32 arithmetic in the order transformers'
    `prepare_coco_detection_annotation`, `resize_annotation` and `normalize_annotation` use.

    Returns `image_id [1]`, `class_labels [n]` int64, `boxes [n, 4]` float32, `area [n]` float32,
    `iscrowd [n]` int64, `orig_size [2]` and `size [2]` (height, width) int64.
    """
    if (
        not isinstance(annotation, Mapping)
        or "image_id" not in annotation
        or not isinstance(annotation.get("annotations"), (list, tuple))
    ):
        raise ValueError(
            "a COCO detection annotation is a dict with 'image_id' and 'annotations' (a list of "
            f"dicts with 'bbox', 'category_id', 'area'), got {annotation!r:.200}"
        )
    height, width = (int(s) for s in image_size)
    objects = [obj for obj in annotation["annotations"] if obj.get("iscrowd", 0) == 0]
    classes = np.asarray([obj["category_id"] for obj in objects], dtype=np.int64)
    area = np.asarray([obj["area"] for obj in objects], dtype=np.float32)
    # (n, 4) x, y, w, h -> x0, y0, x1, y1 clipped to the image
    boxes = np.asarray([obj["bbox"] for obj in objects], dtype=np.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = boxes[:, 0::2].clip(min=0, max=width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(min=0, max=height)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    boxes, classes, area = boxes[keep], classes[keep], area[keep]

    size = (height, width)
    if resized_size is not None:
        ratio_height, ratio_width = (
            float(r) / float(o) for r, o in zip(resized_size, size, strict=True)
        )
        boxes = boxes * np.asarray([ratio_width, ratio_height] * 2, dtype=np.float32)
        area = area * (ratio_width * ratio_height)
        size = tuple(int(s) for s in resized_size)
    if normalize:
        boxes = xyxy_to_cxcywh(boxes)  # (n, 4) cx, cy, w, h
        boxes /= np.asarray([size[1], size[0], size[1], size[0]], dtype=np.float32)
    return {
        "image_id": np.asarray([annotation["image_id"]], dtype=np.int64),
        "class_labels": classes,
        "boxes": boxes.astype(np.float32, copy=False),
        "area": area.astype(np.float32, copy=False),
        "iscrowd": np.zeros_like(classes),
        "orig_size": np.asarray([height, width], dtype=np.int64),
        "size": np.asarray(size, dtype=np.int64),
    }


# ----------------------------------------------------------------------------- the processor
