"""`padding_invariant=True`: each image of a padded batch gives what it gives alone, unpadded.

The oracle is transformers on the image alone (no padding, so nothing leaks), with the same
random weights; and, tighter, this package's model on the image alone. Canvases are chosen so
that padding matters: the default computation (`padding_invariant=False`, transformers' own
for a padded batch) is checked to differ from the unpadded outputs by far more than the
tolerance, so these tests would catch a leak.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from deformable_detr_jax import (
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    convert_state_dict,
)
from deformable_detr_jax.modeling.backbone import mask_pyramid
from tests import hf_reference as ref
from tests.test_model import BASIC_18, SMALL, TINY_BOTTLENECK

SIZES = ((75, 110), (101, 66))  # (height, width) of the two images, neither a multiple of 32
CANVASES = ((128, 160), (131, 141))  # padded (height, width): multiples of 32, and odd sizes

OUTPUTS = ("logits", "pred_boxes", "intermediate_logits", "intermediate_boxes")
SAME_MODEL_TOL = 2e-5  # float32 rounding: reductions over different extents
TRANSFORMERS_TOL = 1e-4  # as tests/test_parity.py
LEAK_MIN = 1e-3  # what padding_invariant=False is at least off by on these canvases


def _images(seed: int):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((h, w, 3)).astype(np.float32) for h, w in SIZES]


def _padded(images, canvas):
    pixels = np.zeros((len(images), *canvas, 3), np.float32)
    mask = np.zeros((len(images), *canvas), bool)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        pixels[i, :h, :w] = image
        mask[i, :h, :w] = True
    return jnp.asarray(pixels), jnp.asarray(mask)


def _outputs(out, index=None):
    values = {name: np.asarray(getattr(out, name)) for name in OUTPUTS}
    values["logits"] = 1 / (1 + np.exp(-values["logits"]))  # compare scores, bounded
    values["intermediate_logits"] = 1 / (1 + np.exp(-values["intermediate_logits"]))
    return values if index is None else {k: v[index] for k, v in values.items()}


def _max_diff(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in OUTPUTS)


def _check_invariance(model, images, canvas, alone):
    """`alone[i]`: the expected outputs of image i, from the unpadded image."""
    pixels, mask = _padded(images, canvas)
    invariant = _outputs(model(pixels, mask, padding_invariant=True))
    leaky = _outputs(model(pixels, mask))
    for i, expected in enumerate(alone):
        got = {k: v[i] for k, v in invariant.items()}
        for name in OUTPUTS:
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=SAME_MODEL_TOL,
                                       err_msg=f"image {i} {name} on {canvas}")  # fmt: skip
        assert _max_diff({k: v[i] for k, v in leaky.items()}, expected) > LEAK_MIN, (
            "padding_invariant=False matches the unpadded image too: this canvas tests nothing"
        )


@pytest.mark.parametrize(
    "depth_layout, kwargs",
    [
        (BASIC_18, {}),
        (BASIC_18, {"position_embedding_type": "learned"}),
        (TINY_BOTTLENECK, {"with_box_refine": True, "two_stage": True}),
        (TINY_BOTTLENECK, {"num_feature_levels": 5, "with_box_refine": True}),
        (TINY_BOTTLENECK, {"num_feature_levels": 1}),
    ],
)
def test_padded_batch_equals_each_image_alone_in_transformers(depth_layout, kwargs):
    hf_cfg = ref.hf_config(depth_layout=depth_layout, **{**SMALL, **kwargs})
    hf_model = ref.random_hf_model(hf_cfg, seed=21)
    config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    model = convert_state_dict(ref.state_dict_numpy(hf_model), config)
    images = _images(seed=5)

    alone, theirs = [], []
    for image in images:
        alone.append(_outputs(model(jnp.asarray(image[None]), None), 0))
        with torch.no_grad():
            out = hf_model(pixel_values=torch.from_numpy(image.transpose(2, 0, 1)[None].copy()))
        theirs.append(
            {
                "logits": torch.sigmoid(out.logits)[0].numpy(),
                "pred_boxes": out.pred_boxes[0].numpy(),
            }
        )
    for expected, hf in zip(alone, theirs):  # the unpadded runs are the transformers ones
        for name, value in hf.items():
            np.testing.assert_allclose(expected[name], value, rtol=0, atol=TRANSFORMERS_TOL)
    for canvas in CANVASES:
        _check_invariance(model, images, canvas, alone)


def test_dilated_backbone():
    """DC5 (stride-1 dilated last stage; transformers' HF ResNet has no such option, so the
    expected outputs are this model's on the unpadded images), with perturbed weights."""
    config = DeformableDetrConfig.from_hf(
        ref.hf_config(depth_layout=TINY_BOTTLENECK, **{**SMALL, "num_feature_levels": 1}).to_dict()
    )
    config = dataclasses.replace(config, dilation=True)
    model = DeformableDetrForObjectDetection(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    state = jax.tree.map(
        lambda x: (
            x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x
        ),
        state,
    )
    model = nnx.merge(graphdef, state)
    images = _images(seed=6)
    alone = [_outputs(model(jnp.asarray(image[None]), None), 0) for image in images]
    for canvas in CANVASES:
        _check_invariance(model, images, canvas, alone)


def test_nothing_padded_is_the_default_computation():
    hf_cfg = ref.hf_config(depth_layout=TINY_BOTTLENECK, **{**SMALL, "two_stage": True,
                                                           "with_box_refine": True})  # fmt: skip
    config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    model = convert_state_dict(ref.state_dict_numpy(ref.random_hf_model(hf_cfg, seed=3)), config)
    pixels, _ = _padded(_images(seed=7)[:1], SIZES[0])
    default = _outputs(model(pixels, None))
    invariant = _outputs(model(pixels, None, padding_invariant=True))
    for name in OUTPUTS:
        np.testing.assert_allclose(invariant[name], default[name], rtol=0, atol=1e-6)


def test_mask_pyramid_matches_convolution_arithmetic():
    """Real positions at each stride: ceil(n / 2) per stride-2 step, as every stride-2 layer
    of the backbone (3x3 pad 1, 7x7 pad 3, 1x1 pad 0, max pool 3 pad 1) maps sizes."""
    mask = np.zeros((1, 131, 141), bool)
    mask[0, :101, :66] = True
    pyramid = mask_pyramid(jnp.asarray(mask), strides=6)
    size, real = (131, 141), (101, 66)
    for _ in range(7):
        level = np.asarray(pyramid[size])
        assert level.shape == (1, *size)
        expected = np.zeros_like(level)
        expected[0, : real[0], : real[1]] = True
        np.testing.assert_array_equal(level, expected)
        size = tuple(-(-s // 2) for s in size)
        real = tuple(-(-s // 2) for s in real)
