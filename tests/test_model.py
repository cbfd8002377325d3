"""Model behaviour beyond the parity tests: jit, dropout, bad input, and the key-table
converter's errors (small variants against transformers: tests/test_model_vs_transformers.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformable_detr_jax import (
    DeformableDetrForObjectDetection,
    convert_state_dict,
)
from deformable_detr_jax.convert.errors import CheckpointKeyError
from tests.random_models import random_model, random_state_dict, small_config


def _tiny_model(**kwargs):
    return DeformableDetrForObjectDetection(small_config(**kwargs), rngs=nnx.Rngs(0))


def _inputs(bs=2, height=96, width=128, seed=0):
    x = jax.random.normal(jax.random.key(seed), (bs, height, width, 3))
    mask = np.ones((bs, height, width), bool)
    mask[-1, height * 2 // 3 :] = False
    return x, jnp.asarray(mask)


def test_padded_image_of_a_batch_equals_it_alone_with_its_mask():
    """transformers' semantics for a padded batch (`padding_invariant=False`): one image twice,
    unpadded and with its bottom third padding; the padded copy gives what the model gives for
    it where every image of the batch has that mask (no other mask to mix it with), and
    the mask changes the outputs by far more than rounding. The oracle for
    `padding_invariant=True` (the unpadded image) is tests/test_padding.py's; the padded batch
    against transformers is tests/test_parity.py's, in the torch lane only."""
    model = random_model(small_config(with_box_refine=True, two_stage=True), seed=4)
    x, mask = _inputs(seed=2)
    x = jnp.stack([x[1], x[1]])  # mask[0]: all real; mask[1]: bottom third padding
    batched = model(x, mask)
    alone = model(x, jnp.stack([mask[1], mask[1]]))  # the same shapes: no new eager compiles
    for name in ("logits", "pred_boxes", "intermediate_boxes"):
        np.testing.assert_allclose(
            np.asarray(getattr(batched, name)[1]),
            np.asarray(getattr(alone, name)[0]),
            rtol=0,
            atol=2e-5,
            err_msg=name,
        )
    leak = np.abs(np.asarray(batched.pred_boxes[0]) - np.asarray(batched.pred_boxes[1])).max()
    assert leak > 1e-3, f"the mask changes the boxes by {leak:.2g} only"


def test_dropout_only_when_asked():
    model = _tiny_model()
    x, mask = _inputs(seed=1)
    a = model(x, mask).logits
    b = model(x, mask, deterministic=True).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = model(x, mask, deterministic=False).logits
    d = model(x, mask, deterministic=False).logits
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(c), np.asarray(d))  # the dropout stream advances


@pytest.mark.parametrize(
    "images, mask, message",
    [
        (np.ones((96, 128, 3), np.float32), None, "pixel_values"),
        (np.ones((1, 3, 96, 128), np.float32), None, "NHWC"),
        (np.ones((1, 96, 128, 4), np.float32), None, "pixel_values"),
        (np.ones((1, 96, 128, 3), np.uint8), None, "floating"),
        (np.ones((1, 16, 128, 3), np.float32), None, "at least 32"),
        (np.ones((2, 96, 128, 3), np.float32), np.ones((2, 128, 96)), "pixel_mask"),
        (np.ones((2, 96, 128, 3), np.float32), np.ones((1, 96, 128)), "pixel_mask"),
    ],
)
def test_bad_input(images, mask, message):
    model = _tiny_model()
    with pytest.raises(ValueError, match=message):
        model(jnp.asarray(images), None if mask is None else jnp.asarray(mask))


def _state_dict(config, seed):
    """A transformers-named state dict of random weights (the exporter's output: these tests
    are about the converter's errors, not its values)."""
    return random_state_dict(config, seed=seed)


def test_key_errors_listed_together():
    config = small_config()
    sd = _state_dict(config, seed=6)
    del sd["model.level_embed"]
    sd["model.extra.weight"] = np.ones(3, np.float32)
    key = "model.encoder.layers.0.self_attn.value_proj.weight"
    sd[key] = sd[key][:, :10]
    with pytest.raises(CheckpointKeyError) as info:
        convert_state_dict(sd, config)
    message = str(info.value)
    assert "model.level_embed" in message and "missing" in message
    assert "model.extra.weight" in message and "not in the model" in message
    assert key in message and "wrong shape" in message


def test_tied_copies_must_agree():
    config = small_config()  # no box refinement: class_embed.N are copies of class_embed.0
    sd = _state_dict(config, seed=8)
    sd["class_embed.1.bias"] = sd["class_embed.1.bias"] + 1
    with pytest.raises(CheckpointKeyError, match="class_embed.1.bias differs"):
        convert_state_dict(sd, config)


def test_wrong_variant_is_a_key_error():
    sd = _state_dict(small_config(with_box_refine=True, two_stage=True), seed=9)
    config = small_config()
    with pytest.raises(CheckpointKeyError, match="model.enc_output.weight"):
        convert_state_dict(sd, config)
