"""Box ops against hand-computed values and a NumPy GIoU written here (transformers' torch
box utilities: tests/test_boxes_vs_transformers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax import boxes as B


def random_cxcywh(rng, n):
    centers = rng.uniform(0.1, 0.9, size=(n, 2))
    sizes = rng.uniform(0.02, 0.6, size=(n, 2))
    return np.concatenate([centers, sizes], -1)


def _numpy_iou_giou(p: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """IoU and GIoU of two xyxy boxes in float64 with the module's fallbacks: IoU 0 where the
    union is 0, GIoU = IoU where the enclosing box has no area."""
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    iou = inter / union if union > 0 else 0.0
    hull = max(0.0, max(p[2], q[2]) - min(p[0], q[0])) * max(0.0, max(p[3], q[3]) - min(p[1], q[1]))
    return iou, (iou - (hull - union) / hull if hull > 0 else iou)


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
    cxcywh = random_cxcywh(rng, 17)
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


_PAIRWISE = {"giou": B.generalized_box_iou, "iou": lambda x, y: B.box_iou(x, y)[0]}
_DEGENERATE = np.array(
    [
        [0.0, 0.0, 0.0, 0.0],  # padding
        [0.3, 0.3, 0.3, 0.3],  # a point
        [0.2, 0.5, 0.6, 0.5],  # a horizontal segment
        [0.45, 0.1, 0.45, 0.7],  # a vertical segment
    ]
)


@pytest.mark.parametrize("name", ["giou", "iou"])
def test_zero_area_and_padded_boxes_have_no_nan(name):
    fn = _PAIRWISE[name]
    rng = np.random.default_rng(2)
    normal = np.array(B.box_cxcywh_to_xyxy(jnp.asarray(random_cxcywh(rng, 3))), np.float64)
    degenerate = np.concatenate([_DEGENERATE[:3], _DEGENERATE[1:2]])  # the point twice
    boxes = jnp.asarray(np.concatenate([normal, degenerate]), jnp.float32)
    values = fn(boxes, boxes)
    assert np.isfinite(np.asarray(values)).all()
    # normal-vs-normal entries unchanged by the safety
    ref = _numpy_giou(normal, normal)
    if name == "giou":
        np.testing.assert_allclose(np.asarray(values)[:3, :3], ref, rtol=1e-5, atol=1e-6)
        # identical points: no union and no enclosing area -> giou falls back to iou = 0
        assert float(values[4, 6]) == 0.0

    # Every box against itself, so every min and max is a tie: finite gradients, and for the
    # IoU zero ones for the normal boxes (their IoU with themselves is at its maximum, 1, and
    # they do not overlap the others; the exact gradient with PyTorch's ties is 0). jax 0.10's
    # derivative of a division leaves float32 rounding of about 1e-7 there, jax 0.12's exactly 0
    # (it is (dx - q dy) / y with q = x / y = 1, no longer dx / y - x dy / y**2). Gradient values:
    # test_gradients_match_finite_differences and test_gradients_at_ties_follow_pytorch.
    grads = jax.grad(lambda x: fn(x, boxes).sum())(boxes)
    assert np.isfinite(np.asarray(grads)).all()
    if name == "iou":
        assert np.abs(np.asarray(grads)[:3]).max() < 1e-5


@pytest.mark.parametrize("name", ["giou", "iou"])
def test_gradients_match_finite_differences(name):
    """The gradient with respect to boxes with positive area, against zero-area and padded
    boxes too, is the central finite difference of the NumPy GIoU above in float64, at boxes
    that overlap without sharing a coordinate (away from the kinks of min, max and clamp)."""
    rng = np.random.default_rng(5)
    targets = np.concatenate(
        [
            np.array(B.box_cxcywh_to_xyxy(jnp.asarray(random_cxcywh(rng, 4))), np.float64),
            _DEGENERATE,
        ]
    )
    shift = rng.choice([-1.0, 1.0], size=(4, 4)) * rng.uniform(0.01, 0.05, size=(4, 4))
    preds = targets[:4] + shift  # each overlaps its target
    preds = np.concatenate([preds, [[0.12, 0.16, 0.83, 0.91]]])  # holds the point and segments
    # the draw is away from kinks: no coordinate shared with a target, no width near 0 that
    # depends on the prediction (a zero-area target inside a prediction gives a width of
    # exactly 0 that does not)
    assert (np.abs(preds[:, None, :] - targets[None, :, :]) > 1e-3).all()
    widths = np.minimum(preds[:, None, 2:], targets[:, 2:]) - np.maximum(
        preds[:, None, :2], targets[:, :2]
    )  # intersection widths and heights before the clamp
    assert ((np.abs(widths) > 1e-3) | (widths == 0)).all()
    assert (widths > 0).all(axis=-1).sum() >= 4  # the normal pairs overlap

    index = 0 if name == "iou" else 1
    weights = rng.normal(size=(len(preds), len(targets)))

    def numpy_loss(x):
        return sum(
            weights[i, j] * _numpy_iou_giou(x[i], targets[j])[index]
            for i in range(len(x))
            for j in range(len(targets))
        )

    step = 1e-6
    expected = np.zeros_like(preds)
    for i in range(preds.shape[0]):
        for k in range(4):
            plus, minus = preds.copy(), preds.copy()
            plus[i, k] += step
            minus[i, k] -= step
            expected[i, k] = (numpy_loss(plus) - numpy_loss(minus)) / (2 * step)
    with jax.enable_x64(True):
        fn = _PAIRWISE[name]
        value, grads = jax.value_and_grad(lambda x: (fn(x, jnp.asarray(targets)) * weights).sum())(
            jnp.asarray(preds)
        )
    np.testing.assert_allclose(float(value), numpy_loss(preds), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grads), expected, rtol=1e-6, atol=1e-8)
    assert (np.abs(expected) > 1e-3).any(axis=-1).all()  # every prediction gets a gradient

    # the other way round: zero-area and padded predictions get finite gradients
    grads = jax.grad(lambda x: (fn(x, jnp.asarray(preds, jnp.float32)) * weights.T).sum())(
        jnp.asarray(targets, jnp.float32)
    )
    assert np.isfinite(np.asarray(grads)).all()


@pytest.mark.parametrize("name", ["giou", "iou"])
def test_gradients_at_ties_follow_pytorch(name):
    """At the kinks, hand-computed with PyTorch's conventions (torch.max / torch.min of equal
    arguments: half the gradient to each; torch.clamp(min=0) at 0: the full gradient)."""
    fn = _PAIRWISE[name]

    def grad(pred, target):
        return np.asarray(
            jax.grad(lambda x: fn(x, jnp.asarray([target], jnp.float32))[0, 0])(
                jnp.asarray([pred], jnp.float32)
            )[0]
        )

    # a box against itself: IoU and GIoU are at their maximum, 1; the gradient is 0
    np.testing.assert_allclose(grad([0.1, 0.2, 0.5, 0.7], [0.1, 0.2, 0.5, 0.7]), 0, atol=1e-6)
    # a zero-width prediction inside the target: the intersection width is clamped at exactly
    # 0, with gradient +-1 from x1 and x0 (half that with jnp.clip). The target's area is the
    # union and the enclosing area: IoU = GIoU = 0, gradient (-h, 0, h, 0) / 1 with h = 0.4
    np.testing.assert_allclose(
        grad([0.5, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]), [-0.4, 0, 0.4, 0], atol=1e-6
    )
    # touching boxes: inter = w * h with w = min(0.4, 0.8) - max(0.1, 0.4) = 0, h = 0.3;
    # union 0.36. dIoU/dx1 = h / union; the enclosing box, 0.7 x 0.7, moves with x0 and y0.
    pred, target = [0.1, 0.2, 0.4, 0.6], [0.4, 0.3, 0.8, 0.9]
    expected = np.array([0.0, 0.0, 0.3 / 0.36, 0.0])
    if name == "giou":
        # GIoU = IoU - 1 + union / enclosing: union = 0.12 + 0.24 - inter, enclosing = 0.49
        d_union = np.array([-0.4, -0.3, 0.4 - 0.3, 0.3])  # d area(pred) - d inter
        d_enclosing = np.array([-0.7, -0.7, 0.0, 0.0])  # the hull's x0 and y0 are the pred's
        expected = expected + d_union / 0.49 - 0.36 * d_enclosing / 0.49**2
    np.testing.assert_allclose(grad(pred, target), expected, rtol=1e-5, atol=1e-6)
