"""The CPU train step's dense products (`deformable_detr_jax.training.cpu.filter_gradients`).

`filter_gradient_dot_general`'s gradients equal autodiff's of `lax.dot_general` (float64 1e-12,
float32 rounding), jitted, for inputs narrower and wider than the outputs; the compiled CPU
program gives every product to YNNPACK (no Eigen `dot` for the filter gradient, which is what
the backward is for); for other dtypes it is `lax.dot_general` itself. `use_filter_gradients`
puts it into every dense layer and 1x1 convolution of a model without changing its parameters,
and the package's jitted CPU train step, which applies it, gives the gradients of the step
without it.
"""

from __future__ import annotations

import importlib.metadata
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deformable_detr_jax.modeling.backbone import pointwise_conv
from deformable_detr_jax.training import cpu
from deformable_detr_jax.training.cpu.compiler import cpu_compiler_options
from deformable_detr_jax.training.cpu.filter_gradients import (
    filter_gradient_dot_general,
    use_filter_gradients,
)

DENSE = (((2,), (0,)), ((), ()))  # (a, b, in) @ (in, out)


def _loss_and_grads(g, on: bool):
    """`(x, w) -> (sum(dense(x, w) * g), dx, dw)`, with the CPU product when `on`."""
    product = filter_gradient_dot_general if on else jax.lax.dot_general

    def loss(x, w):
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        return jnp.sum(product(x, w, dims) * g)

    return lambda x, w: (loss(x, w), *jax.grad(loss, argnums=(0, 1))(x, w))


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


def test_only_float32_and_float64_get_the_backward():
    assert "custom_vjp_call" in _jaxpr(on=True)
    assert "custom_vjp_call" not in _jaxpr(on=False)
    assert "custom_vjp_call" not in _jaxpr(on=True, dtype=jnp.bfloat16)
    # the forward is lax.dot_general itself, bit for bit
    x, w, _ = _inputs((3, 4), 8, 5, jnp.float32)
    np.testing.assert_array_equal(
        jax.jit(lambda x, w: filter_gradient_dot_general(x, w, DENSE))(x, w),
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


def test_pointwise_convolution_gradients_with_the_cpu_product():
    """The backbone's 1x1 convolutions (4-D activations, stride 2) against `nnx.Conv`."""
    conv = nnx.Conv(24, 40, (1, 1), strides=2, padding="VALID", use_bias=True, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    conv.bias[...] = jnp.asarray(rng.standard_normal(40), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 9, 10, 24)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 5, 5, 40)), jnp.float32)
    graphdef, params = nnx.split(conv)

    def grads(fn):
        def loss(params, x):
            return jnp.sum(fn(nnx.merge(graphdef, params), x) * g)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    got_params, got_x = grads(lambda c, x: pointwise_conv(c, x, 2, filter_gradient_dot_general))
    want_params, want_x = grads(lambda c, x: c(x))
    np.testing.assert_allclose(got_x, want_x, rtol=0, atol=1e-5 * np.abs(want_x).max())
    for (path, got), (_, want) in zip(
        nnx.to_flat_state(got_params), nnx.to_flat_state(want_params)
    ):
        want = np.asarray(want[...])
        np.testing.assert_allclose(
            got[...], want, rtol=0, atol=1e-5 * max(np.abs(want).max(), 1e-6), err_msg=str(path)
        )


def _tiny_model_config():
    from tests.training_workers import tiny_model_config

    # bottleneck blocks: 1x1 reduce/expand convolutions and shortcuts
    return tiny_model_config(dropout=0.0, backbone_layer_type="bottleneck")


