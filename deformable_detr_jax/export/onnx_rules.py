"""Conversion rules that jax2onnx lacks: the sampling core as ONNX `GridSample`, NHWC max pool.

jax2onnx lowers a JAX program primitive by primitive through a registry of plugins. Two parts
of Deformable DETR need rules of their own, added here through that plugin mechanism and active
only inside `onnx_rules()` (the ONNX export enters it around the conversion):

- The multi-scale deformable attention core. The `"xla"` implementation (`pallas_kernels/
  ms_deform_attn/xla.py`) gathers rows with computed indices, in chunks of rows under
  `fori_loop` on CPU; converted as it is that becomes `GatherND` plus `Loop` and materialises four
  corner rows per sample. ONNX has the exact operation instead: `GridSample` (opset 16+, bilinear,
  `align_corners=0`, zero padding) is `torch.nn.functional.grid_sample`, which the original
  PyTorch core (`ms_deform_attn_core_pytorch`) calls per level. `ms_deform_attn_grid_sample` is
  that formulation in JAX over the primitive `grid_sample_p`; its JAX implementation
  (`grid_sample`, pure jnp) is tested against the reference, and the plugin lowers the primitive
  to one `GridSample` node. Inside `onnx_rules()` the model's attention modules call it instead
  of `pallas_kernels.ms_deform_attn`.
- The backbone's 3x3 stride-2 max pool on NHWC. jax2onnx's rule for `reduce_window_max` pools
  over every axis (a 4-D pool for a 4-D array), which onnxruntime refuses ("Unsupported pooling
  size"). `_NhwcMaxPoolPlugin` lowers a window that is 1 on the batch and channel axes to
  Transpose -> 2-D `MaxPool` -> Transpose and leaves every other case to jax2onnx's rule.

`flat_function` hands jax2onnx the program traced once with its nested calls inlined (`jit`, and
`custom_jvp_call`, whose derivative rule an inference graph never needs): one first-order jaxpr.
jax2onnx 0.17.1's own `jit` rule reads `jax.core.ClosedJaxpr`, which jax 0.12 merged into
`Jaxpr`; inlined, the conversion does not depend on it, on either jax. Two consequences are
handled here: Linear layers on 3-D activations become 2-D products (`Gemm`, not `Einsum`), and
jax2onnx's folding of broadcasts of constants (which inlining exposes: `jnp.where(mask, x, 0)`
broadcasts a zero to the whole feature map) is kept to small results, so that the file holds
the weights and not copies of zero-filled feature maps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import jax
import jax.extend
import jax.numpy as jnp
import onnx_ir as ir
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax2onnx.plugins import plugin_system
from jax2onnx.plugins.jax.lax import broadcast_in_dim as jax2onnx_broadcast
from jax2onnx.plugins.jax.lax.reduce_window_max import ReduceWindowMaxPrimitivePlugin
from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin

from deformable_detr_jax.modeling import deformable_attention

# ----------------------------------------------------------------------------- grid sample


def _accumulation_dtype(dtype) -> jnp.dtype:
    """float32, or float64 for float64 when x64 is on. Under jax2onnx, activations after a
    LayerNorm (which its rule computes in float64) claim float64 even when x64 is off: the
    dtypes are canonicalised, as JAX would truncate them anyway."""
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


def grid_sample(x: jax.Array, grid: jax.Array) -> jax.Array:
    """ONNX `GridSample(mode="linear", padding_mode="zeros", align_corners=0)` in jnp.

    Args:
      x: `(n, c, h, w)`.
      grid: `(n, h_out, w_out, 2)` as (x, y) in [-1, 1] (-1: the left/top edge of the first
        pixel, 1: the right/bottom edge of the last); outside points read zeros.

    Returns:
      `(n, c, h_out, w_out)` in `x.dtype`, accumulated in float32 (float64 for float64 input).
    """
    n, c, height, width = x.shape
    _, h_out, w_out, _ = grid.shape
    acc = _accumulation_dtype(x.dtype)
    grid = grid.astype(acc)
    # pixel coordinates (align_corners=0): ((g + 1) * size - 1) / 2
    px = ((grid[..., 0] + 1) * width - 1) / 2
    py = ((grid[..., 1] + 1) * height - 1) / 2
    x0, y0 = jnp.floor(px), jnp.floor(py)
    fx, fy = px - x0, py - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    # (n, c, h * w)
    table = x.astype(acc).reshape(n, c, height * width)
    out = jnp.zeros((n, c, h_out * w_out), acc)
    for dy, dx, weight in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        xi, yi = x0 + dx, y0 + dy
        valid = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        # (n, h_out * w_out)
        idx = (jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)).reshape(n, -1)
        rows = jnp.take_along_axis(table, idx[:, None, :], axis=2)
        out = out + rows * jnp.where(valid, weight, 0).reshape(n, 1, -1)
    return out.reshape(n, c, h_out, w_out).astype(x.dtype)


grid_sample_p = Primitive("deformable_detr_jax.grid_sample")
grid_sample_p.def_impl(grid_sample)
grid_sample_p.def_abstract_eval(
    lambda x, grid: jax.core.ShapedArray((x.shape[0], x.shape[1], *grid.shape[1:3]), x.dtype)
)
mlir.register_lowering(grid_sample_p, mlir.lower_fun(grid_sample, multiple_results=False))


def ms_deform_attn_grid_sample(
    value: jax.Array,
    spatial_shapes,
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
    *,
    implementation: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """The sampling core as per-level grid samples (the original PyTorch formulation).

    Same arguments, semantics and result as `pallas_kernels.ms_deform_attn` (`implementation`
    and `interpret` are accepted and ignored): `value (bs, len_v, nheads, head_dim)`,
    `sampling_locations (bs, len_q, nheads, nlevels, npoints, 2)` (x, y) in [0, 1],
    `attention_weights (bs, len_q, nheads, nlevels, npoints)` -> `(bs, len_q, nheads *
    head_dim)` in `value.dtype`, accumulated in float32.
    """
    del implementation, interpret
    bs, len_v, nheads, head_dim = value.shape
    _, len_q, _, nlevels, npoints, _ = sampling_locations.shape
    acc = _accumulation_dtype(value.dtype)
    # (bs, len_v, nheads, head_dim) -> (bs * nheads, head_dim, len_v)
    value_t = jnp.transpose(value.astype(acc), (0, 2, 3, 1)).reshape(bs * nheads, head_dim, len_v)
    # (bs, len_q, nheads, nlevels, npoints, 2) -> (bs * nheads, nlevels, len_q, npoints, 2)
    grids = jnp.transpose(2 * sampling_locations.astype(acc) - 1, (0, 2, 3, 1, 4, 5))
    grids = grids.reshape(bs * nheads, nlevels, len_q, npoints, 2)
    # (bs, len_q, nheads, nlevels, npoints) -> (bs * nheads, 1, nlevels, len_q, npoints)
    weights = jnp.transpose(attention_weights.astype(acc), (0, 2, 3, 1, 4))
    weights = weights.reshape(bs * nheads, 1, nlevels, len_q, npoints)
    out = None
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        # (bs * nheads, head_dim, height, width)
        value_l = value_t[:, :, start : start + height * width].reshape(
            bs * nheads, head_dim, height, width
        )
        start += height * width
        # (bs * nheads, head_dim, len_q, npoints) -> (bs * nheads, head_dim, len_q)
        sampled = grid_sample_p.bind(value_l, grids[:, level])
        sampled = jnp.sum(sampled * weights[:, :, level], axis=-1)
        out = sampled if out is None else out + sampled
    # (bs * nheads, head_dim, len_q) -> (bs, len_q, nheads * head_dim)
    out = jnp.transpose(out.reshape(bs, nheads, head_dim, len_q), (0, 3, 1, 2))
    return out.reshape(bs, len_q, nheads * head_dim).astype(
        jax.dtypes.canonicalize_dtype(value.dtype)
    )


def _output_name(ctx, out_spec, hint: str) -> str:
    name = getattr(out_spec, "name", None) or ctx.fresh_name(hint)
    producer = getattr(out_spec, "producer", lambda: None)
    return ctx.fresh_name(hint) if callable(producer) and producer() is not None else name


def _bind(ctx, out_var, out_spec, result) -> None:
    if getattr(out_spec, "type", None) is not None:
        result.type = out_spec.type
    if getattr(out_spec, "shape", None) is not None:
        result.shape = out_spec.shape
    ctx.bind_value_for_var(out_var, result)


class _GridSamplePlugin(PrimitiveLeafPlugin):
    """`grid_sample_p` -> one ONNX `GridSample` node."""

    def lower(self, ctx, eqn) -> None:
        x_var, grid_var = eqn.invars
        (out_var,) = eqn.outvars
        x = ctx.get_value_for_var(x_var, name_hint=ctx.fresh_name("grid_sample_x"))
        grid = ctx.get_value_for_var(grid_var, name_hint=ctx.fresh_name("grid_sample_grid"))
        out_spec = ctx.get_value_for_var(out_var, name_hint=ctx.fresh_name("grid_sample_out"))
        result = ctx.builder.GridSample(
            x,
            grid,
            _outputs=[_output_name(ctx, out_spec, "grid_sample_out")],
            mode="linear",
            padding_mode="zeros",
            align_corners=0,
        )
        _bind(ctx, out_var, out_spec, result)


# ----------------------------------------------------------------------------- max pool


def _nhwc_pool(eqn) -> bool:
    """A 4-D window that is 1 (stride 1, no padding) on axes 0 and 3: a 2-D pool over NHWC."""
    params = eqn.params
    if len(params["window_dimensions"]) != 4:
        return False
    trivial = all(
        params["window_dimensions"][a] == 1
        and params["window_strides"][a] == 1
        and tuple(params["padding"][a]) == (0, 0)
        for a in (0, 3)
    )
    dilated = any(d != 1 for d in params["base_dilation"])
    return trivial and not dilated


class _NhwcMaxPoolPlugin(ReduceWindowMaxPrimitivePlugin):
    """jax2onnx's `reduce_window_max` rule, plus NHWC 2-D pools as 2-D `MaxPool` on NCHW."""

    def lower(self, ctx, eqn) -> None:
        if not _nhwc_pool(eqn):
            return super().lower(ctx, eqn)
        params = eqn.params
        (x_var,) = eqn.invars
        (out_var,) = eqn.outvars
        x = ctx.get_value_for_var(x_var, name_hint=ctx.fresh_name("max_pool_in"))
        out_spec = ctx.get_value_for_var(out_var, name_hint=ctx.fresh_name("max_pool_out"))
        nchw = ctx.builder.Transpose(
            x, _outputs=[ctx.fresh_name("max_pool_nchw")], perm=[0, 3, 1, 2]
        )
        nchw.type = ir.TensorType(x.dtype)
        b, h, w, c = x_var.aval.shape
        nchw.shape = ir.Shape([b, c, h, w])
        (top, bottom), (left, right) = params["padding"][1], params["padding"][2]
        pooled = ctx.builder.MaxPool(
            nchw,
            _outputs=[ctx.fresh_name("max_pool")],
            kernel_shape=list(params["window_dimensions"][1:3]),
            strides=list(params["window_strides"][1:3]),
            pads=[int(top), int(left), int(bottom), int(right)],
            dilations=list(params["window_dilation"][1:3]),
        )
        pooled.type = ir.TensorType(x.dtype)
        b, ho, wo, c = out_var.aval.shape
        pooled.shape = ir.Shape([b, c, ho, wo])
        result = ctx.builder.Transpose(
            pooled, _outputs=[_output_name(ctx, out_spec, "max_pool_out")], perm=[0, 2, 3, 1]
        )
        _bind(ctx, out_var, out_spec, result)


