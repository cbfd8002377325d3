"""The set criterion: the scipy matcher back end, the encoder loss against an independent
NumPy version of the original formula, presets and target checks (against transformers'
loss, values and gradients: tests/test_loss_vs_transformers.py)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from deformable_detr_jax.criterion.loss import (
    LossConfig,
    loss_from_outputs,
    set_criterion,
    validate_targets,
)

NUM_LABELS = 6
NUM_QUERIES = 20
DECODER_LAYERS = 3
COUNTS = [3, 0, 7, 1]  # targets per image, one image with none
MAX_BOXES = 8


def loss_inputs(seed, len_v=30):
    rng = np.random.default_rng(seed)
    bs = len(COUNTS)

    def boxes(*lead):
        # boxes inside the image: size up to twice the distance to the nearest border
        centers = rng.uniform(0.15, 0.85, (*lead, 2))
        room = 2 * np.minimum(centers, 1 - centers)
        return np.concatenate([centers, room * rng.uniform(0.1, 0.95, (*lead, 2))], -1)

    mask = np.arange(MAX_BOXES)[None] < np.asarray(COUNTS)[:, None]
    # garbage in the padded slots: it must not reach the loss
    labels = np.where(mask, rng.integers(0, NUM_LABELS, (bs, MAX_BOXES)), NUM_LABELS + 5)
    target_boxes = np.where(mask[..., None], boxes(bs, MAX_BOXES), np.nan)
    return {
        "intermediate_logits": rng.normal(
            scale=2.0, size=(bs, DECODER_LAYERS, NUM_QUERIES, NUM_LABELS)
        ),
        "intermediate_boxes": boxes(bs, DECODER_LAYERS, NUM_QUERIES),
        "labels": labels,
        "boxes": target_boxes,
        "mask": mask,
        "enc_outputs_class": rng.normal(scale=2.0, size=(bs, len_v, NUM_LABELS)),
        "enc_outputs_coord_logits": rng.normal(size=(bs, len_v, 4)),
    }


@functools.cache
def _jitted_loss(config):
    """value_and_grad w.r.t. the four prediction arrays, compiled once per config."""

    def total(logits, pred_boxes, intermediate_logits, intermediate_boxes, labels, boxes, mask):
        return set_criterion(
            logits,
            pred_boxes,
            labels,
            boxes,
            mask,
            config,
            intermediate_logits=intermediate_logits,
            intermediate_boxes=intermediate_boxes,
        )

    return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2, 3), has_aux=True))


def jax_loss(x, config, dtype):
    args = [
        jnp.asarray(x["intermediate_logits"][:, -1], dtype),
        jnp.asarray(x["intermediate_boxes"][:, -1], dtype),
        jnp.asarray(x["intermediate_logits"], dtype),
        jnp.asarray(x["intermediate_boxes"], dtype),
        jnp.asarray(x["labels"], jnp.int32),
        jnp.asarray(x["boxes"], dtype),
        jnp.asarray(x["mask"]),
    ]
    (loss, loss_dict), grads = _jitted_loss(config)(*args)
    return loss, loss_dict, grads


def test_scipy_backend_gives_the_same_loss():
    x = loss_inputs(seed=21)
    config = LossConfig.preset("original", NUM_LABELS, encoder_loss=False)
    loss_jax, dict_jax, grads_jax = jax_loss(x, config, jnp.float32)
    loss_sp, dict_sp, grads_sp = jax_loss(
        x, dataclasses.replace(config, matcher_backend="scipy"), jnp.float32
    )
    np.testing.assert_allclose(loss_jax, loss_sp, rtol=1e-6)
    for key in dict_jax:
        np.testing.assert_allclose(dict_jax[key], dict_sp[key], rtol=1e-6, err_msg=key)
    for got, ref in zip(grads_jax, grads_sp):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- encoder loss


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np_xyxy(b):
    return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def _np_giou(a, b):
    """Pairwise GIoU of (n, 4) and (m, 4) xyxy boxes."""
    a, b = a[:, None], b[None]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    enc = np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2])
    enc_area = enc[..., 0] * enc[..., 1]
    return inter / union - (enc_area - union) / enc_area


def _np_encoder_losses(x, class_cost, bbox_cost, giou_cost, alpha=0.25):
    """fundamentalvision SetCriterion on `enc_outputs` with `bin_targets` (all labels 0)."""
    logits = x["enc_outputs_class"]
    pred = _np_sigmoid(x["enc_outputs_coord_logits"])
    num_boxes = max(sum(COUNTS), 1)
    onehot = np.zeros_like(logits)
    l1, giou_loss = 0.0, 0.0
    for b, n in enumerate(COUNTS):
        if n == 0:
            continue
        prob = _np_sigmoid(logits[b, :, 0])[:, None]  # class 0 for every target
        pos = 0.25 * (1 - prob) ** 2 * -np.log(prob + 1e-8)
        neg = 0.75 * prob**2 * -np.log(1 - prob + 1e-8)
        tgt = x["boxes"][b, :n]
        cost = (
            bbox_cost * np.abs(pred[b][:, None] - tgt[None]).sum(-1)
            + class_cost * (pos - neg)
            - giou_cost * _np_giou(_np_xyxy(pred[b]), _np_xyxy(tgt))
        )
        rows, cols = scipy.optimize.linear_sum_assignment(cost)
        onehot[b, rows, 0] = 1
        l1 += np.abs(pred[b, rows] - tgt[cols]).sum()
        giou_loss += (1 - np.diag(_np_giou(_np_xyxy(pred[b, rows]), _np_xyxy(tgt[cols])))).sum()
    prob = _np_sigmoid(logits)
    ce = np.logaddexp(0, logits) - logits * onehot
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    focal = (alpha * onehot + (1 - alpha) * (1 - onehot)) * ce * (1 - p_t) ** 2
    loss_ce = focal.mean(1).sum() / num_boxes * logits.shape[1]
    return {
        "loss_ce_enc": loss_ce,
        "loss_bbox_enc": l1 / num_boxes,
        "loss_giou_enc": giou_loss / num_boxes,
    }


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Outputs:
    """Stand-in for the model's output pytree (same attribute names)."""

    logits: jnp.ndarray
    pred_boxes: jnp.ndarray
    intermediate_logits: jnp.ndarray
    intermediate_boxes: jnp.ndarray
    enc_outputs_class: jnp.ndarray
    enc_outputs_coord_logits: jnp.ndarray


