"""The product of a dense layer, `x (..., in) @ w (in, out)`, with a filter gradient that
XLA:CPU runs through YNNPACK.

The filter gradient of a dense layer, `dw (in, out) = x (rows, in).T @ g (rows, out)`,
contracts the leading axis of both operands. jaxlib's XLA:CPU gives that product to Eigen, not
to YNNPACK, after copying one operand transposed in one fusion with the elementwise work before
it (a ReLU's mask, a frozen batch norm's scale), a copy it runs far slower than a plain
transpose. Inside `cpu_filter_gradients()` (the CPU train step's trace) `dense_dot_general`
has a backward that transposes the narrower operand as a plain copy of its computed value and
gives YNNPACK an ordinary `(in, rows) @ (rows, out)` (or `(out, rows) @ (rows, in)`, then
transposed) product. Measured alone on the 2-core CPU (jaxlib 0.10.2; BENCHMARKS.md, "Issue 14
on 2026-12-05, later"): a filter gradient over 8160 rows, 1024 -> 256, 33.6 ms in Eigen against
22.3 ms this way; a `(8160, 1024)` transpose fused with a ReLU's `where` 30.9 ms against 7.9 ms
for the plain transpose. Outside the context (inference, export, other platforms) and for
dtypes other than float32 and float64 it is `lax.dot_general` itself.

    dense_layer(in_features, out_features, rngs=rngs)  # an nnx.Linear with this product
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

_ON = contextvars.ContextVar("cpu_filter_gradients", default=False)


@contextlib.contextmanager
def cpu_filter_gradients() -> Iterator[None]:
    """Dense layers traced inside use the backward above (for a program compiled for CPU)."""
    token = _ON.set(True)
    try:
        yield
    finally:
        _ON.reset(token)


def dense_layer(in_features: int, out_features: int, *, rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
    """`nnx.Linear(in_features, out_features, ...)` computing its product with
    `dense_dot_general`; `kwargs` are `nnx.Linear`'s (initialisers)."""
    return nnx.Linear(in_features, out_features, dot_general=dense_dot_general, rngs=rngs, **kwargs)


def dense_dot_general(
    lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, **kwargs
) -> jax.Array:
    """`lax.dot_general`, as `nnx.Linear` calls it; a float32 (or float64) dense product (last
    axis of `lhs` against the first of a 2-D `rhs`, no batch axes) inside
    `cpu_filter_gradients()` gets the CPU backward."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    dense = (
        _ON.get()
        and rhs.ndim == 2
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


def _dense_grads(precision, x, w, g):
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