def test_use_filter_gradients_reaches_every_dense_layer_and_keeps_the_parameters():
    from deformable_detr_jax.modeling.detector import DeformableDetrForObjectDetection

    model = DeformableDetrForObjectDetection(_tiny_model_config(), rngs=nnx.Rngs(0))
    before = nnx.to_flat_state(nnx.state(model, nnx.Param))
    layers = [m for _, m in nnx.iter_modules(model) if hasattr(m, "dot_general")]
    linears = [m for m in layers if isinstance(m, nnx.Linear)]
    assert len(linears) > 10 and len(layers) - len(linears) >= 5  # 1x1 convolutions too
    assert all(m.dot_general is jax.lax.dot_general for m in layers)  # as built: plain
    assert use_filter_gradients(model) is model
    assert all(m.dot_general is filter_gradient_dot_general for m in layers)
    after = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert [path for path, _ in before] == [path for path, _ in after]
    for (path, a), (_, b) in zip(before, after):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def _gradient_keeper() -> optax.GradientTransformation:
    """An "optimizer" whose state is the last gradients and that leaves the parameters alone."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


def _train_step_gradients(prepared: bool, monkeypatch) -> tuple[dict, str]:
    """The package's jitted train step on one CPU, one step of the tiny model on a random
    batch: `(gradients, jaxpr text)`, with `cpu.prepare_model` as it is or a no-op."""
    from deformable_detr_jax.criterion.loss import LossConfig
    from deformable_detr_jax.training import mesh as mesh_lib
    from deformable_detr_jax.training.step import make_train_step
    from deformable_detr_jax.training.train_state import (
        create_train_state,
        init_weights,
        model_spec,
    )

    if not prepared:
        monkeypatch.setattr(cpu, "prepare_model", lambda model: model)
    config = _tiny_model_config()
    mesh = mesh_lib.make_data_mesh(jax.local_devices(backend="cpu")[:1])
    spec = model_spec(config, ())
    params, frozen = init_weights(spec, 0, mesh)
    tx = _gradient_keeper()
    state = create_train_state(params, frozen, tx, mesh)
    step = make_train_step(spec, LossConfig.preset("original", 3), tx, mesh, state)
    rng = np.random.default_rng(4)
    batch = {
        "pixel_values": rng.normal(size=(1, 2, 64, 64, 3)).astype(np.float32),
        "pixel_mask": np.ones((1, 2, 64, 64), bool),
        "labels": rng.integers(0, 3, (1, 2, 4)).astype(np.int32),
        "boxes": np.concatenate(
            [rng.uniform(0.3, 0.7, (1, 2, 4, 2)), rng.uniform(0.1, 0.3, (1, 2, 4, 2))], -1
        ).astype(np.float32),
        "mask": np.array([[[True, True, True, False], [True, False, False, False]]]),
    }
    batch = mesh_lib.host_to_global(batch, mesh, 1)
    key = jax.random.key(0)
    jaxpr = step.lower(state, batch, key).as_text()
    new_state, metrics = step(state, batch, key)
    assert np.isfinite(float(metrics["loss"]))
    return {name: np.asarray(g) for name, g in new_state.opt_state.items()}, jaxpr


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU train step")
def test_the_cpu_train_step_gives_the_gradients_it_gives_without_the_cpu_products(monkeypatch):
    got, got_program = _train_step_gradients(True, monkeypatch)
    want, want_program = _train_step_gradients(False, monkeypatch)
    # the CPU product is in the prepared program only (the barriers of its backward)
    barriers = [p.count("optimization_barrier") for p in (got_program, want_program)]
    assert barriers[0] > barriers[1], barriers
    assert set(got) == set(want)
    scale = max(np.abs(g).max() for g in want.values())
    assert scale > 0
    # most trained tensors get a gradient (the zero-initialised last box layer blocks a few)
    reached = [name for name in want if np.abs(want[name]).max() > 0]
    assert len(reached) > 0.8 * len(want), sorted(set(want) - set(reached))
    for name in want:
        np.testing.assert_allclose(
            got[name],
            want[name],
            rtol=1e-4,
            atol=1e-5 * max(np.abs(want[name]).max(), 1e-3 * scale),
            err_msg=name,
        )