def test_encoder_loss_equals_numpy_original_formula():
    x = loss_inputs(seed=8, len_v=45)
    # an invalid proposal, as the original marks them: coord logits +inf -> box (1, 1, 1, 1)
    x["enc_outputs_coord_logits"][0, 4] = np.inf
    config = LossConfig.preset("original", NUM_LABELS)
    with jax.enable_x64(True):
        outputs = _Outputs(
            logits=jnp.asarray(x["intermediate_logits"][:, -1]),
            pred_boxes=jnp.asarray(x["intermediate_boxes"][:, -1]),
            intermediate_logits=jnp.asarray(x["intermediate_logits"]),
            intermediate_boxes=jnp.asarray(x["intermediate_boxes"]),
            enc_outputs_class=jnp.asarray(x["enc_outputs_class"]),
            enc_outputs_coord_logits=jnp.asarray(x["enc_outputs_coord_logits"]),
        )
        labels, boxes, mask = (jnp.asarray(x[k]) for k in ("labels", "boxes", "mask"))

        def total(outputs):
            return loss_from_outputs(outputs, labels, boxes, mask, config)

        (loss, loss_dict), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(outputs)
    expected = _np_encoder_losses(x, class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)
    for key, value in expected.items():
        np.testing.assert_allclose(float(loss_dict[key]), value, rtol=1e-9, err_msg=key)
    # original weights (cls 2, bbox 5, giou 2) on the final, auxiliary and encoder losses
    weights = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    suffixes = ["", "_0", "_1", "_enc"]
    weighted = sum(w * float(loss_dict[k + s]) for k, w in weights.items() for s in suffixes)
    np.testing.assert_allclose(float(loss), weighted, rtol=1e-12)
    assert bool(loss_dict["is_finite"])
    for leaf in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(leaf)).all()
    assert np.abs(np.asarray(grads.enc_outputs_class)).max() > 0


# ----------------------------------------------------------------------------- config, flags


def test_presets():
    original = LossConfig.preset("original", 91)
    assert (
        original.class_cost,
        original.class_loss_coefficient,
        original.bbox_loss_coefficient,
    ) == (2, 2, 5)
    assert original.auxiliary_loss and original.encoder_loss
    assert LossConfig(num_labels=91) == original  # the training default
    with pytest.raises(ValueError, match="preset"):
        LossConfig.preset("detr", 7)


def test_non_finite_loss_is_flagged():
    x = loss_inputs(seed=4)
    x["intermediate_logits"][2, -1, 5, 1] = np.nan
    config = LossConfig.preset("transformers", NUM_LABELS)
    loss, loss_dict, _ = jax_loss(x, config, jnp.float32)
    assert not bool(loss_dict["is_finite"]) and not np.isfinite(float(loss))
    x = loss_inputs(seed=4)
    loss, loss_dict, _ = jax_loss(x, config, jnp.float32)
    assert bool(loss_dict["is_finite"]) and float(loss) > 0


def test_auxiliary_loss_needs_intermediate_outputs():
    x = loss_inputs(seed=1)
    with pytest.raises(ValueError, match="intermediate"):
        set_criterion(
            jnp.asarray(x["intermediate_logits"][:, -1]),
            jnp.asarray(x["intermediate_boxes"][:, -1]),
            jnp.asarray(x["labels"]),
            jnp.asarray(x["boxes"]),
            jnp.asarray(x["mask"]),
            LossConfig(num_labels=NUM_LABELS),
        )


@pytest.mark.parametrize(
    "image,box,value,label,message",
    [
        (2, 3, [0.5, np.nan, 0.2, 0.2], 1, "not finite"),
        (0, 1, [0.5, 0.5, -0.1, 0.2], 1, "negative width"),
        (2, 0, [1.3, 0.5, 0.1, 0.1], 1, "outside \\[0, 1\\]"),
        (3, 0, [0.95, 0.5, 0.3, 0.1], 1, "extends outside"),
        (0, 2, [0.5, 0.5, 0.2, 0.2], NUM_LABELS, "class id"),
        (2, 6, [0.5, 0.5, 0.2, 0.2], -1, "class id"),
    ],
)
def test_validate_targets_names_the_bad_box(image, box, value, label, message):
    x = loss_inputs(seed=2)
    validate_targets(x["labels"], x["boxes"], x["mask"], NUM_LABELS)  # valid boxes pass
    # garbage in padded slots is ignored
    x["boxes"][1, 0] = np.nan
    x["labels"][1, 0] = 99
    validate_targets(x["labels"], x["boxes"], x["mask"], NUM_LABELS)
    x["boxes"][image, box] = value
    x["labels"][image, box] = label
    with pytest.raises(ValueError, match=message) as error:
        validate_targets(x["labels"], x["boxes"], x["mask"], NUM_LABELS)
    assert f"box {box} of image {image}" in str(error.value)
