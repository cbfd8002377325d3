"""The contrastive denoising groups against transformers' RT-DETR
`get_contrastive_denoising_training_group`, with the same random draws on both sides.

RT-DETR draws with `torch.rand_like` / `torch.randint_like`; they are recorded here (the real
functions, wrapped) and the same numbers fill the first `2 num_groups M` slots of our
`DenoisingDraws` (the static padding slots after them get other numbers: they must not
matter). Compared where the two share a meaning:

- labels: RT-DETR's `class_embed` is the identity here, so its "embedded" classes are the
  noised ids; ours must equal them on its `2 num_groups M` queries (padding label `num_labels`
  included);
- boxes: RT-DETR returns `inverse_sigmoid` boxes; ours `box_logits` are compared with them and
  ours `boxes` with their sigmoid;
- attention mask: RT-DETR's `-inf` entries against our True, RT-DETR's denoising queries
  mapped to our first `2 num_groups M` slots and its matching queries to our last
  `num_queries`;
- `dn_num_group` and `dn_positive_idx` against `num_groups` and our valid positive slots.

Deliberate difference: our arrays have `denoising_capacity` slots whatever the counts (static
shapes); the slots RT-DETR does not have are checked in tests/test_denoising.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax.criterion.denoising import (
    DenoisingDraws,
    build_denoising_groups,
    denoising_capacity,
)

pytestmark = pytest.mark.torch

NUM_LABELS = 7
NUM_QUERIES = 5

CASES = [
    # (num_denoising_queries, counts per image, max_boxes, label_noise, box_noise, holes)
    (10, [3, 0, 5, 2], 6, 0.5, 1.0, False),  # 2 groups fill the capacity exactly
    (12, [3, 0, 5, 2], 6, 0.5, 1.0, True),  # 2 groups, 4 padding slots; boxes not in front
    (3, [3, 0, 5, 2], 6, 1.0, 0.4, False),  # M > N: one group of the largest count
    (100, [1, 4, 0], 8, 0.5, 1.0, True),  # DINO's default budget: 25 groups
]


def _targets(counts, max_boxes, holes, seed):
    """Padded targets (garbage in the padding) and the same boxes as RT-DETR's list."""
    rng = np.random.default_rng(seed)
    bs = len(counts)
    labels = rng.integers(0, NUM_LABELS, (bs, max_boxes))
    centers = rng.uniform(0.1, 0.9, (bs, max_boxes, 2))
    sizes = rng.uniform(0.05, 0.6, (bs, max_boxes, 2))
    boxes = np.concatenate([centers, sizes], -1).astype(np.float32)
    mask = np.zeros((bs, max_boxes), bool)
    order = []
    for b, n in enumerate(counts):
        slots = rng.permutation(max_boxes)[:n] if holes else np.arange(n)
        slots = np.sort(slots)  # RT-DETR's k-th box is our k-th real slot
        mask[b, slots] = True
        order.append(slots)
    labels = np.where(mask, labels, NUM_LABELS + 3)
    boxes = np.where(mask[..., None], boxes, np.float32(7.0))
    return labels, boxes, mask, order


def _rtdetr(monkeypatch, labels, boxes, order, num_dn, label_noise, box_noise):
    import torch
    from transformers.models.rt_detr import modeling_rt_detr

    draws = []
    rand_like, randint_like = torch.rand_like, torch.randint_like

    def recording(function):
        def wrapped(*args, **kwargs):
            out = function(*args, **kwargs)
            draws.append(out.clone())
            return out

        return wrapped

    monkeypatch.setattr(torch, "rand_like", recording(rand_like))
    monkeypatch.setattr(torch, "randint_like", recording(randint_like))
    torch.manual_seed(0)
    targets = [
        {
            "class_labels": torch.tensor(labels[b, slots], dtype=torch.int64),
            "boxes": torch.tensor(boxes[b, slots]),
        }
        for b, slots in enumerate(order)
    ]
    query_class, query_bbox, attn_mask, meta = (
        modeling_rt_detr.get_contrastive_denoising_training_group(
            targets,
            NUM_LABELS,
            NUM_QUERIES,
            lambda classes: classes,
            num_denoising_queries=num_dn,
            label_noise_ratio=label_noise,
            box_noise_scale=box_noise,
        )
    )
    flip, new_labels, sign01, jitter = (d.numpy() for d in draws)
    return {
        "labels": query_class.numpy(),
        "box_logits": query_bbox.numpy(),
        "blocked": np.isneginf(attn_mask.numpy()),
        "num_groups": meta["dn_num_group"],
        "positive_idx": [p.numpy() for p in meta["dn_positive_idx"]],
        "draws": (flip, new_labels, sign01 * 2.0 - 1.0, jitter),
    }


