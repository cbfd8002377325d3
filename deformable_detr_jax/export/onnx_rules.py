"""Conversion rules that jax2onnx lacks: the sampling core as ONNX `GridSample`, NHWC max pool.

jax2onnx lowers a JAX program primitive by primitive through a registry of plugins. Two parts
of Deformable DETR need rules of their own, added here through that plugin mechanism and active
only inside `onnx_rules()` (the ONNX export enters it around the conversion):

- The multi-scale deformable attention core. The `"xla"` reference (`pallas_kernels/
  ms_deform_attn/reference.py`) gathers rows with computed indices, in query chunks under
  `lax.map` on CPU; converted as it is that becomes `GatherND` plus `Loop` and materialises four
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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import onnx_ir as ir
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax2onnx.plugins import plugin_system
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
    for dy, dx, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                           (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):  # fmt: skip
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
            x, grid, _outputs=[_output_name(ctx, out_spec, "grid_sample_out")],
            mode="linear", padding_mode="zeros", align_corners=0,
        )  # fmt: skip
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
        nchw = ctx.builder.Transpose(x, _outputs=[ctx.fresh_name("max_pool_nchw")],
                                     perm=[0, 3, 1, 2])  # fmt: skip
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


# ----------------------------------------------------------------------------- activation


def _new_plugin(cls, primitive: str) -> PrimitiveLeafPlugin:
    plugin = cls()
    plugin.primitive = primitive
    plugin.metadata = {"jaxpr_primitive": primitive, "context": "deformable_detr_jax.export"}
    return plugin


@contextlib.contextmanager
def onnx_rules() -> Iterator[None]:
    """Within: jax2onnx converts `grid_sample_p` and NHWC max pools, and Deformable DETR's
    attention modules sample through `ms_deform_attn_grid_sample`. Everything is restored on
    exit (jax2onnx's own rules, the attention modules' sampling core)."""
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
    try:
        yield
    finally:
        deformable_attention.ms_deform_attn = core
        for name, plugin in saved.items():
            if plugin is None:
                registry.pop(name, None)
            else:
                registry[name] = plugin


__all__ = ["grid_sample", "grid_sample_p", "ms_deform_attn_grid_sample", "onnx_rules"]
