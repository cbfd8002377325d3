"""The matcher against transformers' `DeformableDetrHungarianMatcher`: the same assignments."""

import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax.criterion.matcher import hungarian_match
from tests.test_matcher import random_outputs

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("backend", ["jax", "scipy"])
def test_matching_equals_transformers_matcher(backend):
    import torch
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher

    rng = np.random.default_rng(5)
    counts = [3, 0, 11, 6]
    logits, pred, labels, boxes, mask = random_outputs(rng, 4, 25, 5, counts, 12)
    query_index, matched = hungarian_match(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(pred, jnp.float32),
        jnp.asarray(labels, jnp.int32),
        jnp.asarray(boxes, jnp.float32),
        jnp.asarray(mask),
        class_cost=2.0,
        bbox_cost=5.0,
        giou_cost=2.0,
        backend=backend,
    )
    matcher = DeformableDetrHungarianMatcher(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)
    outputs = {
        "logits": torch.tensor(logits, dtype=torch.float32),
        "pred_boxes": torch.tensor(pred, dtype=torch.float32),
    }
    targets = [
        {
            "class_labels": torch.tensor(labels[b, :n], dtype=torch.int64),
            "boxes": torch.tensor(boxes[b, :n], dtype=torch.float32),
        }
        for b, n in enumerate(counts)
    ]
    reference = matcher(outputs, targets)
    for b, (rows, cols) in enumerate(reference):
        assert sorted(np.flatnonzero(matched[b]).tolist()) == sorted(cols.tolist())
        got = dict(
            zip(
                np.flatnonzero(matched[b]).tolist(), np.asarray(query_index[b])[matched[b]].tolist()
            )
        )
        assert got == dict(zip(cols.tolist(), rows.tolist()))
