"""The backbone's and input projections' 1x1 convolutions as matrix products
(`backbone.pointwise_conv`) against `nnx.Conv`'s own `conv_general_dilated`: outputs and
gradients (input and kernel), jitted, within float32 rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformable_detr_jax.modeling.backbone import pointwise_conv


@pytest.mark.parametrize(
    "stride, use_bias, size", [(1, False, (7, 9)), (2, False, (7, 10)), (1, True, (6, 5))]
)
def test_pointwise_conv_equals_conv_and_its_gradients(stride, use_bias, size):
    conv = nnx.Conv(
        24, 40, (1, 1), strides=stride, padding="VALID", use_bias=use_bias, rngs=nnx.Rngs(0)
    )
    rng = np.random.default_rng(1)
    if use_bias:
        conv.bias[...] = jnp.asarray(rng.standard_normal(40), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, *size, 24)), jnp.float32)
    graphdef, params = nnx.split(conv)
    out_shape = conv(x).shape
    g = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

    def run(fn):
        def loss(params, x):
            return jnp.sum(fn(nnx.merge(graphdef, params), x) * g)

        @jax.jit
        def both(params, x):
            return fn(nnx.merge(graphdef, params), x), jax.grad(loss, argnums=(0, 1))(params, x)

        return both(params, x)

    (out, (grad_params, grad_x)) = run(lambda c, x: pointwise_conv(c, x, stride))
    (want, (want_params, want_x)) = run(lambda c, x: c(x))
    assert out.shape == want.shape == out_shape
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_x, want_x, rtol=1e-5, atol=1e-5)
    for (path, got), (_, expected) in zip(
        nnx.to_flat_state(grad_params), nnx.to_flat_state(want_params)
    ):
        np.testing.assert_allclose(got[...], expected[...], rtol=1e-4, atol=1e-4, err_msg=path)
