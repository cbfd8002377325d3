"""Box ops against transformers' (DETR's) torch box utilities and hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import box_iou as torch_box_iou
from transformers.loss.loss_for_object_detection import generalized_box_iou as torch_giou

from deformable_detr_jax import boxes as B


def _random_cxcywh(rng, n):
    centers = rng.uniform(0.1, 0.9, size=(n, 2))
    sizes = rng.uniform(0.02, 0.6, size=(n, 2))
    return np.concatenate([centers, sizes], -1)


def test_conversions_round_trip_and_values():
    rng = np.random.default_rng(0)
    cxcywh = _random_cxcywh(rng, 17)
    xyxy = np.asarray(B.box_cxcywh_to_xyxy(jnp.asarray(cxcywh)))
    expected = np.concatenate(
        [cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], -1
    )
    np.testing.assert_allclose(xyxy, expected, rtol=1e-6, atol=1e-7)
    torch_xyxy = center_to_corners_format(torch.from_numpy(cxcywh)).numpy()
    np.testing.assert_allclose(xyxy, torch_xyxy, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        B.box_xyxy_to_cxcywh(jnp.asarray(xyxy)), cxcywh, rtol=1e-5, atol=1e-6
    )
    # batched leading dims
    stacked = np.asarray(B.box_cxcywh_to_xyxy(jnp.asarray(cxcywh.reshape(1, 17, 4))))
    np.testing.assert_allclose(stacked[0], xyxy, rtol=1e-6)


def test_pairwise_iou_and_giou_match_transformers():
    rng = np.random.default_rng(1)
    a = np.asarray(B.box_cxcywh_to_xyxy(jnp.asarray(_random_cxcywh(rng, 13))), np.float64)
    b = np.asarray(B.box_cxcywh_to_xyxy(jnp.asarray(_random_cxcywh(rng, 9))), np.float64)
    iou, union = B.box_iou(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    ref_iou, ref_union = torch_box_iou(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(iou, ref_iou.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(union, ref_union.numpy(), rtol=1e-5, atol=1e-6)
    giou = B.generalized_box_iou(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    ref = torch_giou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(giou, ref, rtol=1e-5, atol=1e-6)
    assert (ref < 0).any() and (ref > 0).any()  # both overlapping and disjoint pairs are covered
    # the elementwise form is the diagonal of the pairwise one
    n = min(len(a), len(b))
    diag = B.elementwise_generalized_box_iou(jnp.asarray(a[:n]), jnp.asarray(b[:n]))
    np.testing.assert_allclose(diag, np.diag(ref[:n, :n]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        B.elementwise_box_iou(jnp.asarray(a[:n]), jnp.asarray(b[:n])),
        np.diag(ref_iou.numpy()[:n, :n]),
        rtol=1e-5,
        atol=1e-6,
    )


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
    ref = torch_giou(torch.from_numpy(normal), torch.from_numpy(normal)).numpy()
    if fn is B.generalized_box_iou:
        np.testing.assert_allclose(np.asarray(values)[:3, :3], ref, rtol=1e-5, atol=1e-6)
        # identical points: no union and no enclosing area -> giou falls back to iou = 0
        assert float(values[4, 6]) == 0.0

    grads = jax.grad(lambda x: fn(x, boxes).sum())(boxes)
    assert np.isfinite(np.asarray(grads)).all()
    assert np.abs(np.asarray(grads)[:3]).sum() > 0


def test_elementwise_giou_gradient_matches_torch():
    rng = np.random.default_rng(3)
    a = np.asarray(B.box_cxcywh_to_xyxy(jnp.asarray(_random_cxcywh(rng, 6))), np.float64)
    b = np.asarray(B.box_cxcywh_to_xyxy(jnp.asarray(_random_cxcywh(rng, 6))), np.float64)
    weights = rng.normal(size=6)
    with jax.enable_x64(True):
        grad = jax.grad(
            lambda x: (B.elementwise_generalized_box_iou(x, jnp.asarray(b)) * weights).sum()
        )(jnp.asarray(a))
    ta = torch.from_numpy(a).requires_grad_(True)
    (torch.diag(torch_giou(ta, torch.from_numpy(b))) * torch.from_numpy(weights)).sum().backward()
    np.testing.assert_allclose(np.asarray(grad), ta.grad.numpy(), rtol=1e-9, atol=1e-12)
