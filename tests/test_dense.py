"""The dense layers' product with the CPU filter gradient (`deformable_detr_jax.modeling.dense`).

Inside `cpu_filter_gradients()` (the CPU train step's trace) the gradients of
`dense_dot_general` equal autodiff's of `lax.dot_general` (float64 1e-12, float32 rounding),
jitted, for inputs narrower and wider than the outputs; the compiled CPU program gives every
product to YNNPACK (no Eigen `dot` for the filter gradient, which is what the backward is for);
outside the context, or for other dtypes than float32 and float64, it is `lax.dot_general`
itself. The tiny model's gradients follow it (the CPU train step is traced inside the context).
"""

from __future__ import annotations

import importlib.metadata
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformable_detr_jax.modeling.backbone import pointwise_conv
from deformable_detr_jax.modeling.dense import cpu_filter_gradients, dense_dot_general
from deformable_detr_jax.training.cpu.compiler import cpu_compiler_options

DENSE = (((2,), (0,)), ((), ()))  # (a, b, in) @ (in, out)


def _loss_and_grads(g, on: bool):
    """`(x, w) -> (sum(dense(x, w) * g), dx, dw)`, traced inside the context when `on`."""

    def loss(x, w):
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        return jnp.sum(dense_dot_general(x, w, dims) * g)

    def run(x, w):
        if not on:
            return loss(x, w), *jax.grad(loss, argnums=(0, 1))(x, w)
        with cpu_filter_gradients():
            return loss(x, w), *jax.grad(loss, argnums=(0, 1))(x, w)

    return run


def _grads(x, w, g, on: bool):
    """Jitted `(y, dx, dw)` of `sum(dense(x, w) * g)`."""
    return jax.jit(_loss_and_grads(g, on))(x, w)


def _inputs(shape, n_in, n_out, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((*shape, n_in)), dtype)
    w = jnp.asarray(rng.standard_normal((n_in, n_out)), dtype)
    g = jnp.asarray(rng.standard_normal((*shape, n_out)), dtype)
    return x, w, g


@pytest.mark.parametrize(
    "shape, n_in, n_out",
    [((2, 37), 16, 48), ((2, 37), 48, 16), ((3, 5, 7), 24, 24), ((301,), 8, 3)],
)
def test_gradients_equal_autodiff_in_float64(shape, n_in, n_out):
    with jax.enable_x64(True):
        x, w, g = _inputs(shape, n_in, n_out, jnp.float64)
        got = _grads(x, w, g, on=True)
        want = _grads(x, w, g, on=False)
        for a, b, name in zip(got, want, ("loss", "dx", "dw")):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("shape, n_in, n_out", [((2, 300), 64, 256), ((2, 300), 256, 64)])
def test_gradients_equal_autodiff_in_float32(shape, n_in, n_out):
    x, w, g = _inputs(shape, n_in, n_out, jnp.float32, seed=1)
    got = _grads(x, w, g, on=True)
    want = _grads(x, w, g, on=False)
    for a, b, name in zip(got, want, ("loss", "dx", "dw")):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(b).max(), err_msg=name)
    # and against float64 numpy: the filter gradient is sum over rows of x (x) g
    x64, g64 = (np.asarray(a, np.float64).reshape(-1, a.shape[-1]) for a in (x, g))
    want_dw = x64.T @ g64
    np.testing.assert_allclose(got[2], want_dw, rtol=0, atol=2e-6 * np.abs(want_dw).max())


def _jaxpr(on: bool, dtype=jnp.float32) -> str:
    x, w, g = _inputs((2, 5), 4, 6, dtype)
    return str(jax.make_jaxpr(_loss_and_grads(g, on))(x, w))


def test_only_float32_and_float64_inside_the_context_get_the_backward():
    assert "custom_vjp_call" in _jaxpr(on=True)
    assert "custom_vjp_call" not in _jaxpr(on=False)
    assert "custom_vjp_call" not in _jaxpr(on=True, dtype=jnp.bfloat16)
    # outside the context the forward is lax.dot_general itself, bit for bit
    x, w, _ = _inputs((3, 4), 8, 5, jnp.float32)
    np.testing.assert_array_equal(
        jax.jit(lambda x, w: dense_dot_general(x, w, DENSE))(x, w),
        jax.jit(lambda x, w: jax.lax.dot_general(x, w, DENSE))(x, w),
    )


