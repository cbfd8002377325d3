"""Box ops against transformers' (DETR's) torch box utilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax import boxes as B
from tests.test_boxes import random_cxcywh

pytestmark = pytest.mark.torch


def test_conversion_matches_transformers():
    import torch
    from transformers.image_transforms import center_to_corners_format

    cxcywh = random_cxcywh(np.random.default_rng(0), 17)
    xyxy = np.asarray(B.box_cxcywh_to_xyxy(jnp.asarray(cxcywh)))
    torch_xyxy = center_to_corners_format(torch.from_numpy(cxcywh)).numpy()
    np.testing.assert_allclose(xyxy, torch_xyxy, rtol=1e-6, atol=1e-7)


def test_pairwise_iou_and_giou_match_transformers():
    import torch
    from transformers.loss.loss_for_object_detection import box_iou as torch_box_iou
    from transformers.loss.loss_for_object_detection import generalized_box_iou as torch_giou

    rng = np.random.default_rng(1)
    a = np.asarray(B.box_cxcywh_to_xyxy(jnp.asarray(random_cxcywh(rng, 13))), np.float64)
    b = np.asarray(B.box_cxcywh_to_xyxy(jnp.asarray(random_cxcywh(rng, 9))), np.float64)
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


def test_elementwise_giou_gradient_matches_torch():
    import torch
    from transformers.loss.loss_for_object_detection import generalized_box_iou as torch_giou

    rng = np.random.default_rng(3)
    a = np.asarray(B.box_cxcywh_to_xyxy(jnp.asarray(random_cxcywh(rng, 6))), np.float64)
    b = np.asarray(B.box_cxcywh_to_xyxy(jnp.asarray(random_cxcywh(rng, 6))), np.float64)
    weights = rng.normal(size=6)
    with jax.enable_x64(True):
        grad = jax.grad(
            lambda x: (B.elementwise_generalized_box_iou(x, jnp.asarray(b)) * weights).sum()
        )(jnp.asarray(a))
    ta = torch.from_numpy(a).requires_grad_(True)
    (torch.diag(torch_giou(ta, torch.from_numpy(b))) * torch.from_numpy(weights)).sum().backward()
    np.testing.assert_allclose(np.asarray(grad), ta.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["giou", "iou"])
@pytest.mark.parametrize(
    "boxes1, boxes2",
    [
        # a box against itself: every min and max a tie
        (
            [[0.1, 0.2, 0.5, 0.7], [0.3, 0.1, 0.9, 0.4]],
            [[0.1, 0.2, 0.5, 0.7], [0.3, 0.1, 0.9, 0.4]],
        ),
        # shared coordinates with a positive overlap
        (
            [[0.1, 0.2, 0.5, 0.6], [0.2, 0.2, 0.6, 0.9]],
            [[0.1, 0.3, 0.4, 0.6], [0.2, 0.1, 0.7, 0.9]],
        ),
        # zero-area targets (a point, segments, padding) inside or across the predictions
        (
            [[0.1, 0.1, 0.7, 0.8], [0.25, 0.2, 0.9, 0.6], [0.05, 0.4, 0.5, 0.95]],
            [
                [0.3, 0.3, 0.3, 0.3],
                [0.2, 0.5, 0.6, 0.5],
                [0.4, 0.15, 0.4, 0.7],
                [0.0, 0.0, 0.0, 0.0],
            ],
        ),
        # zero-area predictions inside the targets: a width clamped at exactly 0
        (
            [[0.5, 0.2, 0.5, 0.6], [0.2, 0.45, 0.7, 0.45], [0.3, 0.3, 0.3, 0.3]],
            [[0.1, 0.1, 0.9, 0.9], [0.3, 0.0, 0.6, 0.8]],
        ),
        # touching boxes: an intersection width of exactly 0
        (
            [[0.1, 0.2, 0.4, 0.6], [0.4, 0.1, 0.7, 0.2]],
            [[0.4, 0.3, 0.8, 0.9], [0.0, 0.2, 0.4, 0.5]],
        ),
    ],
    ids=["identical", "shared-coordinates", "zero-area-targets", "zero-area-preds", "touching"],
)
def test_gradients_at_ties_match_torch(boxes1, boxes2, name):
    """At the kinks of min, max and clamp the gradients of both arguments are torch's: equal
    arguments of torch.max / torch.min share the gradient, torch.clamp(min=0) passes it at 0.
    (No pair of two zero-area boxes: torch's IoU is NaN there.)"""
    import torch
    from transformers.loss.loss_for_object_detection import box_iou as torch_box_iou
    from transformers.loss.loss_for_object_detection import generalized_box_iou as torch_giou

    fn, torch_fn = {
        "giou": (B.generalized_box_iou, torch_giou),
        "iou": (lambda x, y: B.box_iou(x, y)[0], lambda x, y: torch_box_iou(x, y)[0]),
    }[name]
    a, b = np.asarray(boxes1, np.float64), np.asarray(boxes2, np.float64)
    weights = np.random.default_rng(4).normal(size=(len(a), len(b)))
    with jax.enable_x64(True):
        grads = jax.grad(lambda x, y: (fn(x, y) * weights).sum(), argnums=(0, 1))(
            jnp.asarray(a), jnp.asarray(b)
        )
    ta, tb = (torch.from_numpy(v).requires_grad_(True) for v in (a, b))
    (torch_fn(ta, tb) * torch.from_numpy(weights)).sum().backward()
    np.testing.assert_allclose(np.asarray(grads[0]), ta.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(grads[1]), tb.grad.numpy(), rtol=1e-9, atol=1e-12)
