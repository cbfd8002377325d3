"""The product of a dense layer, `x (..., in) @ w (in, out)`, with a filter gradient that
XLA:CPU runs through YNNPACK; the CPU train step puts it into every dense layer of its model.

The filter gradient of a dense layer, `dw (in, out) = x (rows, in).T @ g (rows, out)`,
contracts the leading axis of both operands. jaxlib's XLA:CPU gives that product to Eigen, not
to YNNPACK, after copying one operand transposed in one fusion with the elementwise work before
it (a ReLU's mask, a frozen batch norm's scale), a copy it runs far slower than a plain
transpose. `filter_gradient_dot_general` has a backward that transposes the narrower operand as
a plain copy of its computed value and gives YNNPACK an ordinary `(in, rows) @ (rows, out)` (or
`(out, rows) @ (rows, in)`, then transposed) product. Measured alone on the 2-core CPU (jaxlib
0.10.2; BENCHMARKS.md, "Issue 14 on 2026-12-05, later"): a filter gradient over 8160 rows,
1024 -> 256, 33.6 ms in Eigen against 22.3 ms this way; a `(8160, 1024)` transpose fused with
a ReLU's `where` 30.9 ms against 7.9 ms for the plain transpose. For other products (batch
axes, a 3-D kernel) and dtypes other than float32 and float64 it is `lax.dot_general` itself.

The model knows nothing of this: its layers compute with a `dot_general` attribute
(`nnx.Linear`'s, and the backbone's 1x1 convolutions'), `lax.dot_general` by default.
`use_filter_gradients(model)` sets it on every such layer of a model, as the CPU train step
does to the model it merges inside its trace (`training.step.make_train_step`); inference,
export and the other platforms never see it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def use_filter_gradients(model: nnx.Module) -> nnx.Module:
    """Sets `filter_gradient_dot_general` as the product of every layer of `model` that has a
    `dot_general` (in place; the parameters and their names stay the same). Returns `model`."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "dot_general"):
            module.dot_general = filter_gradient_dot_general
    return model


def filter_gradient_dot_general(
    lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, **kwargs
) -> jax.Array:
    """`lax.dot_general`, as `nnx.Linear` calls it; a float32 (or float64) dense product (last
    axis of `lhs` against the first of a 2-D `rhs`, no batch axes) gets the backward above."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    dense = (
        rhs.ndim == 2
        and tuple(lhs_contract) == (lhs.ndim - 1,)
        and tuple(rhs_contract) == (0,)
        and batch == ((), ())
        and lhs.dtype == rhs.dtype
        and lhs.dtype in (jnp.float32, jnp.float64)
        and kwargs.get("preferred_element_type") in (None, lhs.dtype)
        and kwargs.get("out_sharding") is None
    )
    if not dense:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, **kwargs)
    return _dense(lhs, rhs, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x: jax.Array, w: jax.Array, precision) -> jax.Array:
    # (..., in) @ (in, out) -> (..., out)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision)


def _dense_fwd(x, w, precision):
    return _dense(x, w, precision), (x, w)


def _dense_bwd(precision, residuals, g):
    with jax.named_scope("backward"):  # as autodiff's `transpose(...)` (benchmarks/train_parts.py)
        return _dense_grads(precision, *residuals, g)


def _dense_grads(
    precision, x: jax.Array, w: jax.Array, g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`(dx (..., in), dw (in, out))` for `x (..., in)`, `w (in, out)`, `g (..., out)`."""
    # dx (..., in) = g (..., out) @ w.T: YNNPACK takes the transposed right operand as it is
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision)
    x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
    g2 = g.reshape(-1, g.shape[-1])  # (rows, out)
    barrier = jax.lax.optimization_barrier
    if x2.shape[1] <= g2.shape[1]:
        # (in, rows) @ (rows, out): x's plain transpose (the barriers keep XLA from fusing it
        # with x's producer or folding it back into the product's dimension numbers)
        x_t = barrier(barrier(x2).T)
        dw = jax.lax.dot_general(x_t, g2, (((1,), (0,)), ((), ())), precision)
    else:
        # ((out, rows) @ (rows, in)).T
        g_t = barrier(barrier(g2).T)
        dw = barrier(jax.lax.dot_general(g_t, x2, (((1,), (0,)), ((), ())), precision)).T
    return dx, dw


_dense.defvjp(_dense_fwd, _dense_bwd)