# ----------------------------------------------------------------------------- inlining

_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
}


def _dense_layer(eqn) -> bool:
    """`x (..., k) @ w (k, n)`: no batch dimensions, the last axis of x against the first of a
    2-D w (a Linear layer on a (bs, len, d_model) activation)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    lhs, rhs = (var.aval for var in eqn.invars)
    return (
        not lhs_batch
        and not rhs_batch
        and lhs.ndim > 2
        and rhs.ndim == 2
        and tuple(lhs_contract) == (lhs.ndim - 1,)
        and tuple(rhs_contract) == (0,)
    )


def _as_matrix_product(eqn, lhs, rhs):
    """The same product on `lhs` flattened to 2-D: jax2onnx lowers a 2-D product to `Gemm`, and
    one with more axes to `Einsum`, which onnxruntime runs slower (BENCHMARKS.md "Export")."""
    params = {**eqn.params, "dimension_numbers": (((1,), (0,)), ((), ()))}
    # (bs, len, d) -> (bs * len, d) @ (d, n) -> (bs, len, n)
    out = eqn.primitive.bind(jnp.reshape(lhs, (-1, lhs.shape[-1])), rhs, **params)
    return jnp.reshape(out, (*lhs.shape[:-1], rhs.shape[1]))


def _evaluate(jaxpr, consts, args) -> list:
    """Binds `jaxpr`'s equations on `args`, evaluating the bodies of `_CALLS` in place."""
    env = {}

    def read(var):
        return var.val if isinstance(var, jax.extend.core.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        values = [read(var) for var in eqn.invars]
        name = eqn.primitive.name
        if name == "dot_general" and _dense_layer(eqn):
            outs = [_as_matrix_product(eqn, *values)]
        elif name in _CALLS:
            body = eqn.params[_CALLS[name]]  # a ClosedJaxpr (jax < 0.11: .jaxpr is the Jaxpr)
            outs = _evaluate(body.jaxpr, body.consts, values)
        else:
            outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(var) for var in jaxpr.outvars]


