"""Box format conversions, written once for NumPy and jax.numpy.

`(..., 4)` arrays, `(cx, cy, w, h)` ("cxcywh") or `(x0, y0, x1, y1)` ("xyxy"), in any unit.
`xp` is the array library: NumPy (the default; the data workers and the post-processing use these
without importing jax) or `jax.numpy` (`boxes.box_cxcywh_to_xyxy` / `box_xyxy_to_cxcywh`, inside
jitted code). The formulas are the DETR box utilities' (`util/box_ops.py`, transformers
`center_to_corners_format`): `cx - 0.5 * w`, `(x0 + x1) / 2`, exact halvings, so both libraries
give the same bits for the same float inputs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def cxcywh_to_xyxy(boxes: Any, xp: ModuleType = np) -> Any:
    """`(..., 4)` (cx, cy, w, h) -> `(..., 4)` (x0, y0, x1, y1)."""
    center, size = boxes[..., :2], boxes[..., 2:]
    return xp.concatenate([center - 0.5 * size, center + 0.5 * size], axis=-1)


def xyxy_to_cxcywh(boxes: Any, xp: ModuleType = np) -> Any:
    """`(..., 4)` (x0, y0, x1, y1) -> `(..., 4)` (cx, cy, w, h)."""
    low, high = boxes[..., :2], boxes[..., 2:]
    return xp.concatenate([(low + high) / 2, high - low], axis=-1)
