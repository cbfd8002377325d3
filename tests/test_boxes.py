"""Box ops against hand-computed values and a NumPy GIoU written here (transformers' torch
box utilities: tests/test_boxes_vs_transformers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax import boxes as B


def _random_cxcywh(rng, n):
    centers = rng.uniform(0.1, 0.9, size=(n, 2))
    sizes = rng.uniform(0.02, 0.6, size=(n, 2))
    return np.concatenate([centers, sizes], -1)


def _numpy_giou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise GIoU of xyxy boxes with positive area, float64, box by box."""
    out = np.empty((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            hull = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
            out[i, j] = inter / union - (hull - union) / hull
    return out


def test_conversions_round_trip_and_values():
    rng = np.random.default_rng(0)
    cxcywh = _random_cxcywh(rng, 17)
    xyxy = np.asarray(B.box_cxcywh_to_xyxy(jnp.asarray(cxcywh)))
    expected = np.concatenate(
        [cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], -1
    )
    np.testing.assert_allclose(xyxy, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        B.box_xyxy_to_cxcywh(jnp.asarray(xyxy)), cxcywh, rtol=1e-5, atol=1e-6
    )
    # batched leading dims
    stacked = np.asarray(B.box_cxcywh_to_xyxy(jnp.asarray(cxcywh.reshape(1, 17, 4))))
    np.testing.assert_allclose(stacked[0], xyxy, rtol=1e-6)


def test_hand_computed_values():
    # unit square vs the square shifted by half: inter 0.5, union 1.5, enclosing 1.5
    a = jnp.array([[0.0, 0.0, 1.0, 1.0]])
    b = jnp.array([[0.5, 0.0, 1.5, 1.0]])
    np.testing.assert_allclose(B.box_iou(a, b)[0], [[1 / 3]], rtol=1e-6)
    np.testing.assert_allclose(B.generalized_box_iou(a, b), [[1 / 3]], rtol=1e-6)
    # disjoint: [0,1]^2 and [2,3]x[0,1]: iou 0, enclosing 3, union 2 -> giou = -1/3
    c = jnp.array([[2.0, 0.0, 3.0, 1.0]])
    np.testing.assert_allclose(B.generalized_box_iou(a, c), [[-1 / 3]], rtol=1e-6)
    np.testing.assert_allclose(B.box_area(jnp.array([[0.1, 0.2, 0.4, 0.7]])), [0.15], rtol=1e-6)


@pytest.mark.parametrize("fn", [B.generalized_box_iou, lambda x, y: B.box_iou(x, y)[0]])
def test_zero_area_and_padded_boxes_have_no_nan(fn):
    rng = np.random.default_rng(2)
    normal = np.array(B.box_cxcywh_to_xyxy(jnp.asarray(_random_cxcywh(rng, 3))), np.float64)
    degenerate = np.array(
        [
            [0.0, 0.0, 0.0, 0.0],  # padding
            [0.3, 0.3, 0.3, 0.3],  # a point
            [0.2, 0.5, 0.6, 0.5],  # a horizontal segment
            [0.3, 0.3, 0.3, 0.3],  # the same point again
        ]
    )
    boxes = jnp.asarray(np.concatenate([normal, degenerate]), jnp.float32)
    values = fn(boxes, boxes)
    assert np.isfinite(np.asarray(values)).all()
    # normal-vs-normal entries unchanged by the safety
    ref = _numpy_giou(normal, normal)
    if fn is B.generalized_box_iou:
        np.testing.assert_allclose(np.asarray(values)[:3, :3], ref, rtol=1e-5, atol=1e-6)
        # identical points: no union and no enclosing area -> giou falls back to iou = 0
        assert float(values[4, 6]) == 0.0

    grads = jax.grad(lambda x: fn(x, boxes).sum())(boxes)
    assert np.isfinite(np.asarray(grads)).all()
    assert np.abs(np.asarray(grads)[:3]).sum() > 0