def flat_function(fn, shapes):
    """`fn` traced on `shapes` (inside `onnx_rules()`: with the grid-sample core), as a function
    of the same arguments whose trace has no nested calls (see the module docstring)."""
    closed = jax.make_jaxpr(fn)(*shapes)

    def flat(*args):
        return tuple(_evaluate(closed.jaxpr, closed.consts, args))

    return flat


# ----------------------------------------------------------------------------- constant folding

# Largest broadcast of a constant that jax2onnx may store as a materialised initializer.
FOLD_LIMIT = 4096
_fold_broadcast = jax2onnx_broadcast._maybe_inline_constant_broadcast


def _fold_small_broadcasts(ctx, out_var, x_val, shape, *args):
    """jax2onnx's constant-broadcast folding for results of at most `FOLD_LIMIT` elements;
    larger ones stay `Expand` nodes."""
    try:
        size = math.prod(int(d) for d in shape)
    except TypeError:  # a symbolic dimension: leave it to jax2onnx
        size = 0
    if size > FOLD_LIMIT:
        return False
    return _fold_broadcast(ctx, out_var, x_val, shape, *args)


# ----------------------------------------------------------------------------- activation


def _new_plugin(cls, primitive: str) -> PrimitiveLeafPlugin:
    plugin = cls()
    plugin.primitive = primitive
    plugin.metadata = {"jaxpr_primitive": primitive, "context": "deformable_detr_jax.export"}
    return plugin


