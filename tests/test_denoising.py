"""Contrastive denoising: the losses against an independent float64 NumPy version of DINO's
formula (which must tell a wrong normaliser or swapped positives / negatives apart), one
compiled program for every box count, the attention mask's blocks, the noise's bounds and the
static padding slots (against RT-DETR's construction: tests/test_denoising_vs_transformers.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax.criterion.denoising import (
    contrastive_denoising_groups,
    denoising_capacity,
)
from deformable_detr_jax.criterion.denoising_loss import DN_LOSS_KEYS, denoising_criterion
from deformable_detr_jax.criterion.loss import LossConfig

NUM_LABELS = 4
NUM_QUERIES = 6
LAYERS = 3
MAX_BOXES = 6
NUM_DN = 11  # counts [3, 0, 5, 1]: M 5, 2 groups, 20 of 22 slots used
COUNTS = [3, 0, 5, 1]
STATIC = dict(num_denoising_queries=NUM_DN, num_queries=NUM_QUERIES, num_labels=NUM_LABELS)


def _targets(counts, seed):
    """Padded targets, real boxes at random slots, garbage in the padding."""
    rng = np.random.default_rng(seed)
    bs = len(counts)
    mask = np.zeros((bs, MAX_BOXES), bool)
    for b, n in enumerate(counts):
        mask[b, rng.permutation(MAX_BOXES)[:n]] = True
    labels = np.where(mask, rng.integers(0, NUM_LABELS, (bs, MAX_BOXES)), NUM_LABELS + 2)
    boxes = np.where(mask[..., None], _boxes(rng, bs, MAX_BOXES), np.nan)
    return labels, boxes, mask


def _boxes(rng, *lead):
    centers = rng.uniform(0.15, 0.85, (*lead, 2))
    room = 2 * np.minimum(centers, 1 - centers)
    return np.concatenate([centers, room * rng.uniform(0.1, 0.95, (*lead, 2))], -1)


def _predictions(bs, seed):
    rng = np.random.default_rng(seed)
    num_dn = denoising_capacity(NUM_DN, MAX_BOXES)
    logits = rng.normal(scale=2.0, size=(LAYERS, bs, num_dn, NUM_LABELS))
    return logits, _boxes(rng, LAYERS, bs, num_dn)


# ----------------------------------------------------------------------------- NumPy oracle


def _focal(x, t, alpha=0.25, gamma=2.0):
    p = 1 / (1 + np.exp(-x))
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma


def _giou(a, b):
    a = np.r_[a[:2] - a[2:] / 2, a[:2] + a[2:] / 2]
    b = np.r_[b[:2] - b[2:] / 2, b[:2] + b[2:] / 2]
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
    hull = np.prod(np.maximum(a[2:], b[2:]) - np.minimum(a[:2], b[:2]))
    return inter / union - (hull - union) / hull


def numpy_dn_losses(logits, pred_boxes, labels, boxes, mask, *, groups_in_norm=True, swap=False):
    """DINO's denoising losses, query by query, float64: group g of size 2M holds image b's
    k-th real box at g 2M + k (positive) and g 2M + M + k (negative)."""
    counts = mask.sum(1)
    most = counts.max()
    groups = max(NUM_DN // most, 1)
    norm = max(counts.sum(), 1) * (groups if groups_in_norm else 1)
    out = {}
    for layer in range(logits.shape[0]):
        ce = l1 = giou = 0.0
        for b in range(mask.shape[0]):
            real = np.flatnonzero(mask[b])
            for q in range(2 * most * groups):
                k = q % (2 * most)
                positive = (k >= most) if swap else (k < most)
                k = k % most
                onehot = np.zeros(NUM_LABELS)
                if positive and k < counts[b]:
                    t = real[k]
                    onehot[labels[b, t]] = 1
                    l1 += np.abs(pred_boxes[layer, b, q] - boxes[b, t]).sum()
                    giou += 1 - _giou(pred_boxes[layer, b, q], boxes[b, t])
                ce += _focal(logits[layer, b, q], onehot).sum()
        suffix = "" if layer == logits.shape[0] - 1 else f"_{layer}"
        out.update(
            {
                f"loss_ce_dn{suffix}": ce / norm,
                f"loss_bbox_dn{suffix}": l1 / norm,
                f"loss_giou_dn{suffix}": giou / norm,
            }
        )
    return out


# ----------------------------------------------------------------------------- the jitted side


def _make_step():
    """A freshly jitted groups + loss function and the list its traces append to."""
    traces = []

    @functools.partial(jax.jit, static_argnames=("config",))
    def step(key, labels, boxes, mask, logits, pred_boxes, config):
        traces.append(1)
        groups = contrastive_denoising_groups(key, labels, boxes, mask, **STATIC)
        losses = denoising_criterion(logits, pred_boxes, groups, labels, boxes, mask, config)
        return groups, *losses

    return step, traces


_STEP, _ = _make_step()


def _run(counts, seed, config=None, x64=True, step=_STEP):
    config = config or LossConfig(num_labels=NUM_LABELS)
    labels, boxes, mask = _targets(counts, seed)
    logits, pred_boxes = _predictions(len(counts), seed + 1)
    with jax.enable_x64(x64):
        out = step(jax.random.key(seed), labels, boxes, mask, logits, pred_boxes, config)
        out = jax.tree.map(np.asarray, out)
    return out, (logits, pred_boxes, labels, boxes, mask)


def test_loss_equals_numpy_float64():
    config = LossConfig(num_labels=NUM_LABELS)
    (groups, total, losses), (logits, pred_boxes, labels, boxes, mask) = _run(COUNTS, 0, config)
    ref = numpy_dn_losses(logits, pred_boxes, labels, boxes, mask)
    assert set(losses) == set(ref) and len(ref) == 3 * LAYERS
    for key, value in ref.items():
        assert value > 0, key
        np.testing.assert_allclose(losses[key], value, rtol=1e-12, err_msg=key)
    weights = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}  # LossConfig's defaults
    expected = sum(v * weights[k.split("_dn")[0]] for k, v in ref.items())
    np.testing.assert_allclose(total, expected, rtol=1e-12)
    assert int(groups.num_groups) == 2 and groups.used.sum() == 20 and groups.used.size == 22


@pytest.mark.parametrize("variant", [{"groups_in_norm": False}, {"swap": True}])
def test_the_oracle_tells_a_wrong_variant_apart(variant):
    (_, _, losses), (logits, pred_boxes, labels, boxes, mask) = _run(COUNTS, 0)
    wrong = numpy_dn_losses(logits, pred_boxes, labels, boxes, mask, **variant)
    for key in DN_LOSS_KEYS:
        assert not np.allclose(losses[key], wrong[key], rtol=1e-3), key


def test_no_auxiliary_loss_keeps_the_last_layer():
    config = LossConfig(num_labels=NUM_LABELS, auxiliary_loss=False)
    (_, total, losses), x = _run(COUNTS, 0, config)
    ref = numpy_dn_losses(*x)
    assert set(losses) == set(DN_LOSS_KEYS)
    np.testing.assert_allclose(
        total,
        2 * ref["loss_ce_dn"] + 5 * ref["loss_bbox_dn"] + 2 * ref["loss_giou_dn"],
        rtol=1e-12,
    )


def test_one_program_for_every_box_count():
    step, traces = _make_step()
    shapes = set()
    for seed, counts in enumerate([COUNTS, [6, 1, 0, 2], [0, 0, 0, 0], [1, 1, 1, 1]]):
        (groups, total, losses), x = _run(counts, 10 + seed, x64=False, step=step)
        shapes.add(tuple(a.shape for a in groups))
        if sum(counts) == 0:  # no box: no group, every loss 0
            assert int(groups.num_groups) == 0 and not groups.used.any()
            assert all(float(v) == 0 for v in losses.values())
        else:
            ref = numpy_dn_losses(*x)
            for key, value in ref.items():
                np.testing.assert_allclose(losses[key], value, rtol=2e-5, err_msg=key)
    assert len(traces) == 1 and len(shapes) == 1


def _expected_blocked(num_dn, used_slots, size):
    """The attention mask written out: True = blocked."""
    total = num_dn + NUM_QUERIES
    blocked = np.ones((total, total), bool)
    for q in range(total):
        for k in range(total):
            if q >= num_dn:  # matching: only matching
                blocked[q, k] = k < num_dn
            elif q >= used_slots:  # padding slot: only itself
                blocked[q, k] = q != k
            else:  # its group and the matching queries
                blocked[q, k] = k < num_dn and (k >= used_slots or k // size != q // size)
    return blocked


@pytest.mark.parametrize("counts", [COUNTS, [6, 1, 0, 2], [0, 0, 0, 0]])
def test_attention_mask_blocks(counts):
    (groups, _, _), _ = _run(counts, 3, x64=False)
    num_dn = denoising_capacity(NUM_DN, MAX_BOXES)
    most = max(counts)
    used_slots = 2 * most * max(NUM_DN // max(most, 1), 1) if most else 0
    expected = _expected_blocked(num_dn, used_slots, 2 * max(most, 1))
    np.testing.assert_array_equal(groups.attention_mask, expected)
    assert not groups.attention_mask.all(-1).any()  # every query sees something


def test_noise_bounds_and_padding_slots():
    labels, boxes, mask = _targets(COUNTS, 5)
    groups = contrastive_denoising_groups(
        jax.random.key(5), labels, boxes, mask, label_noise=1.0, box_noise=1.0, **STATIC
    )
    g = jax.tree.map(np.asarray, groups)
    clean = np.take_along_axis(boxes, g.target_index[..., None], 1)

    def corners(b):  # (..., 4) cxcywh -> xyxy
        return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)

    # each corner's move in units of its half width / height
    shift = np.abs(corners(g.boxes) - corners(clean)) / np.tile(clean[..., 2:] / 2, 2)
    noised = corners(g.boxes)
    inside = (noised > 1e-6) & (noised < 1 - 1e-6)  # not clipped
    pos = g.valid & g.positive[None]
    neg = g.valid & ~g.positive[None]
    assert (shift[pos] <= 1 + 1e-5).all()
    assert (shift[neg][inside[neg]] >= 1 - 1e-5).all() and (shift[neg] <= 2 + 1e-5).all()
    # label_noise 1: about half the real queries change class (a flip may redraw the same)
    changed = g.labels != np.take_along_axis(labels, g.target_index, 1)
    assert 0.1 < changed[g.valid].mean() < 0.7
    assert (g.labels[~g.valid] == NUM_LABELS).all() and (g.boxes[~g.valid] == 0).all()
    assert np.isfinite(g.box_logits).all()


def test_gradients_reach_only_used_slots():
    labels, boxes, mask = _targets(COUNTS, 7)
    logits, pred_boxes = _predictions(len(COUNTS), 8)
    config = LossConfig(num_labels=NUM_LABELS)
    groups = contrastive_denoising_groups(jax.random.key(7), labels, boxes, mask, **STATIC)

    def total(logits, pred_boxes):
        return denoising_criterion(logits, pred_boxes, groups, labels, boxes, mask, config)[0]

    grad_logits, grad_boxes = jax.jit(jax.grad(total, argnums=(0, 1)))(
        jnp.asarray(logits, jnp.float32), jnp.asarray(pred_boxes, jnp.float32)
    )
    used = np.asarray(groups.used)
    box_weight = np.asarray(groups.valid & groups.positive[None])
    assert np.isfinite(grad_logits).all() and np.isfinite(grad_boxes).all()
    assert (np.asarray(grad_logits)[:, :, ~used] == 0).all()
    assert (np.abs(np.asarray(grad_logits)[:, :, used]).sum(-1) > 0).all()
    assert (np.asarray(grad_boxes)[:, ~box_weight] == 0).all()


def test_zero_denoising_queries_is_an_error():
    with pytest.raises(ValueError, match="denoising off"):
        denoising_capacity(0, MAX_BOXES)
