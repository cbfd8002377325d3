"""The contrastive denoising losses: no matching, each denoising query's target is known.

DINO (IDEA-Research/DINO `models/dino/dino.py`, `SetCriterion.forward` with `prep_for_dn`):
positive query k of group g reconstructs its box and class; negative queries and the padding
inside the used groups are "no object" (all-zero focal targets). Per decoder layer:

- `loss_ce_dn`: sigmoid focal loss (`focal_alpha`, `focal_gamma`; DINO's alpha 0.25, gamma 2)
  summed over the used denoising queries and classes, divided by the normaliser;
- `loss_bbox_dn`: L1 of cxcywh boxes summed over the positive queries with a real target,
  divided by the normaliser;
- `loss_giou_dn`: `1 - GIoU` summed over the same queries, divided by the normaliser.

Normaliser: `num_boxes * num_groups`, DINO's `num_boxes*scalar` (`scalar` = its number of
denoising groups, `num_boxes = max(boxes in the batch / world size, 1)`, the matching losses'
normaliser). It is the number of positive denoising queries (each box appears once per group),
so `loss_bbox_dn` and `loss_giou_dn` are means over the positive queries, and `loss_ce_dn`,
DINO's `sigmoid_focal_loss(...) * num_dn` (mean over queries, sum, / normaliser, times the
query count), is the focal sum over the queries by the same count. `num_boxes` is an input as
in `set_criterion`. The static padding slots (`used` False) do not exist in DINO and count
nothing. DINO's `cardinality_error_dn` (logging only) is not computed.

Keys: the last layer `loss_ce_dn, loss_bbox_dn, loss_giou_dn`; with `config.auxiliary_loss`,
layer `i = 0 .. layers - 2` as `loss_ce_dn_{i}` and so on (DINO's names); the weights are the
`LossConfig` class / bbox / GIoU coefficients of the matching losses (as DINO's
`weight_dict`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deformable_detr_jax.boxes import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from deformable_detr_jax.criterion.denoising import DenoisingGroups
from deformable_detr_jax.criterion.loss import LossConfig, num_boxes_from_mask, sigmoid_focal_terms

DN_LOSS_KEYS = ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn")


def denoising_targets(
    groups: DenoisingGroups, labels: jax.Array, boxes: jax.Array, num_labels: int, dtype
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per denoising query: class one-hot, box target, box weight and query weight.

    Returns `onehot (bs, num_dn, num_labels)` (zeros for negatives and padding),
    `box_target (bs, num_dn, 4)` (a fixed valid box 0.5 where no box loss applies),
    `box_weight (bs, num_dn)` (1 on positives with a real target) and `query_weight (1, num_dn)`
    (1 on the used slots).
    """
    box_weight = groups.valid & groups.positive[None, :]
    classes = jnp.take_along_axis(labels.astype(jnp.int32), groups.target_index, 1)
    # class id num_labels (no object) one-hots to zeros
    classes = jnp.where(box_weight, classes, num_labels)
    onehot = jax.nn.one_hot(classes, num_labels, dtype=dtype)
    box_target = jnp.take_along_axis(boxes.astype(dtype), groups.target_index[..., None], 1)
    box_target = jnp.where(box_weight[..., None], box_target, 0.5)
    return onehot, box_target, box_weight.astype(dtype), groups.used[None, :].astype(dtype)


def denoising_layer_losses(
    logits: jax.Array,
    pred_boxes: jax.Array,
    targets: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    normaliser: jax.Array,
    config: LossConfig,
) -> dict[str, jax.Array]:
    """One layer: `logits (bs, num_dn, num_labels)`, `pred_boxes (bs, num_dn, 4)` cxcywh,
    `denoising_targets`' tuple -> the unweighted `DN_LOSS_KEYS` (module docstring)."""
    onehot, box_target, box_weight, query_weight = targets
    focal = sigmoid_focal_terms(logits, onehot, config.focal_alpha, config.focal_gamma)
    loss_ce = (focal.sum(-1) * query_weight).sum() / normaliser
    # no box loss: a fixed valid box on both sides, then weighted out
    src = jnp.where(box_weight[..., None] > 0, pred_boxes, 0.5)
    loss_bbox = (jnp.abs(src - box_target).sum(-1) * box_weight).sum() / normaliser
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(box_target))
    loss_giou = ((1 - giou) * box_weight).sum() / normaliser
    return {"loss_ce_dn": loss_ce, "loss_bbox_dn": loss_bbox, "loss_giou_dn": loss_giou}


def denoising_criterion(
    logits: jax.Array,
    pred_boxes: jax.Array,
    groups: DenoisingGroups,
    labels: jax.Array,
    boxes: jax.Array,
    mask: jax.Array,
    config: LossConfig,
    *,
    num_boxes: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted total and the unweighted denoising losses of every decoder layer. Pure; jit it.

    Args:
      logits: `(layers, bs, num_dn, num_labels)`, pred_boxes: `(layers, bs, num_dn, 4)` cxcywh:
        the decoder's outputs on the denoising slots, layer by layer (the last is the final).
      groups: the `DenoisingGroups` the decoder was given.
      labels, boxes, mask: the padded targets the groups were built from.
      config: `LossConfig` (coefficients, focal alpha / gamma, `auxiliary_loss`).
      num_boxes: as `set_criterion`'s; default the valid boxes in `mask`. Clamped at >= 1.
    """
    layers, bs, num_dn, num_labels = logits.shape
    if pred_boxes.shape != (layers, bs, num_dn, 4) or groups.valid.shape != (bs, num_dn):
        raise ValueError(
            "expected logits (layers, bs, num_dn, num_labels), pred_boxes (layers, bs, num_dn, "
            f"4) and groups of (bs, num_dn); got {logits.shape=} {pred_boxes.shape=} "
            f"{groups.valid.shape=}"
        )
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    logits, pred_boxes = logits.astype(dtype), pred_boxes.astype(dtype)
    if num_boxes is None:
        num_boxes = num_boxes_from_mask(mask.astype(bool))
    num_boxes = jnp.maximum(jnp.asarray(num_boxes, dtype), 1)
    normaliser = num_boxes * jnp.maximum(groups.num_groups, 1).astype(dtype)
    targets = denoising_targets(groups, labels, boxes, num_labels, dtype)
    weights = {
        "loss_ce_dn": config.class_loss_coefficient,
        "loss_bbox_dn": config.bbox_loss_coefficient,
        "loss_giou_dn": config.giou_loss_coefficient,
    }
    losses = denoising_layer_losses(logits[-1], pred_boxes[-1], targets, normaliser, config)
    weighted = dict(weights)
    if config.auxiliary_loss and layers > 1:

        def one_layer(layer_logits, layer_boxes):
            return denoising_layer_losses(layer_logits, layer_boxes, targets, normaliser, config)

        # (layers - 1, bs, num_dn, ...) mapped over axis 0 -> {key: (layers - 1,)}
        aux = jax.vmap(one_layer)(logits[:-1], pred_boxes[:-1])
        for i in range(layers - 1):
            for key in DN_LOSS_KEYS:
                losses[f"{key}_{i}"] = aux[key][i]
            weighted.update({f"{k}_{i}": w for k, w in weights.items()})
    total = sum(losses[k] * w for k, w in weighted.items())
    return total, losses
