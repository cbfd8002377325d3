"""One top-k decoding (`postprocessing.top_k_detections`) for the training evaluation step (jnp, on
the device) and `Detector` (NumPy, on the host), and one box conversion (`box_format`) for both
array libraries: same pairs, same order, same boxes, ties included."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax import boxes as jnp_boxes
from deformable_detr_jax.box_format import cxcywh_to_xyxy, xyxy_to_cxcywh
from deformable_detr_jax.inference.detector import Detector
from deformable_detr_jax.processing.postprocessing import top_k_detections
from deformable_detr_jax.training.mesh import make_data_mesh
from deformable_detr_jax.training.step import make_eval_step
from tests.test_inference import small_processor, tiny_model


def _tied_outputs(rng, bs=2, len_q=7, num_labels=5):
    """Logits on a grid of 7 values (many exact ties, -0.0 next to 0.0) and random boxes."""
    logits = (rng.integers(-3, 4, (bs, len_q, num_labels)) * 0.5).astype(np.float32)
    logits[logits == 0] = np.where(rng.random(int(np.sum(logits == 0))) < 0.5, -0.0, 0.0)
    centers = rng.uniform(0.2, 0.8, (bs, len_q, 2))
    sizes = rng.uniform(0.05, 0.4, (bs, len_q, 2))
    return logits, np.concatenate([centers, sizes], -1).astype(np.float32)


def _expected_ranking(logits: np.ndarray, k: int) -> list[list[int]]:
    """Flat (query * num_labels + class) indices by Python's stable sort: higher logit first,
    the lower index first among equal logits (-0.0 equals 0.0)."""
    flat = logits.reshape(len(logits), -1).tolist()
    return [sorted(range(len(row)), key=lambda i, row=row: -row[i])[:k] for row in flat]


@pytest.mark.parametrize("k", [1, 12, 35, 1000])
def test_numpy_and_jnp_rank_ties_alike_and_as_a_stable_sort(k):
    rng = np.random.default_rng(10 + k)
    logits, boxes = _tied_outputs(rng)
    logits[0, 3, 1] = np.nan  # ranked last by both
    found_np = top_k_detections(logits, boxes, k)
    found_jnp = jax.jit(lambda lg, bx: top_k_detections(lg, bx, k, jnp))(logits, boxes)
    for ours, theirs in zip(found_np, found_jnp, strict=True):
        np.testing.assert_array_equal(ours, np.asarray(theirs))
    top_logits, labels, corners = found_np
    num_labels = logits.shape[-1]
    expected = np.asarray(_expected_ranking(np.nan_to_num(logits, nan=-np.inf), k))
    np.testing.assert_array_equal(labels, expected % num_labels)
    query = expected // num_labels
    np.testing.assert_array_equal(
        top_logits, np.take_along_axis(logits.reshape(2, -1), expected, 1)
    )
    cx, cy, w, h = np.moveaxis(np.take_along_axis(boxes, query[..., None], 1), -1, 0)
    np.testing.assert_allclose(corners[..., 0], cx - w / 2, rtol=0, atol=0)
    np.testing.assert_allclose(corners[..., 3], cy + h / 2, rtol=0, atol=0)


def _fake_spec(logits, boxes):
    """A spec whose model returns the given outputs (the eval step's decoding is what is tested)."""

    def merge(params, frozen, dtype=None):
        del frozen, dtype
        return lambda pixel_values, pixel_mask, deterministic: types.SimpleNamespace(
            logits=params["logits"], pred_boxes=params["boxes"]
        )

    return types.SimpleNamespace(merge=merge)


def test_eval_step_and_detector_rank_the_same_pairs_with_ties():
    rng = np.random.default_rng(4)
    logits, boxes = _tied_outputs(rng, bs=1, len_q=9, num_labels=6)
    k = 9 * 6  # every pair: the tie groups, the -0.0/0.0 one included, are all ranked
    assert np.any(np.signbit(logits) & (logits == 0)) and np.any(
        ~np.signbit(logits) & (logits == 0)
    )
    eval_step = make_eval_step(_fake_spec(logits, boxes), make_data_mesh(), top_k=k)
    batch = {
        "pixel_values": rng.normal(size=(1, 32, 32, 3)).astype(np.float32),
        "pixel_mask": np.ones((1, 32, 32), bool),
    }
    found = jax.device_get(eval_step({"logits": logits, "boxes": boxes}, {}, batch))

    detector = Detector(tiny_model(), small_processor(), buckets=None, top_k=k, compile_cache=None)
    detector.forward = lambda pixel_values, pixel_mask: (logits, boxes)
    image = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    (detections,) = detector(image, threshold=0.0)

    assert len(detections) == k
    np.testing.assert_array_equal(detections.labels, found["labels"][0])
    scale = np.asarray([40, 48, 40, 48], np.float32)
    np.testing.assert_array_equal(detections.boxes, found["boxes"][0] * scale)
    # jax's float32 sigmoid vs the host's correctly rounded one: within an ulp
    np.testing.assert_allclose(detections.scores, found["scores"][0], rtol=2e-7, atol=0)
    expected = np.asarray(_expected_ranking(logits, k))
    np.testing.assert_array_equal(found["labels"], expected % logits.shape[-1])


def test_box_conversions_are_one_formula_for_numpy_and_jnp():
    rng = np.random.default_rng(7)
    cxcywh = np.concatenate(
        [rng.uniform(0.1, 0.9, (3, 11, 2)), rng.uniform(0.01, 0.5, (3, 11, 2))], -1
    ).astype(np.float32)
    xyxy = cxcywh_to_xyxy(cxcywh)
    assert xyxy.dtype == np.float32 and xyxy.shape == cxcywh.shape
    np.testing.assert_array_equal(np.asarray(jnp_boxes.box_cxcywh_to_xyxy(cxcywh)), xyxy)
    np.testing.assert_array_equal(
        np.asarray(jnp_boxes.box_xyxy_to_cxcywh(xyxy)), xyxy_to_cxcywh(xyxy)
    )
    # independent of the formula: in float64 the corners are exact halves apart
    wide = cxcywh.astype(np.float64)
    corners = cxcywh_to_xyxy(wide)
    np.testing.assert_array_equal(corners[..., 2] - corners[..., 0], wide[..., 2])
    np.testing.assert_array_equal((corners[..., 1] + corners[..., 3]) / 2, wide[..., 1])
    np.testing.assert_allclose(xyxy_to_cxcywh(corners), wide, rtol=0, atol=1e-15)
    assert cxcywh_to_xyxy(np.asarray([0.5, 0.25, 0.5, 0.25])).tolist() == [0.25, 0.125, 0.75, 0.375]
