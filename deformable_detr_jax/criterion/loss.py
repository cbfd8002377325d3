"""The Deformable DETR set criterion: Hungarian matching, sigmoid focal, L1 and GIoU losses.

References followed:

- transformers `loss/loss_deformable_detr.py` (`DeformableDetrForObjectDetectionLoss`,
  `DeformableDetrImageLoss`) and `loss/loss_for_object_detection.py` (`ImageLoss`,
  `sigmoid_focal_loss`): the per-layer losses and their normalisation, the `loss_dict` keys
  (`loss_ce`, `loss_bbox`, `loss_giou`, `cardinality_error`, the same with `_{i}` for the
  auxiliary decoder layers `i = 0 .. decoder_layers - 2`) and the weighted total
  (`loss_ce` weight 1 there, `class_loss_coefficient` here).
- fundamentalvision/Deformable-DETR `models/deformable_detr.py` (`SetCriterion`, `build`):
  the class loss weight `cls_loss_coef` and the two-stage encoder loss. Its `forward` copies
  the targets with every label set to 0 (`bin_targets`), matches the encoder outputs
  (`pred_logits = enc_outputs_class` over all `num_labels` channels, `pred_boxes =
  sigmoid(enc_outputs_coord_unact)`) against them with the same matcher, and computes the
  same losses with the same `num_boxes`, keys suffixed `_enc`; `build` weighs them like the
  final layer (inside `if args.aux_loss`; here the `encoder_loss` flag).

Normalisation (both references): `num_boxes = max(total valid boxes / world size, 1)`;
`loss_ce = focal.mean(over queries).sum() / num_boxes * num_queries`; L1 and GIoU are sums
over matched pairs divided by `num_boxes`. `num_boxes` is an input: under a global `jit`
over a sharded batch, the default (valid boxes of the whole batch) is already the global
count; under `shard_map`, pass `psum(mask.sum()) / num_devices` and average the gradients.

Not reproduced: the original's `class_error` (a logging-only accuracy). `cardinality_error`
is transformers' (sigmoid max > 0.5) for every layer, including `_enc`.

Targets are padded: `labels (bs, max_boxes)` int, `boxes (bs, max_boxes, 4)` cxcywh in
[0, 1], `mask (bs, max_boxes)` bool. Check them on the host with `validate_targets`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deformable_detr_jax.box_format import cxcywh_to_xyxy
from deformable_detr_jax.boxes import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from deformable_detr_jax.criterion.matcher import hungarian_match

LOSS_KEYS = ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The numbers the criterion needs. Default values: the "original" preset.

    `class_cost`, `bbox_cost`, `giou_cost` weigh the matching cost; the `*_loss_coefficient`
    fields weigh the losses in the total. `encoder_loss` adds the two-stage `_enc` losses
    when encoder outputs are given. `matcher_backend` is `"jax"` or `"scipy"`.
    """

    num_labels: int
    class_cost: float = 2.0
    bbox_cost: float = 5.0
    giou_cost: float = 2.0
    class_loss_coefficient: float = 2.0
    bbox_loss_coefficient: float = 5.0
    giou_loss_coefficient: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    auxiliary_loss: bool = True
    encoder_loss: bool = True
    matcher_backend: str = "jax"

    @classmethod
    def preset(cls, name: str, num_labels: int, **overrides: Any) -> LossConfig:
        """Preset `"original"` (fundamentalvision `main.py`) or `"transformers"` (its defaults)."""
        if name not in PRESETS:
            raise ValueError(f"unknown loss preset {name!r}; expected one of {tuple(PRESETS)}")
        return dataclasses.replace(cls(num_labels=num_labels, **PRESETS[name]), **overrides)

    @classmethod
    def from_model_config(
        cls, config: Any, preset: str | None = "original", **overrides: Any
    ) -> LossConfig:
        """Build from a model config (transformers-style attribute names, read with getattr).

        With a `preset`, the loss numbers come from the preset and only `num_labels` from
        `config`. With `preset=None`, every field `config` has by the same name is read
        (`num_labels, class_cost, bbox_cost, giou_cost, bbox_loss_coefficient,
        giou_loss_coefficient, focal_alpha, auxiliary_loss`, and `class_loss_coefficient` /
        `encoder_loss` if present); the rest come from the "transformers" preset.
        """
        num_labels = int(config.num_labels)
        if preset is not None:
            return cls.preset(preset, num_labels, **overrides)
        base = cls.preset("transformers", num_labels)
        values = {
            field.name: getattr(config, field.name)
            for field in dataclasses.fields(cls)
            if field.name != "num_labels" and hasattr(config, field.name)
        }
        return dataclasses.replace(base, **{**values, **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # fundamentalvision/Deformable-DETR main.py: set_cost_class 2, set_cost_bbox 5,
    # set_cost_giou 2, cls/bbox/giou_loss_coef 2/5/2, focal_alpha 0.25, aux_loss on.
    "original": {
        "class_cost": 2.0,
        "bbox_cost": 5.0,
        "giou_cost": 2.0,
        "class_loss_coefficient": 2.0,
        "bbox_loss_coefficient": 5.0,
        "giou_loss_coefficient": 2.0,
        "focal_alpha": 0.25,
        "auxiliary_loss": True,
        "encoder_loss": True,
    },
    # transformers DeformableDetrConfig defaults; loss_ce weight 1; no encoder loss.
    "transformers": {
        "class_cost": 1.0,
        "bbox_cost": 5.0,
        "giou_cost": 2.0,
        "class_loss_coefficient": 1.0,
        "bbox_loss_coefficient": 5.0,
        "giou_loss_coefficient": 2.0,
        "focal_alpha": 0.25,
        "auxiliary_loss": False,
        "encoder_loss": False,
    },
}


# ----------------------------------------------------------------------------- pieces


def sigmoid_focal_terms(
    logits: jnp.ndarray, targets: jnp.ndarray, alpha: float = 0.25, gamma: float = 2.0
) -> jnp.ndarray:
    """RetinaNet focal loss per element, unreduced: `(...)` logits and {0, 1} targets -> `(...)`."""
    prob = jax.nn.sigmoid(logits)
    # binary_cross_entropy_with_logits, written as torch does
    ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def sigmoid_focal_loss(
    logits: jnp.ndarray,
    targets: jnp.ndarray,
    num_boxes: jnp.ndarray,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> jnp.ndarray:
    """RetinaNet focal loss, reduced as the reference: mean over axis 1, sum, / num_boxes.

    Args:
      logits, targets: `(bs, num_queries, num_labels)`; targets in {0, 1}.
    """
    return sigmoid_focal_terms(logits, targets, alpha, gamma).mean(1).sum() / num_boxes


def num_boxes_from_mask(mask: jnp.ndarray) -> jnp.ndarray:
    """Number of valid target boxes in the batch (float32), before the clamp at 1."""
    return mask.astype(jnp.float32).sum()


def _matched_targets_onehot(query_index, matched, labels, num_queries, num_labels, dtype):
    """`(bs, num_queries, num_labels)` one-hot of each query's matched class (zeros if none)."""
    bs = labels.shape[0]
    # unmatched targets write to the out-of-range query `num_queries` (dropped)
    target = jnp.where(matched, query_index, num_queries)
    classes = jnp.full((bs, num_queries), num_labels, jnp.int32)
    classes = classes.at[jnp.arange(bs)[:, None], target].set(labels.astype(jnp.int32), mode="drop")
    # class id `num_labels` (no object) one-hots to all zeros
    return jax.nn.one_hot(classes, num_labels, dtype=dtype)


def layer_losses(
    logits: jnp.ndarray,
    pred_boxes: jnp.ndarray,
    labels: jnp.ndarray,
    boxes: jnp.ndarray,
    mask: jnp.ndarray,
    num_boxes: jnp.ndarray,
    config: LossConfig,
) -> dict[str, jnp.ndarray]:
    """Match one layer's predictions and compute `loss_ce, loss_bbox, loss_giou, cardinality_error`.

    Args:
      logits: `(bs, num_queries, num_labels)`; pred_boxes: `(bs, num_queries, 4)` cxcywh.
      labels, boxes, mask: targets `(bs, max_boxes)`, `(bs, max_boxes, 4)`, `(bs, max_boxes)`.
      num_boxes: scalar normaliser, already clamped at >= 1.
    """
    _, num_queries, num_labels = logits.shape
    mask = mask.astype(bool)
    # losses in at least float32 (bfloat16 heads are upcast; float64 stays float64)
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    logits, pred_boxes = logits.astype(dtype), pred_boxes.astype(dtype)
    with jax.named_scope("matcher"):
        query_index, matched = hungarian_match(
            logits,
            pred_boxes,
            labels,
            boxes,
            mask,
            class_cost=config.class_cost,
            bbox_cost=config.bbox_cost,
            giou_cost=config.giou_cost,
            backend=config.matcher_backend,
        )
    onehot = _matched_targets_onehot(
        query_index, matched, labels, num_queries, num_labels, logits.dtype
    )
    loss_ce = (
        sigmoid_focal_loss(logits, onehot, num_boxes, config.focal_alpha, config.focal_gamma)
        * num_queries
    )

    # (bs, num_queries, 4) -> (bs, max_boxes, 4): the prediction matched to each target
    src = jnp.take_along_axis(pred_boxes, query_index[..., None], axis=1)
    # padded / unmatched pairs: a fixed valid box on both sides, then weighted out
    weight = matched.astype(pred_boxes.dtype)
    src = jnp.where(matched[..., None], src, 0.5)
    tgt = jnp.where(matched[..., None], boxes.astype(pred_boxes.dtype), 0.5)
    loss_bbox = (jnp.abs(src - tgt).sum(-1) * weight).sum() / num_boxes
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
    loss_giou = ((1 - giou) * weight).sum() / num_boxes

    # logging only, no gradient: |#(max sigmoid > 0.5) - #targets|, mean over images
    prob_max = jax.nn.sigmoid(jax.lax.stop_gradient(logits)).max(-1)
    card_pred = (prob_max > 0.5).sum(1).astype(logits.dtype)
    card_err = jnp.abs(card_pred - mask.sum(1).astype(logits.dtype)).mean()
    return {
        "loss_ce": loss_ce,
        "loss_bbox": loss_bbox,
        "loss_giou": loss_giou,
        "cardinality_error": card_err,
    }


def _weights(config: LossConfig) -> dict[str, float]:
    return {
        "loss_ce": config.class_loss_coefficient,
        "loss_bbox": config.bbox_loss_coefficient,
        "loss_giou": config.giou_loss_coefficient,
    }


# ----------------------------------------------------------------------------- criterion


def set_criterion(
    logits: jnp.ndarray,
    pred_boxes: jnp.ndarray,
    labels: jnp.ndarray,
    boxes: jnp.ndarray,
    mask: jnp.ndarray,
    config: LossConfig,
    *,
    intermediate_logits: jnp.ndarray | None = None,
    intermediate_boxes: jnp.ndarray | None = None,
    enc_outputs_class: jnp.ndarray | None = None,
    enc_outputs_coord_logits: jnp.ndarray | None = None,
    num_boxes: jnp.ndarray | float | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Total weighted loss and the loss dict of one batch. Pure; call it inside `jit`.

    Args:
      logits: `(bs, num_queries, num_labels)` final-layer logits.
      pred_boxes: `(bs, num_queries, 4)` final-layer cxcywh boxes.
      labels, boxes, mask: padded targets (module docstring).
      config: a `LossConfig`.
      intermediate_logits, intermediate_boxes: `(bs, decoder_layers, num_queries, ...)`; the
        layers but the last give the auxiliary losses (keys `_{i}`) when
        `config.auxiliary_loss`.
      enc_outputs_class: `(bs, len_v, num_labels)`, enc_outputs_coord_logits: `(bs, len_v, 4)`
        pre-sigmoid; give the `_enc` losses when `config.encoder_loss` (two-stage).
      num_boxes: normaliser; default the valid boxes in `mask`. Clamped at >= 1.

    Returns:
      `(total, loss_dict)`. `loss_dict` holds the unweighted entries (transformers' keys, plus
      `_enc`) and `is_finite`, a bool scalar that is False when the total is NaN or inf: the
      training loop can skip such a step.
    """
    if config.auxiliary_loss and (intermediate_logits is None or intermediate_boxes is None):
        raise ValueError(
            "auxiliary_loss is on but intermediate_logits / intermediate_boxes were not given; "
            "pass them or set auxiliary_loss=False"
        )
    use_encoder = config.encoder_loss and enc_outputs_class is not None
    if use_encoder and enc_outputs_coord_logits is None:
        raise ValueError("enc_outputs_class given without enc_outputs_coord_logits")
    if num_boxes is None:
        num_boxes = num_boxes_from_mask(mask)
    num_boxes = jnp.maximum(jnp.asarray(num_boxes, logits.dtype), 1)
    weights = _weights(config)

    losses = layer_losses(logits, pred_boxes, labels, boxes, mask, num_boxes, config)
    weighted = dict(weights)

    if config.auxiliary_loss:
        num_aux = intermediate_logits.shape[1] - 1

        def one_layer(layer_logits, layer_boxes):
            return layer_losses(layer_logits, layer_boxes, labels, boxes, mask, num_boxes, config)

        # (bs, decoder_layers - 1, num_queries, ...) mapped over axis 1 -> {key: (num_aux,)}
        aux = jax.vmap(one_layer, in_axes=(1, 1))(
            intermediate_logits[:, :num_aux], intermediate_boxes[:, :num_aux]
        )
        for i in range(num_aux):
            for key in LOSS_KEYS:
                losses[f"{key}_{i}"] = aux[key][i]
            weighted.update({f"{k}_{i}": w for k, w in weights.items()})

    if use_encoder:
        # class-agnostic targets: every label 0 (the original's bin_targets)
        enc = layer_losses(
            enc_outputs_class,
            jax.nn.sigmoid(enc_outputs_coord_logits),
            jnp.zeros_like(labels),
            boxes,
            mask,
            num_boxes,
            config,
        )
        losses.update({f"{k}_enc": v for k, v in enc.items()})
        weighted.update({f"{k}_enc": w for k, w in weights.items()})

    total = sum(losses[k] * w for k, w in weighted.items())
    losses["is_finite"] = jnp.isfinite(total)
    return total, losses


def loss_from_outputs(
    outputs: Any,
    labels: jnp.ndarray,
    boxes: jnp.ndarray,
    mask: jnp.ndarray,
    config: LossConfig,
    *,
    num_boxes: jnp.ndarray | float | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """`set_criterion` on a model output with attributes `logits, pred_boxes,
    intermediate_logits, intermediate_boxes, enc_outputs_class, enc_outputs_coord_logits`
    (missing ones are treated as None)."""

    def field(name):
        return getattr(outputs, name, None)

    return set_criterion(
        field("logits"),
        field("pred_boxes"),
        labels,
        boxes,
        mask,
        config,
        intermediate_logits=field("intermediate_logits"),
        intermediate_boxes=field("intermediate_boxes"),
        enc_outputs_class=field("enc_outputs_class"),
        enc_outputs_coord_logits=field("enc_outputs_coord_logits"),
        num_boxes=num_boxes,
    )


# ----------------------------------------------------------------------------- data path


def validate_targets(labels, boxes, mask, num_labels: int, *, atol: float = 1e-5) -> None:
    """Check padded targets on the host before a step; raise ValueError naming the bad box.

    Valid boxes (mask True) must be finite cxcywh with every coordinate in [0, 1], width and
    height >= 0, corners within [0, 1] (up to `atol`), and class ids in [0, num_labels).
    Padded entries are not inspected.

    Args:
      labels: `(bs, max_boxes)` ints; boxes: `(bs, max_boxes, 4)`; mask: `(bs, max_boxes)`.
    """
    labels, boxes, mask = np.asarray(labels), np.asarray(boxes), np.asarray(mask).astype(bool)
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:2]:
        raise ValueError(
            "targets must be labels (bs, max_boxes), boxes (bs, max_boxes, 4), "
            "mask (bs, max_boxes); "
            f"got {labels.shape=} {boxes.shape=} {mask.shape=}"
        )
    if mask.shape != labels.shape:
        raise ValueError(f"mask must have the shape of labels; got {mask.shape=} {labels.shape=}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids; got {labels.dtype=}")

    corners = cxcywh_to_xyxy(boxes)
    with np.errstate(invalid="ignore"):
        checks = (
            (~np.isfinite(boxes).all(-1), "is not finite (NaN or inf)"),
            ((boxes[..., 2:] < 0).any(-1), "has negative width or height"),
            (((boxes < 0) | (boxes > 1)).any(-1), "has a cxcywh coordinate outside [0, 1]"),
            (
                ((corners < -atol) | (corners > 1 + atol)).any(-1),
                "extends outside the image [0, 1]",
            ),
            ((labels < 0) | (labels >= num_labels), f"has a class id outside [0, {num_labels})"),
        )
    for bad, problem in checks:
        bad = bad & mask
        if bad.any():
            image, box = np.argwhere(bad)[0]
            raise ValueError(
                f"target box {box} of image {image} {problem}: label {labels[image, box]}, "
                f"box (cx, cy, w, h) {boxes[image, box].tolist()} ({int(bad.sum())} bad boxes in "
                "the batch). Boxes must be normalised cxcywh inside the image; fix or drop them "
                "in the data pipeline."
            )