def _top_level_dots(hlo: str) -> list[str]:
    """The `dot` instructions XLA:CPU runs itself (Eigen): those outside any fused computation."""
    dots, fused = [], False
    for line in hlo.split("\n"):
        if line and not line.startswith(" "):
            fused = not line.startswith("ENTRY")
        elif not fused and re.match(r"\s*(ROOT )?%[\w.\-]+ = \S+ dot\(", line):
            dots.append(line.strip())
    return dots


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU compile")
@pytest.mark.parametrize("n_in, n_out", [(64, 256), (256, 64)])
def test_the_filter_gradient_runs_in_ynnpack(n_in, n_out):
    """Autodiff's filter gradient contracts the rows of both operands, which XLA:CPU gives
    to Eigen; the backward's products all go to YNNPACK (the fusions named `ynn_fusion`)."""
    if not importlib.metadata.version("jaxlib").startswith("0.10."):
        pytest.skip("YNNPACK's dots are measured on jaxlib 0.10.x")
    x, w, g = _inputs((4, 512), n_in, n_out, jnp.float32)

    def hlo(on: bool) -> str:
        lowered = jax.jit(_loss_and_grads(g, on)).lower(x, w)
        return lowered.compile(compiler_options=cpu_compiler_options("cpu")).as_text()

    assert len(_top_level_dots(hlo(on=False))) == 1  # autodiff: the filter gradient in Eigen
    assert _top_level_dots(hlo(on=True)) == []
    assert hlo(on=True).count("__ynn_fusion") == 3  # the forward (with the loss), dx and dw


def test_pointwise_convolution_gradients_inside_the_context():
    """The backbone's 1x1 convolutions (4-D activations, stride 2) against `nnx.Conv`."""
    conv = nnx.Conv(24, 40, (1, 1), strides=2, padding="VALID", use_bias=True, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    conv.bias[...] = jnp.asarray(rng.standard_normal(40), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 9, 10, 24)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 5, 5, 40)), jnp.float32)
    graphdef, params = nnx.split(conv)

    def grads(fn, on):
        def loss(params, x):
            return jnp.sum(fn(nnx.merge(graphdef, params), x) * g)

        @jax.jit
        def run(params, x):
            if not on:
                return jax.grad(loss, argnums=(0, 1))(params, x)
            with cpu_filter_gradients():
                return jax.grad(loss, argnums=(0, 1))(params, x)

        return run(params, x)

    got_params, got_x = grads(lambda c, x: pointwise_conv(c, x, 2), on=True)
    want_params, want_x = grads(lambda c, x: c(x), on=False)
    np.testing.assert_allclose(got_x, want_x, rtol=0, atol=1e-5 * np.abs(want_x).max())
    for (path, got), (_, want) in zip(
        nnx.to_flat_state(got_params), nnx.to_flat_state(want_params)
    ):
        want = np.asarray(want[...])
        np.testing.assert_allclose(
            got[...], want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=str(path)
        )


def test_the_tiny_models_gradients_inside_the_context():
    """Every trained parameter of the tiny test model (its backbone's 1x1 convolutions, every
    Linear), jitted, with and without the CPU backward."""
    from deformable_detr_jax.training import mesh as mesh_lib
    from deformable_detr_jax.training.train_state import init_weights, model_spec
    from tests.training_workers import tiny_model_config

    config = tiny_model_config(dropout=0.0)
    spec = model_spec(config, ())
    params, frozen = init_weights(spec, 0, mesh_lib.make_data_mesh(jax.local_devices()[:1]))
    rng = np.random.default_rng(3)
    pixels = jnp.asarray(rng.standard_normal((2, 64, 64, 3)), jnp.float32)
    mask = jnp.ones((2, 64, 64), bool)
    logits_g = jnp.asarray(rng.standard_normal((2, config.num_queries, config.num_labels)))
    boxes_g = jnp.asarray(rng.standard_normal((2, config.num_queries, 4)))

    def loss(params):
        outputs = spec.merge(params, frozen)(pixels, mask, deterministic=True)
        return jnp.sum(outputs.logits * logits_g) + jnp.sum(outputs.pred_boxes * boxes_g)

    def grads(on):
        @jax.jit
        def run(params):
            if not on:
                return jax.grad(loss)(params)
            with cpu_filter_gradients():
                return jax.grad(loss)(params)

        return run(params)

    with cpu_filter_gradients():
        assert "custom_vjp_call" in str(jax.make_jaxpr(jax.grad(loss))(params))
    got, want = grads(on=True), grads(on=False)
    assert set(got) == set(want)
    for name in want:
        scale = np.abs(np.asarray(want[name])).max()
        np.testing.assert_allclose(
            got[name], want[name], rtol=0, atol=1e-5 * max(scale, 1e-6), err_msg=name
        )
