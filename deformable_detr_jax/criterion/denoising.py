"""Contrastive denoising (CDN) groups: noised copies of the targets fed to the decoder.

DINO (Zhang et al., "DINO: DETR with Improved DeNoising Anchor Boxes", ICLR 2023;
IDEA-Research/DINO `models/dino/dn_components.py`, `prepare_for_cdn`) and transformers' RT-DETR
(`get_contrastive_denoising_training_group`, the oracle of `tests/test_denoising_vs_transformers.py`):

- the batch's largest box count `M` sets the group size `2 M` (M positives, then M negatives);
  `num_groups = max(num_denoising_queries // M, 1)`; group `g` holds, in slots
  `g 2M + k` (positive) and `g 2M + M + k` (negative), image b's k-th box (k < its count; the
  slots of k >= its count are padding: label `num_labels`, box 0);
- labels: each (real) query's class is replaced by a uniform random class with probability
  `label_noise / 2`;
- boxes: each xyxy corner moves by `sign * u * (w or h) / 2 * box_noise`, `u` uniform in
  [0, 1) for positives and in [1, 2) for negatives, clipped to [0, 1];
- attention mask (True = blocked): matching queries see no denoising query; a denoising
  query sees its own group and the matching queries.

Static shapes: `M` and `num_groups` are data (traced), never shapes. Every array has
`num_dn = denoising_capacity(num_denoising_queries, max_boxes) = 2 max(num_denoising_queries,
max_boxes)` slots, an upper bound of `2 num_groups M` whatever the counts; the slots from
`2 num_groups M` on are `used = False` (padding: they see only themselves and nobody sees
them). One compiled program serves every batch of a given `max_boxes`.

The random draws are an input (`DenoisingDraws`), so that the oracle test feeds both sides
the same numbers; `contrastive_denoising_groups` draws them from a key.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deformable_detr_jax.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from deformable_detr_jax.modeling.transformer import inverse_sigmoid


class DenoisingDraws(NamedTuple):
    """The random numbers of one construction (`num_dn` from `denoising_capacity`).

    flip: `(bs, num_dn)` uniform [0, 1); a label is replaced where `flip < label_noise / 2`.
    new_labels: `(bs, num_dn)` int, uniform in [0, num_labels); the replacement class.
    sign: `(bs, num_dn, 4)` in {-1, 1}; the direction of each corner's move.
    jitter: `(bs, num_dn, 4)` uniform [0, 1); the size of each corner's move.
    """

    flip: jax.Array
    new_labels: jax.Array
    sign: jax.Array
    jitter: jax.Array


class DenoisingGroups(NamedTuple):
    """The denoising queries of one batch (`num_dn` slots, module docstring).

    labels: `(bs, num_dn)` int32 noised class ids; `num_labels` where not `valid` (the
      label embedding's padding row, as RT-DETR's `denoising_class_embed`).
    boxes: `(bs, num_dn, 4)` noised cxcywh in [0, 1]; 0 where not `valid`.
    box_logits: `(bs, num_dn, 4)` `inverse_sigmoid(boxes)` (eps 1e-5): the decoder's
      unsigmoided reference boxes, beside the two-stage proposals' `topk_coords_logits`.
    valid: `(bs, num_dn)` bool: a used slot with a real target behind it.
    used: `(num_dn,)` bool: the slot lies in one of the `num_groups` groups.
    positive: `(num_dn,)` bool: first half of its group (reconstruct the box), else negative
      ("no object").
    target_index: `(bs, num_dn)` int32 index into `max_boxes` of the slot's target (0 where
      not `valid`).
    num_groups: `()` int32; 0 when the batch has no box.
    attention_mask: `(num_dn + num_queries, num_dn + num_queries)` bool, True = blocked;
      the same for every image and head of the batch.
    """

    labels: jax.Array
    boxes: jax.Array
    box_logits: jax.Array
    valid: jax.Array
    used: jax.Array
    positive: jax.Array
    target_index: jax.Array
    num_groups: jax.Array
    attention_mask: jax.Array


def denoising_capacity(num_denoising_queries: int, max_boxes: int) -> int:
    """The static number of denoising slots: `2 max(num_denoising_queries, max_boxes)`."""
    if num_denoising_queries < 1 or max_boxes < 1:
        raise ValueError(
            f"denoising needs num_denoising_queries >= 1 and max_boxes >= 1; got "
            f"{num_denoising_queries=} {max_boxes=} (0 denoising queries means denoising off: "
            "do not build the groups)"
        )
    return 2 * max(num_denoising_queries, max_boxes)


def draw_denoising_noise(
    key: jax.Array, bs: int, num_dn: int, num_labels: int, dtype=jnp.float32
) -> DenoisingDraws:
    """Draw `DenoisingDraws` of `(bs, num_dn)` / `(bs, num_dn, 4)` from `key`."""
    flip_key, label_key, sign_key, jitter_key = jax.random.split(key, 4)
    sign = jax.random.bernoulli(sign_key, 0.5, (bs, num_dn, 4))
    return DenoisingDraws(
        flip=jax.random.uniform(flip_key, (bs, num_dn), dtype),
        new_labels=jax.random.randint(label_key, (bs, num_dn), 0, num_labels, jnp.int32),
        sign=jnp.where(sign, 1, -1).astype(dtype),
        jitter=jax.random.uniform(jitter_key, (bs, num_dn, 4), dtype),
    )


def _slot_layout(mask: jax.Array, num_denoising_queries: int):
    """Each slot's group, within-group box number k, sign and use, from the traced counts."""
    bs, max_boxes = mask.shape
    num_dn = denoising_capacity(num_denoising_queries, max_boxes)
    counts = mask.sum(1).astype(jnp.int32)  # (bs,)
    most = counts.max()
    size = jnp.maximum(most, 1)
    num_groups = jnp.where(most > 0, jnp.maximum(num_denoising_queries // size, 1), 0)
    slot = jnp.arange(num_dn, dtype=jnp.int32)
    group = slot // (2 * size)
    within = slot % (2 * size)
    positive = within < size
    box_number = jnp.where(positive, within, within - size)  # (num_dn,)
    used = group < num_groups
    valid = used[None, :] & (box_number[None, :] < counts[:, None])  # (bs, num_dn)
    # the k-th real box of each image, wherever the mask puts it
    order = jnp.argsort(~mask, axis=1, stable=True).astype(jnp.int32)  # (bs, max_boxes)
    target_index = jnp.take_along_axis(order, jnp.minimum(box_number, max_boxes - 1)[None], 1)
    target_index = jnp.where(valid, target_index, 0)
    return group, used, positive, valid, target_index, num_groups.astype(jnp.int32)


def denoising_attention_mask(group: jax.Array, used: jax.Array, num_queries: int) -> jax.Array:
    """`(num_dn + num_queries, num_dn + num_queries)` bool, True = blocked (RT-DETR's layout:
    denoising slots first). A used denoising query sees its group and the matching queries; an
    unused one only itself; a matching query only the matching queries."""
    num_dn = group.shape[0]
    total = num_dn + num_queries
    index = jnp.arange(total)
    is_dn = index < num_dn
    group = jnp.concatenate([group, jnp.full((num_queries,), -1, group.dtype)])
    used = jnp.concatenate([used, jnp.zeros((num_queries,), bool)])
    same_group = group[:, None] == group[None, :]
    itself = index[:, None] == index[None, :]
    dn_row = jnp.where(used[:, None], jnp.where(is_dn[None, :], same_group, True), itself)
    allowed = jnp.where(is_dn[:, None], dn_row, ~is_dn[None, :])
    return ~allowed


def noise_boxes(
    boxes: jax.Array, positive: jax.Array, sign: jax.Array, jitter: jax.Array, box_noise: float
) -> jax.Array:
    """Move each xyxy corner of `(bs, num_dn, 4)` cxcywh boxes by `sign * u * half size *
    box_noise` (`u = jitter` for positives, `jitter + 1` for negatives); clip to [0, 1]."""
    corners = box_cxcywh_to_xyxy(boxes)
    # (bs, num_dn, 4): the half width / height under each corner coordinate
    diff = jnp.tile(boxes[..., 2:] * 0.5, (1, 1, 2)) * box_noise
    part = jnp.where(positive[None, :, None], jitter, jitter + 1.0) * sign
    corners = jnp.clip(corners + part * diff, 0.0, 1.0)
    return box_xyxy_to_cxcywh(corners)


def build_denoising_groups(
    labels: jax.Array,
    boxes: jax.Array,
    mask: jax.Array,
    draws: DenoisingDraws,
    *,
    num_denoising_queries: int,
    num_queries: int,
    num_labels: int,
    label_noise: float = 0.5,
    box_noise: float = 1.0,
) -> DenoisingGroups:
    """The denoising groups of padded targets, with the given random draws.

    Args:
      labels: `(bs, max_boxes)` int; boxes: `(bs, max_boxes, 4)` cxcywh in [0, 1];
        mask: `(bs, max_boxes)` bool, True on real boxes (padding may hold anything).
      draws: `DenoisingDraws` of `num_dn = denoising_capacity(num_denoising_queries,
        max_boxes)` slots.
      num_denoising_queries: the budget N (static); `num_groups = max(N // M, 1)`.
      num_queries: the matching queries after the denoising ones (the attention mask's size).
      num_labels: classes; `num_labels` is the padding label.
      label_noise, box_noise: DINO's `label_noise_ratio` and `box_noise_scale` (0 = none).
    """
    if not 0.0 <= label_noise <= 1.0 or box_noise < 0.0:
        raise ValueError(
            f"expected 0 <= label_noise <= 1 and box_noise >= 0; got {label_noise=} {box_noise=}"
        )
    labels, boxes, mask = jnp.asarray(labels), jnp.asarray(boxes), jnp.asarray(mask, bool)
    layout = _slot_layout(mask, num_denoising_queries)
    group, used, positive, valid, target_index, num_groups = layout
    if draws.flip.shape != valid.shape or draws.jitter.shape != (*valid.shape, 4):
        raise ValueError(
            f"draws must be (bs, num_dn) and (bs, num_dn, 4) with num_dn = "
            f"{valid.shape[1]}; got {draws.flip.shape=} {draws.jitter.shape=}"
        )
    dn_labels = jnp.take_along_axis(labels.astype(jnp.int32), target_index, 1)
    dn_labels = jnp.where(valid, dn_labels, num_labels)
    if label_noise > 0:
        flip = valid & (draws.flip < label_noise * 0.5)
        dn_labels = jnp.where(flip, draws.new_labels.astype(jnp.int32), dn_labels)
    dn_boxes = jnp.take_along_axis(boxes, target_index[..., None], 1)
    dn_boxes = jnp.where(valid[..., None], dn_boxes, 0.0)
    if box_noise > 0:
        dn_boxes = noise_boxes(dn_boxes, positive, draws.sign, draws.jitter, box_noise)
    return DenoisingGroups(
        labels=dn_labels,
        boxes=dn_boxes,
        box_logits=inverse_sigmoid(dn_boxes),
        valid=valid,
        used=used,
        positive=positive,
        target_index=target_index,
        num_groups=num_groups,
        attention_mask=denoising_attention_mask(group, used, num_queries),
    )


def contrastive_denoising_groups(
    key: jax.Array,
    labels: jax.Array,
    boxes: jax.Array,
    mask: jax.Array,
    *,
    num_denoising_queries: int,
    num_queries: int,
    num_labels: int,
    label_noise: float = 0.5,
    box_noise: float = 1.0,
) -> DenoisingGroups:
    """`build_denoising_groups` with draws from `key` (`draw_denoising_noise`)."""
    bs, max_boxes = mask.shape
    num_dn = denoising_capacity(num_denoising_queries, max_boxes)
    draws = draw_denoising_noise(key, bs, num_dn, num_labels, jnp.asarray(boxes).dtype)
    return build_denoising_groups(
        labels,
        boxes,
        mask,
        draws,
        num_denoising_queries=num_denoising_queries,
        num_queries=num_queries,
        num_labels=num_labels,
        label_noise=label_noise,
        box_noise=box_noise,
    )
