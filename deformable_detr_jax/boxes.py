"""Box format conversions, IoU and generalised IoU as pure jnp functions.

Follows the DETR box utilities (facebookresearch/detr `util/box_ops.py`, copied into
transformers `loss/loss_for_object_detection.py` and `image_transforms.py`) and the
generalised IoU of Rezatofighi et al., "Generalized Intersection over Union" (CVPR 2019).

Unlike the reference these are safe for zero-area and padded (all-zero) boxes: where a
union or an enclosing area is zero, the division is replaced by a well-defined value
(IoU 0; GIoU falls back to the IoU) through the double-`where` trick, so neither the
values nor the gradients contain NaN. For boxes with positive area the formulas are
exactly the reference's.

Gradients at ties follow PyTorch's autograd, which the reference's loss is differentiated by:
an elementwise max or min of two equal arguments sends half the gradient to each (torch.max
and torch.min of two tensors, and jnp.maximum / jnp.minimum, agree), and a width clamped at
0 passes the full gradient where it is exactly 0 (`torch.clamp(min=0)`, as `_clamp_min_zero`
here; `jnp.clip` would pass half). A width is exactly 0 where a zero-area box lies inside
the other box or two boxes touch.

Boxes are `(..., 4)` arrays, either `(cx, cy, w, h)` ("cxcywh") or `(x0, y0, x1, y1)`
("xyxy"); the format conversions are `box_format`'s (one formula for NumPy and jnp). Pairwise
functions take `(n, 4)` and `(m, 4)` and return `(n, m)`; the `elementwise_*` variants take two
`(..., 4)` arrays of the same shape.
"""

from __future__ import annotations

import jax.numpy as jnp

from deformable_detr_jax.box_format import cxcywh_to_xyxy, xyxy_to_cxcywh


def box_cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
    """`(..., 4)` (cx, cy, w, h) -> `(..., 4)` (x0, y0, x1, y1), `box_format`'s formula in jnp."""
    return cxcywh_to_xyxy(jnp.asarray(boxes), jnp)


def box_xyxy_to_cxcywh(boxes: jnp.ndarray) -> jnp.ndarray:
    """`(..., 4)` (x0, y0, x1, y1) -> `(..., 4)` (cx, cy, w, h), `box_format`'s formula in jnp."""
    return xyxy_to_cxcywh(jnp.asarray(boxes), jnp)


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
    """Area of `(..., 4)` xyxy boxes -> `(...)`; negative for inverted boxes, as the reference."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _safe_divide(numerator: jnp.ndarray, denominator: jnp.ndarray, fallback) -> jnp.ndarray:
    """`numerator / denominator` where `denominator > 0`, else `fallback`; NaN-free gradients."""
    ok = denominator > 0
    safe = jnp.where(ok, denominator, jnp.ones_like(denominator))
    return jnp.where(ok, numerator / safe, fallback)


def _clamp_min_zero(x: jnp.ndarray) -> jnp.ndarray:
    """`max(x, 0)` whose gradient at exactly 0 is 1, as `torch.clamp(min=0)`'s; NaN stays NaN."""
    return jnp.where(x < 0, jnp.zeros_like(x), x)


def _iou_terms(boxes1: jnp.ndarray, boxes2: jnp.ndarray):
    """IoU, union and enclosing area of broadcast-compatible `(..., 4)` xyxy boxes."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    left_top = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
    right_bottom = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
    width_height = _clamp_min_zero(right_bottom - left_top)
    inter = width_height[..., 0] * width_height[..., 1]
    union = area1 + area2 - inter
    iou = _safe_divide(inter, union, jnp.zeros_like(inter))

    enc_left_top = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
    enc_right_bottom = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
    enc_width_height = _clamp_min_zero(enc_right_bottom - enc_left_top)
    enclosing = enc_width_height[..., 0] * enc_width_height[..., 1]
    return iou, union, enclosing


def box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Pairwise IoU of `(n, 4)` and `(m, 4)` xyxy boxes -> `(iou (n, m), union (n, m))`.

    IoU is 0 where the union is not positive (two zero-area boxes).
    """
    iou, union, _ = _iou_terms(boxes1[:, None, :], boxes2[None, :, :])
    return iou, union


def generalized_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """Pairwise generalised IoU of `(n, 4)` and `(m, 4)` xyxy boxes -> `(n, m)` in [-1, 1].

    `iou - (enclosing - union) / enclosing`; equals the IoU where the enclosing box has no
    area (both boxes degenerate onto one line or point).
    """
    return elementwise_generalized_box_iou(boxes1[:, None, :], boxes2[None, :, :])


def elementwise_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """IoU of matching `(..., 4)` xyxy boxes (the diagonal of `box_iou`) -> `(...)`."""
    iou, _, _ = _iou_terms(boxes1, boxes2)
    return iou


def elementwise_generalized_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """Generalised IoU of matching `(..., 4)` xyxy boxes (the pairwise diagonal) -> `(...)`."""
    iou, union, enclosing = _iou_terms(boxes1, boxes2)
    return iou - _safe_divide(enclosing - union, enclosing, jnp.zeros_like(enclosing))