def _padded_draws(ref_draws, bs, capacity, seed):
    """RT-DETR's draws in our first slots, other random numbers in the rest."""
    rng = np.random.default_rng(seed)
    flip, new_labels, sign, jitter = ref_draws
    used = flip.shape[1]

    def pad(x, fill):
        return np.concatenate([x, fill.astype(x.dtype)], axis=1)

    rest = capacity - used
    return DenoisingDraws(
        flip=pad(flip, rng.uniform(size=(bs, rest))),
        new_labels=pad(new_labels, rng.integers(0, NUM_LABELS, (bs, rest))),
        sign=pad(sign, rng.choice([-1.0, 1.0], (bs, rest, 4))),
        jitter=pad(jitter, rng.uniform(size=(bs, rest, 4))),
    )


@pytest.mark.parametrize("case", range(len(CASES)))
def test_groups_equal_rtdetr_with_the_same_draws(monkeypatch, case):
    num_dn, counts, max_boxes, label_noise, box_noise, holes = CASES[case]
    labels, boxes, mask, order = _targets(counts, max_boxes, holes, seed=case)
    ref = _rtdetr(monkeypatch, labels, boxes, order, num_dn, label_noise, box_noise)
    bs = len(counts)
    capacity = denoising_capacity(num_dn, max_boxes)
    draws = _padded_draws(ref["draws"], bs, capacity, seed=100 + case)
    build = jax.jit(
        build_denoising_groups,
        static_argnames=(
            "num_denoising_queries",
            "num_queries",
            "num_labels",
            "label_noise",
            "box_noise",
        ),
    )
    ours = build(
        labels,
        boxes,
        mask,
        jax.tree.map(jnp.asarray, draws),
        num_denoising_queries=num_dn,
        num_queries=NUM_QUERIES,
        num_labels=NUM_LABELS,
        label_noise=label_noise,
        box_noise=box_noise,
    )
    ours = jax.tree.map(np.asarray, ours)
    used = ref["labels"].shape[1]  # 2 num_groups M
    assert int(ours.num_groups) == ref["num_groups"]
    assert ours.used.sum() == used and ours.used[:used].all()

    np.testing.assert_array_equal(ours.labels[:, :used], ref["labels"])
    # the draws did flip some labels, and boxes moved
    assert (ref["labels"] != np.take_along_axis(labels, ours.target_index, 1)[:, :used])[
        ours.valid[:, :used]
    ].any()
    # the same float32 boxes up to rounding (XLA fuses the corner arithmetic its own way,
    # measured <= 1.3e-7); a logit's error is the box's times 1 / (x (1 - x))
    slope = 1 / np.maximum(ours.boxes * (1 - ours.boxes), 1e-5)
    error = np.abs(ours.box_logits[:, :used] - ref["box_logits"])
    assert (error <= 1e-6 + 3e-7 * slope[:, :used]).all(), error.max()
    # in [0, 1]: where inverse_sigmoid's clamp (eps 1e-5) did not act
    unclamped = np.abs(ref["box_logits"]) < 11
    ref_boxes = 1 / (1 + np.exp(-ref["box_logits"].astype(np.float64)))
    np.testing.assert_allclose(
        ours.boxes[:, :used][unclamped], ref_boxes[unclamped], rtol=0, atol=1e-6
    )
    clamped = ours.boxes[:, :used][~unclamped]
    assert ((clamped <= 1e-5) | (clamped >= 1 - 1e-5)).all()
    assert (ours.boxes[~ours.valid] == 0).all()

    index = np.concatenate([np.arange(used), capacity + np.arange(NUM_QUERIES)])
    np.testing.assert_array_equal(ours.attention_mask[np.ix_(index, index)], ref["blocked"])
    for b in range(bs):
        np.testing.assert_array_equal(
            np.flatnonzero(ours.valid[b] & ours.positive), ref["positive_idx"][b]
        )
