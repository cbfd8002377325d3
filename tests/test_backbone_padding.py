"""`padding_invariant=True` with the ConvNeXt and Swin backbones: each image of a padded batch
gives, on its real positions, what it gives alone, unpadded (as tests/test_padding.py for the
ResNet).

The oracle is this package's model on the image alone with `padding_invariant=False`, which is
transformers' computation (tests/test_backbones_vs_transformers.py). Image sizes are no multiple
of the patch (4 for ConvNeXt, 3 for Swin) or of Swin's window (5) at any stage, the padding holds
random values (not zeros), and the default computation is checked to differ by far more than the
tolerance, so a leak would show. Weights: random (`filled_model`), larger than an
initialisation's where it matters (ConvNeXt's layer scale, Swin's relative position bias), so
that every block changes the features.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformable_detr_jax import DeformableDetrConfig, DeformableDetrForObjectDetection
from tests.random_models import SMALL, TINY_CONVNEXT, TINY_SWIN

SIZES = ((130, 170), (97, 161))  # (height, width) of the two images
CANVAS = (150, 190)  # the padded batch's (height, width)
TINY = dict(
    SMALL,
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    with_box_refine=True,
)
# strides 4, 8, 16 (+ one extra stride-2 level from the last): floor(97 / 4) = 24, 12, 6, 3
CONVNEXT = dict(TINY, **TINY_CONVNEXT, num_feature_levels=4)
# strides 3, 6, 12, two blocks (the second shifted) per stage: ceil(97 / 3) = 33, 17, 9
# (windows padded to 35, 20, 10 alone; to 50, 25, 15 in the canvas)
SWIN = dict(TINY, **TINY_SWIN, num_feature_levels=3, two_stage=True)
BACKBONES = {"convnext": CONVNEXT, "swin": SWIN}
LEAK_MIN = 1e-2  # what padding_invariant=False is at least off by (logits or boxes)


def filled_model(config: DeformableDetrConfig, seed: int) -> DeformableDetrForObjectDetection:
    """The model with random weights, without running its initialisers (an eager
    initialisation takes tens of seconds on a loaded 2-core machine; the shapes alone take
    two): kernels N(0, 1 / fan_in), biases N(0, 0.1^2), norm scales 1 + N(0, 0.1^2), ConvNeXt
    layer scales 0.5 + N(0, 0.1^2), Swin's relative position biases N(0, 1)."""
    abstract = nnx.eval_shape(lambda: DeformableDetrForObjectDetection(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(state):
        spec = var.get_value()
        if isinstance(var, nnx.RngKey):
            value = jax.random.key(seed)
        elif not jnp.issubdtype(spec.dtype, jnp.floating):
            value = jnp.zeros(spec.shape, spec.dtype)
        else:
            noise = rng.standard_normal(spec.shape)
            name = path[-1]
            if name == "relative_position_bias_table":
                value = noise
            elif name == "layer_scale_parameter":
                value = 0.5 + 0.1 * noise
            elif name == "scale":
                value = 1 + 0.1 * noise
            elif len(spec.shape) == 1:
                value = 0.1 * noise
            else:
                value = noise / np.sqrt(np.prod(spec.shape[:-1]))
            value = jnp.asarray(value, spec.dtype)
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def in_dtype(model, dtype):
    """The model with its floating weights cast to `dtype` (float64 under `enable_x64`)."""
    graphdef, state = nnx.split(model)

    def cast(x):  # through NumPy: no program compiled per weight shape
        return jnp.asarray(np.asarray(x), dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return nnx.merge(graphdef, jax.tree.map(cast, state))


@nnx.jit(static_argnames="modes")
def run(model, pixels, mask, modes=(True, False)):
    """As users run it, jitted: per `padding_invariant` in `modes` the backbone features with
    their masks, every decoder layer's scores and boxes."""
    results = []
    for invariant in modes:
        features = model.model.backbone(pixels, mask, invariant)
        out = model(pixels, mask, padding_invariant=invariant)
        results.append((features, jax.nn.sigmoid(out.intermediate_logits), out.intermediate_boxes))
    return results


def diffs_of(got, expected, i):
    """Largest |got - expected| of image i of `got` (`run`'s results) against image 0 of
    `expected`: scores, boxes, and features on `expected`'s positions (top-left)."""
    (features, scores, boxes), (alone, alone_scores, alone_boxes) = got, expected
    diffs = {"scores": max_diff(scores[i], alone_scores[0])}
    diffs["boxes"] = max_diff(boxes[i], alone_boxes[0])
    for level, ((f, _), (e, _)) in enumerate(zip(features, alone)):
        diffs[f"features {level}"] = max_diff(f[i, : e.shape[1], : e.shape[2]], e[0])
    return diffs


def padded_batch(images, canvas, dtype):
    """The images top-left on `canvas`, the rest random (not zeros), with their pixel mask."""
    rng = np.random.default_rng(11)
    pixels = 3 * rng.standard_normal((len(images), *canvas, 3))
    mask = np.zeros((len(images), *canvas), bool)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        pixels[i, :h, :w] = image
        mask[i, :h, :w] = True
    return jnp.asarray(pixels, dtype), jnp.asarray(mask)


def random_images():
    rng = np.random.default_rng(5)
    return [rng.standard_normal((h, w, 3)) for h, w in SIZES]


def check_masks(features, expected, i):
    """Image i's mask in the padded batch is exactly its own map, top-left, at every level."""
    for level, ((_, mask), (alone, alone_mask)) in enumerate(zip(features, expected)):
        h, w = alone.shape[1:3]
        real = np.asarray(mask[i])
        assert real.sum() == h * w and real[:h, :w].all(), f"level {level}: {real.sum()} real"
        assert np.asarray(alone_mask).all()


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_padded_batch_equals_each_image_alone(backbone):
    """float64: features on real positions, every decoder layer's scores and boxes to 1e-9 of
    each image alone (ConvNeXt: box refinement, an extra level; Swin: two-stage too); without
    the invariance they are off by more than `LEAK_MIN`."""
    model = filled_model(DeformableDetrConfig(**BACKBONES[backbone]), seed=3)
    images = random_images()
    with jax.enable_x64(True):
        model = in_dtype(model, jnp.float64)
        pixels, mask = padded_batch(images, CANVAS, jnp.float64)
        padded, leaky = run(model, pixels, mask)
        largest = 0.0
        for i, image in enumerate(images):
            ones = jnp.ones((1, *image.shape[:2]), bool)
            # the oracle: padding_invariant=False alone (transformers' computation)
            (alone,) = run(model, jnp.asarray(image[None]), ones, modes=(False,))
            check_masks(padded[0], alone[0], i)
            diffs = diffs_of(padded, alone, i)
            assert max(diffs.values()) <= 1e-9, f"image {i}: {diffs}"
            largest = max(largest, *diffs.values())
            leak = diffs_of(leaky, alone, i)
            leak = max(leak["scores"], leak["boxes"])
            assert leak > LEAK_MIN, f"image {i}: the padding does not matter here ({leak})"
    print(f"{backbone}: float64 max |padded - alone| {largest:.2e}")


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_detector_alone_and_batched(backbone):
    """float32, `Detector`'s default (`padding_invariant=True`): an image's raw scores and
    boxes in a randomly padded batch with a larger image, to 1e-4 of its own alone; its
    detections batched with a larger image in a larger bucket equal its detections alone."""
    from deformable_detr_jax import Detector, ImageProcessor

    model = filled_model(DeformableDetrConfig(**BACKBONES[backbone]), seed=4)
    processor = ImageProcessor(do_resize=False)
    batched = Detector(model, processor, buckets=(192,), batch_size=2, compile_cache=None)
    alone = Detector(model, processor, buckets=None, compile_cache=None)
    assert batched.padding_invariant and alone.padding_invariant

    # the programs the detections below use: (2, 192, 192) and the small image's own size
    large, small = random_images()
    logits, boxes = batched.forward(*padded_batch([small, large], (192, 192), np.float32))
    ones = np.ones((1, *small.shape[:2]), bool)
    expected_logits, expected_boxes = alone.forward(small[None].astype(np.float32), ones)
    scores, expected_scores = jax.nn.sigmoid(logits[0]), jax.nn.sigmoid(expected_logits[0])
    diff = max(max_diff(scores, expected_scores), max_diff(boxes[0], expected_boxes[0]))
    print(f"{backbone}: float32 max |padded - alone| {diff:.2e}")
    assert diff <= 1e-4

    rng = np.random.default_rng(6)
    small, large = (rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in SIZES[::-1])
    found = batched([small, large], threshold=0.0)[0]
    (expected,) = alone(small, threshold=0.0)
    assert batched.compiled_shapes == ((2, 192, 192),)  # the two images ran as one batch
    assert len(found) == len(expected) == TINY["num_queries"] * TINY["num_labels"]
    np.testing.assert_array_equal(found.labels, expected.labels)
    np.testing.assert_allclose(found.scores, expected.scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(found.boxes, expected.boxes, rtol=0, atol=1e-3)  # pixels


def call(model, pixels, invariant):
    return model(pixels, padding_invariant=invariant)


def test_convnext_image_too_small_with_padding_invariant():
    """The stem and three halvings need 32 pixels per side (patch 8): refused either way."""
    config = DeformableDetrConfig(**{**CONVNEXT, "backbone_patch_size": 8})
    model = filled_model(config, seed=7)
    pixels = jnp.ones((1, 24, 96, 3))
    for invariant in (False, True):
        with pytest.raises(ValueError, match="at least 32"):
            nnx.eval_shape(functools.partial(call, invariant=invariant), model, pixels)
