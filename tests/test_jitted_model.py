"""What users run is jitted (`Detector.forward`, the exports, the train step): the jitted model
in float32 and float64 against the eager float64 model, an independent truth (issue 24).

XLA:CPU contracts multiply-adds into FMAs in some fusions and not in others, so a jitted
program can compute the same expression two ways. A freshly initialised model puts about a
fifth of its encoder samples exactly on pixel centres, where that used to choose the sampled
pixels and their weights from different sides (errors of 0.3 to 1.1 in logits, jaxlib 0.10.2
and 0.12.1). Transformers' numbers for the jitted model: tests/test_model_vs_transformers.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformable_detr_jax import (
    DeformableDetrForObjectDetection,
    convert_state_dict,
    export_state_dict,
)
from deformable_detr_jax.criterion.loss import LossConfig, loss_from_outputs
from deformable_detr_jax.training.cpu import prepare_model
from tests.random_models import random_model, small_config

VARIANTS = {
    "plain": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "single_scale_dc5": {"num_feature_levels": 1, "dilation": True},
}


def _model(variant: str, init: str) -> DeformableDetrForObjectDetection:
    config = small_config(**VARIANTS[variant])
    if init == "fresh":  # the initialisation: zero offset kernels, grid biases, on centres
        return DeformableDetrForObjectDetection(config, rngs=nnx.Rngs(0))
    return random_model(config, seed=5)


def _batch(seed: int = 0):
    """Two random 96 x 128 images, the first unpadded, the second padded to 64 x 100."""
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, 96, 128, 3))
    mask = np.ones((2, 96, 128), bool)
    mask[1, 64:] = False
    mask[1, :, 100:] = False
    return pixels, mask


@nnx.jit
def _forward(model, pixels, mask):
    out = model(pixels, mask)
    return out.logits, out.pred_boxes


def _eager_float64(model):
    """The float64 copy of `model` (its float32 weights, exactly) and a function of it."""
    return convert_state_dict(export_state_dict(model), model.config, dtype=jnp.float64)


def _assert_close(got, want, tol: float, what: str) -> None:
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol, err_msg=what)


# Every variant as initialised (points on centres); perturbed weights (points anywhere) once
# here, and for every variant against transformers (eager: tests/test_parity.py).
CASES = [(variant, "fresh") for variant in sorted(VARIANTS)] + [("two_stage", "perturbed")]


@pytest.mark.parametrize("variant, init", CASES)
def test_jitted_model_equals_eager_float64(variant, init):
    model = _model(variant, init)
    pixels, mask = _batch()
    with jax.enable_x64(True):
        model64 = _eager_float64(model)
        out = model64(jnp.asarray(pixels), jnp.asarray(mask))
        want = (np.asarray(out.logits), np.asarray(out.pred_boxes))
        jitted64 = _forward(model64, jnp.asarray(pixels), jnp.asarray(mask))
        assert jitted64[0].dtype == jnp.float64
    jitted32 = _forward(model, jnp.asarray(pixels, jnp.float32), jnp.asarray(mask))
    for name, got64, got32, expected in zip(("logits", "boxes"), jitted64, jitted32, want):
        _assert_close(got64, expected, 1e-9, f"jitted float64 {name}")
        _assert_close(got32, expected, 1e-4, f"jitted float32 {name}")


def _gradients(model, pixels, mask, targets, jit: bool) -> dict[str, np.ndarray]:
    """Gradients of the training loss w.r.t. every parameter, eager or jitted as the CPU train
    step traces its loss (its model prepared by `training.cpu.prepare_model`)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    labels, boxes, box_mask = targets
    loss_config = LossConfig.from_model_config(model.config)

    def loss(params, pixels):
        model = nnx.merge(graphdef, params, rest)
        outputs = (prepare_model(model) if jit else model)(pixels, mask, deterministic=True)
        return loss_from_outputs(
            outputs, labels, boxes.astype(pixels.dtype), box_mask, loss_config
        )[0]

    if jit:
        grads = jax.jit(jax.grad(loss))
    else:
        grads = jax.grad(loss)
    flat = nnx.to_flat_state(grads(params, pixels))
    return {"/".join(map(str, path)): np.asarray(var[...], np.float64) for path, var in flat}


def _assert_gradients_close(got, want, tol: float, what: str) -> None:
    assert set(got) == set(want)
    scale = max(np.abs(g).max() for g in want.values())
    assert scale > 0
    for name in want:
        np.testing.assert_allclose(
            got[name],
            want[name],
            rtol=tol,
            atol=tol * max(np.abs(want[name]).max(), 1e-3 * scale),
            err_msg=f"{what}: {name}",
        )


def test_jitted_gradients_equal_eager_on_a_fresh_model():
    """The train step's loss gradients, jitted, on the two-stage box-refinement model as
    initialised (samples on pixel centres), float64 against eager float64 to 1e-9. (Not float32
    against float64: the float32 initial offsets, e.g. cos(pi/2) = -4.4e-8, put float64 points
    a hair beside a centre where float32 rounds them onto it, and the location gradient jumps
    there; both are right. The float32 forward is checked above.)"""
    model = _model("two_stage", "fresh")
    pixels, mask = _batch(seed=1)
    mask = jnp.asarray(mask)
    rng = np.random.default_rng(2)
    centres = rng.uniform(0.3, 0.7, (2, 3, 2))
    targets = (
        jnp.asarray(rng.integers(0, model.config.num_labels, (2, 3))),
        jnp.asarray(np.concatenate([centres, rng.uniform(0.1, 0.3, (2, 3, 2))], -1)),
        jnp.asarray([[True, True, True], [True, True, False]]),
    )
    with jax.enable_x64(True):
        model64 = _eager_float64(model)
        x64 = jnp.asarray(pixels)
        want64 = _gradients(model64, x64, mask, targets, jit=False)
        got64 = _gradients(model64, x64, mask, targets, jit=True)
    _assert_gradients_close(got64, want64, 1e-9, "jitted float64")