@contextlib.contextmanager
def onnx_rules() -> Iterator[None]:
    """Within: jax2onnx converts `grid_sample_p` and NHWC max pools and folds only small constant
    broadcasts, and Deformable DETR's attention modules sample through
    `ms_deform_attn_grid_sample`. Everything is restored on exit (jax2onnx's own rules and
    folding, the attention modules' sampling core)."""
    plugin_system.import_all_plugins()  # jax2onnx's rules first, so that ours replace theirs
    registry = plugin_system.PLUGIN_REGISTRY
    ours = {
        grid_sample_p.name: _new_plugin(_GridSamplePlugin, grid_sample_p.name),
        jax.lax.reduce_window_max_p.name: _new_plugin(
            _NhwcMaxPoolPlugin, jax.lax.reduce_window_max_p.name
        ),
    }
    saved = {name: registry.get(name) for name in ours}
    core = deformable_attention.ms_deform_attn
    registry.update(ours)
    deformable_attention.ms_deform_attn = ms_deform_attn_grid_sample
    jax2onnx_broadcast._maybe_inline_constant_broadcast = _fold_small_broadcasts
    try:
        yield
    finally:
        jax2onnx_broadcast._maybe_inline_constant_broadcast = _fold_broadcast
        deformable_attention.ms_deform_attn = core
        for name, plugin in saved.items():
            if plugin is None:
                registry.pop(name, None)
            else:
                registry[name] = plugin


__all__ = [
    "flat_function",
    "grid_sample",
    "grid_sample_p",
    "ms_deform_attn_grid_sample",
    "onnx_rules",
]
