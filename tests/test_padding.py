"""`padding_invariant=True`: each image of a padded batch gives what it gives alone, unpadded.

The oracle is this package's model on the image alone, unpadded (which is transformers' on
the same weights: tests/test_padding_vs_transformers.py). Canvases are chosen so
that padding matters: the default computation (`padding_invariant=False`, transformers' own
for a padded batch) is checked to differ from the unpadded outputs by far more than the
tolerance, so these tests would catch a leak.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax.modeling.backbone import mask_pyramid
from tests.random_models import BASIC_18, TINY_BOTTLENECK, random_model, small_config

SIZES = ((75, 110), (101, 66))  # (height, width) of the two images, neither a multiple of 32
CANVASES = ((128, 160), (131, 141))  # padded (height, width): multiples of 32, and odd sizes

OUTPUTS = ("logits", "pred_boxes", "intermediate_logits", "intermediate_boxes")
SAME_MODEL_TOL = 2e-5  # float32 rounding: reductions over different extents
LEAK_MIN = 1e-3  # what padding_invariant=False is at least off by on these canvases


def padding_images(seed: int):
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


def scored_outputs(out, index=None):
    values = {name: np.asarray(getattr(out, name)) for name in OUTPUTS}
    values["logits"] = 1 / (1 + np.exp(-values["logits"]))  # compare scores, bounded
    values["intermediate_logits"] = 1 / (1 + np.exp(-values["intermediate_logits"]))
    return values if index is None else {k: v[index] for k, v in values.items()}


def _max_diff(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in OUTPUTS)


def _check_invariance(model, images, canvas, alone):
    """`alone[i]`: the expected outputs of image i, from the unpadded image."""
    pixels, mask = _padded(images, canvas)
    invariant = scored_outputs(model(pixels, mask, padding_invariant=True))
    leaky = scored_outputs(model(pixels, mask))
    for i, expected in enumerate(alone):
        got = {k: v[i] for k, v in invariant.items()}
        for name in OUTPUTS:
            np.testing.assert_allclose(
                got[name],
                expected[name],
                rtol=0,
                atol=SAME_MODEL_TOL,
                err_msg=f"image {i} {name} on {canvas}",
            )
        assert _max_diff({k: v[i] for k, v in leaky.items()}, expected) > LEAK_MIN, (
            "padding_invariant=False matches the unpadded image too: this canvas tests nothing"
        )


CONFIGS = [
    (BASIC_18, {}),
    (BASIC_18, {"position_embedding_type": "learned"}),
    (TINY_BOTTLENECK, {"with_box_refine": True, "two_stage": True}),
    (TINY_BOTTLENECK, {"num_feature_levels": 5, "with_box_refine": True}),
    (TINY_BOTTLENECK, {"num_feature_levels": 1}),
]


@pytest.mark.parametrize("depth_layout, kwargs", CONFIGS)
def test_padded_batch_equals_each_image_alone(depth_layout, kwargs):
    """ResNet-18 (sine and learned positions), two-stage + box refinement, five levels (two
    extra convs), one level; tests/test_padding_vs_transformers.py shows that the unpadded
    runs are transformers' on the same weights."""
    model = random_model(small_config(depth_layout, **kwargs), seed=21)
    images = padding_images(seed=5)
    alone = [scored_outputs(model(jnp.asarray(image[None]), None), 0) for image in images]
    for canvas in CANVASES:
        _check_invariance(model, images, canvas, alone)


def test_dilated_backbone():
    """DC5 (stride-1 dilated last stage; transformers' HF ResNet has no such option, so the
    expected outputs are this model's on the unpadded images), with perturbed weights."""
    model = random_model(small_config(num_feature_levels=1, dilation=True), seed=1)
    images = padding_images(seed=6)
    alone = [scored_outputs(model(jnp.asarray(image[None]), None), 0) for image in images]
    for canvas in CANVASES:
        _check_invariance(model, images, canvas, alone)


def test_nothing_padded_is_the_default_computation():
    model = random_model(small_config(two_stage=True, with_box_refine=True), seed=3)
    pixels, _ = _padded(padding_images(seed=7)[:1], SIZES[0])
    default = scored_outputs(model(pixels, None))
    invariant = scored_outputs(model(pixels, None, padding_invariant=True))
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
