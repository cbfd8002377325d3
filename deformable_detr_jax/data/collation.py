"""Padding examples into one batch: images to a bucket (or a fixed size), targets to `max_boxes`
(the batch layout: `pipeline.py`'s docstring)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from deformable_detr_jax.processing.image_processor import MIN_SIDE

logger = logging.getLogger(__name__)

_PAD_BOX = (0.5, 0.5, 1.0, 1.0)  # a finite, valid box under mask False


def _round_up(side: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if bucket >= side:
            return bucket
    return side


def collate(
    examples: Sequence[dict[str, Any]],
    batch_size: int,
    max_boxes: int,
    *,
    buckets: Sequence[int] | None = None,
    pad_to: tuple[int, int] | None = None,
    filler_shape: tuple[int, int] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Pad `examples` (`streams.Loader`'s dicts, at most `batch_size`) into one batch.

    Images go to `pad_to`, else to the batch's largest height and width each rounded up to
    `buckets`; missing entries are fillers (`valid` False, all masks False). Boxes past `max_boxes`
    are dropped. Returns the batch and how many boxes were dropped.
    """
    sizes = [ex["size"] for ex in examples]
    if pad_to is not None:
        height, width = pad_to
    elif sizes:
        height = max(h for h, _ in sizes)
        width = max(w for _, w in sizes)
        if buckets:
            height, width = _round_up(height, buckets), _round_up(width, buckets)
    elif filler_shape is not None:
        height, width = filler_shape
    else:
        height = width = min(buckets) if buckets else MIN_SIDE
    batch = {
        "pixel_values": np.zeros((batch_size, height, width, 3), dtype=np.float32),
        "pixel_mask": np.zeros((batch_size, height, width), dtype=bool),
        "labels": np.zeros((batch_size, max_boxes), dtype=np.int32),
        "boxes": np.tile(np.asarray(_PAD_BOX, dtype=np.float32), (batch_size, max_boxes, 1)),
        "mask": np.zeros((batch_size, max_boxes), dtype=bool),
        "image_id": np.full((batch_size,), -1, dtype=np.int64),
        "size": np.zeros((batch_size, 2), dtype=np.int32),
        "orig_size": np.zeros((batch_size, 2), dtype=np.int32),
        "valid": np.zeros((batch_size,), dtype=bool),
    }
    dropped = 0
    for i, ex in enumerate(examples):
        h, w = ex["size"]
        if h > height or w > width:
            raise ValueError(
                f"image {ex['image_id']} is {h} x {w} after transforms, larger than the padded "
                f"size {height} x {width}; raise pad_to or lower the augmentation sizes"
            )
        batch["pixel_values"][i, :h, :w] = ex["image"]
        batch["pixel_mask"][i, :h, :w] = True
        n = min(len(ex["labels"]), max_boxes)
        if len(ex["labels"]) > max_boxes:
            dropped += len(ex["labels"]) - max_boxes
            logger.warning(
                "image %d has %d boxes; keeping the first max_boxes=%d",
                ex["image_id"],
                len(ex["labels"]),
                max_boxes,
            )
        batch["labels"][i, :n] = ex["labels"][:n]
        batch["boxes"][i, :n] = ex["boxes"][:n]
        batch["mask"][i, :n] = True
        batch["image_id"][i] = ex["image_id"]
        batch["size"][i] = ex["size"]
        batch["orig_size"][i] = ex["orig_size"]
        batch["valid"][i] = True
    return batch, dropped
