"""Multi-scale deformable attention forward and backward as Pallas Mosaic (TPU) kernels.

TPUs have no fast gather from VMEM, so the sampling (Zhu et al., arXiv 2010.04159, eq. 3;
bilinear as `grid_sample(align_corners=False, padding_mode="zeros")`) is written as a
one-hot matrix product per tile: for a block of `block_q` queries of one (batch, head)
and a block of `block_v` pixels of one level, the kernel builds the sampling matrix

    S[v, q] = sum over points p and bilinear corners c of
              attention_weight[q, p] * bilinear_weight[q, p, c] * (pixel[q, p, c] == v)

on the VPU (iota compares, sublanes = pixels, lanes = queries) and accumulates
`value^T (head_dim, block_v) @ S (block_v, block_q)` on the MXU in float32.

Layout and padding (done in the wrapper, with XLA: `pallas_tpu_layout.py`):
  - value -> `(bs, nheads, head_dim, len_v_pad)`, every level zero-padded to a multiple
    of `block_v`, so a pixel block never straddles two levels and the level of a block is
    a static range of block indices;
  - locations -> `(bs, nheads, nlevels * npoints * 2, len_q_pad)` and weights ->
    `(bs, nheads, nlevels * npoints, len_q_pad)` in float32 (float64 for float64 input),
    queries zero-padded to a multiple of `block_q` (padded queries have weight 0);
  - output `(bs, nheads, head_dim, len_q_pad)` -> `(bs, len_q, nheads * head_dim)`.

Sparsity: a query block only touches a few pixel blocks of each level (encoder queries
sample near their own position). The wrapper computes, per (batch, query block, level),
the range of pixel blocks the block's corners can reach (row-granular, so rounding
differences cannot drop a corner) and passes it by scalar prefetch: steps outside the
range skip the VPU/MXU work, and the value BlockSpec clamps its block index into the
range, so skipped steps re-use the block already in VMEM instead of fetching a new one.
The table has `bs * (len_q_pad / block_q) * nlevels * 2` int32 entries in SMEM; raise
`block_q` if it does not fit.

Backward (`pallas_tpu_kernels.backward_kernel`), the mirror of the forward on the same
grid, block ranges and sampling matrix: per tile, `grad_value[:, pixel block] += grad
(head_dim, block_q) @ S^T` on the MXU, into a `(head_dim, len_v_pad)` float32 accumulator
that stays in VMEM for all query and pixel blocks of a (batch, head) and is written once;
and `M = value^T grad` (the value enters pixel-major, `(block_v, head_dim)`, so that this is
a plain matrix product) whose entries at each corner's pixel, summed over the tile's rows,
are the cotangents of the corner coefficients; after a query block's last pixel block the
bilinear chain rule turns those into the location and weight gradients. Only the (batch,
head) axes are parallel (the value gradient accumulates over query blocks). Both kernels
decide a corner by the same comparison on `loc * size` (`corner.pixel_corner`), so that the
backward's corners are the forward's. The accumulator needs `4 * head_dim * len_v_pad` bytes
of VMEM (2.9 MB at 800 x 1333, head_dim 32).

This module holds the public entry, `BlockSizes`, the custom VJP and the `pallas_call`s; the
kernel bodies are in `pallas_tpu_kernels.py`, the layouts in `pallas_tpu_layout.py`.

Interpret mode uses Pallas' TPU interpreter (`pltpu.InterpretParams`), which simulates
VMEM/SMEM and the DMA pipeline on CPU; it has no float64 (nor has a TPU), so float64 inputs
run the same kernel bodies in Pallas' generic HLO interpreter instead. With jax 0.10.2 the
TPU interpreter's callbacks dispatch XLA ops of their own and can deadlock on CPU if the
Python thread dispatches other computations while an interpreted kernel runs: block on the
result before dispatching more work.

Not yet measured on a TPU: `"auto"` keeps choosing `"xla"` there until it is.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ms_deform_attn.pallas_tpu_kernels import backward_kernel, forward_kernel
from pallas_kernels.ms_deform_attn.pallas_tpu_layout import (
    Layout,
    from_query_major,
    kernel_inputs,
    pad_levels,
    query_major,
    unpad_levels,
    value_index_map,
)


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tile sizes; both must be multiples of 128 (TPU lanes / MXU width).

    Attributes:
      block_q: queries per tile (lanes of the sampling matrix and of the output).
      block_v: pixels per tile (contraction dimension of the matmul).
    """

    block_q: int = 256
    block_v: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_v"):
            size = getattr(self, name)
            if size < 128 or size % 128:
                raise ValueError(f"BlockSizes.{name}={size} must be a positive multiple of 128")


def _interpret_mode(interpret: bool, acc_dtype):
    """Pallas' TPU interpreter, or its generic HLO interpreter for float64, which the TPU
    interpreter (like a TPU) does not support; both run the same kernel body."""
    if not interpret:
        return False
    return True if jnp.dtype(acc_dtype).itemsize > 4 else pltpu.InterpretParams()


def _forward(value, spatial_shapes, sampling_locations, attention_weights, block_sizes, interpret):
    layout = Layout.of(value, spatial_shapes, sampling_locations, block_sizes)
    bs, nheads, head_dim = layout.bs, layout.nheads, layout.head_dim
    points = layout.nlevels * layout.npoints
    acc_dtype, loc_t, attn_t, ranges = kernel_inputs(
        value, spatial_shapes, sampling_locations, attention_weights, layout
    )
    # (bs, len_v, nheads, head_dim) -> (bs, nheads, head_dim, len_v_pad)
    value_t = pad_levels(jnp.transpose(value, (0, 2, 3, 1)), layout)
    value_map = functools.partial(
        value_index_map, level_blocks=layout.level_blocks, num_q_blocks=layout.num_q_blocks
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=layout.grid(),
        in_specs=[
            pl.BlockSpec((None, None, head_dim, layout.block_v), value_map),
            layout.query_spec(points * 2),
            layout.query_spec(points),
        ],
        out_specs=layout.query_spec(head_dim),
        scratch_shapes=[pltpu.VMEM((head_dim, layout.block_q), acc_dtype)],
    )
    out_t = pl.pallas_call(
        functools.partial(forward_kernel, **layout.kernel_args()),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((bs, nheads, head_dim, layout.len_q_pad), value.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret_mode(interpret, acc_dtype),
        name="ms_deform_attn_fwd_tpu",
    )(ranges, value_t, loc_t, attn_t)
    # (bs, nheads, head_dim, len_q_pad) -> (bs, len_q, nheads * head_dim)
    out = jnp.transpose(out_t[..., : layout.len_q], (0, 3, 1, 2))
    return out.reshape(bs, layout.len_q, nheads * head_dim)


def _backward_grid_spec(layout: Layout, acc_dtype) -> pltpu.PrefetchScalarGridSpec:
    """The backward's blocks: value rows of the reachable pixel block, the query block's
    locations, weights and output cotangent; the whole `(head_dim, len_v_pad)` value gradient
    of the (batch, head), and the query block's location and weight gradients."""
    head_dim, points = layout.head_dim, layout.nlevels * layout.npoints
    value_map = functools.partial(
        value_index_map, level_blocks=layout.level_blocks, num_q_blocks=layout.num_q_blocks
    )

    def value_rows_map(*args):
        b, h, _, v = value_map(*args)
        return b, h, v, 0

    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=layout.grid(),
        in_specs=[
            pl.BlockSpec((None, None, layout.block_v, head_dim), value_rows_map),
            layout.query_spec(points * 2),
            layout.query_spec(points),
            layout.query_spec(head_dim),
        ],
        out_specs=[
            pl.BlockSpec(
                (None, None, head_dim, layout.len_v_pad), lambda b, h, q, v, r: (b, h, 0, 0)
            ),
            layout.query_spec(points * 2),
            layout.query_spec(points),
        ],
        scratch_shapes=[
            pltpu.VMEM((head_dim, layout.len_v_pad), acc_dtype),
            pltpu.VMEM((points * 4, layout.block_q), acc_dtype),
        ],
    )


def _backward(
    value, spatial_shapes, sampling_locations, attention_weights, grad_out, block_sizes, interpret
):
    """`(grad_value, grad_locations, grad_weights)` from `backward_kernel`."""
    layout = Layout.of(value, spatial_shapes, sampling_locations, block_sizes)
    bs, nheads, head_dim = layout.bs, layout.nheads, layout.head_dim
    acc_dtype, loc_t, attn_t, ranges = kernel_inputs(
        value, spatial_shapes, sampling_locations, attention_weights, layout
    )
    # (bs, len_v, nheads, head_dim) -> (bs, nheads, len_v_pad, head_dim): pixels on sublanes,
    # so that value^T grad is a plain matrix product
    value_v = jnp.swapaxes(pad_levels(jnp.transpose(value, (0, 2, 3, 1)), layout), 2, 3)
    # (bs, len_q, nheads * head_dim) -> (bs, nheads, head_dim, len_q_pad)
    grad_t = query_major(grad_out.reshape(bs, layout.len_q, nheads, head_dim), layout, acc_dtype)
    grad_value_t, grad_loc_t, grad_attn_t = pl.pallas_call(
        functools.partial(backward_kernel, **layout.kernel_args()),
        grid_spec=_backward_grid_spec(layout, acc_dtype),
        out_shape=[
            jax.ShapeDtypeStruct((bs, nheads, head_dim, layout.len_v_pad), value.dtype),
            jax.ShapeDtypeStruct(loc_t.shape, acc_dtype),
            jax.ShapeDtypeStruct(attn_t.shape, acc_dtype),
        ],
        # the value gradient accumulates over query blocks too: only (batch, head) parallel
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=_interpret_mode(interpret, acc_dtype),
        name="ms_deform_attn_bwd_tpu",
    )(ranges, value_v, loc_t, attn_t, grad_t)
    # (bs, nheads, head_dim, len_v_pad) -> (bs, len_v, nheads, head_dim)
    grad_value = jnp.transpose(unpad_levels(grad_value_t, layout), (0, 3, 1, 2))
    grad_loc = from_query_major(
        grad_loc_t, layout, sampling_locations.shape, sampling_locations.dtype
    )
    grad_attn = from_query_major(
        grad_attn_t, layout, attention_weights.shape, attention_weights.dtype
    )
    return grad_value, grad_loc, grad_attn


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 4, 5))
def _ms_deform_attn(
    value, spatial_shapes, sampling_locations, attention_weights, block_sizes, interpret
):
    return _forward(
        value, spatial_shapes, sampling_locations, attention_weights, block_sizes, interpret
    )


def _ms_deform_attn_fwd(
    value, spatial_shapes, sampling_locations, attention_weights, block_sizes, interpret
):
    out = _forward(
        value, spatial_shapes, sampling_locations, attention_weights, block_sizes, interpret
    )
    return out, (value, sampling_locations, attention_weights)


def _ms_deform_attn_bwd(spatial_shapes, block_sizes, interpret, residuals, grad_out):
    value, sampling_locations, attention_weights = residuals
    with jax.named_scope("backward"):  # (for profiles)
        return _backward(
            value,
            spatial_shapes,
            sampling_locations,
            attention_weights,
            grad_out,
            block_sizes,
            interpret,
        )


_ms_deform_attn.defvjp(_ms_deform_attn_fwd, _ms_deform_attn_bwd)


@functools.partial(jax.jit, static_argnames=("spatial_shapes", "block_sizes", "interpret"))
def ms_deform_attn_pallas_tpu(
    value: jax.Array,
    spatial_shapes: tuple[tuple[int, int], ...],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Multi-scale deformable attention core: Mosaic forward and backward kernels.

    Shapes are checked by `pallas_kernels.ms_deform_attn` before this is called.

    Args:
      value: `(bs, len_v, nheads, head_dim)`.
      spatial_shapes: static `((h, w), ...)`, `sum(h * w) == len_v`.
      sampling_locations: `(bs, len_q, nheads, nlevels, npoints, 2)` as (x, y).
      attention_weights: `(bs, len_q, nheads, nlevels, npoints)`.
      block_sizes: tiles; `BlockSizes()` when None.
      interpret: run the kernel in Pallas' TPU interpreter (CPU).

    Returns:
      `(bs, len_q, nheads * head_dim)` in `value.dtype`, accumulated in float32 (float64
      for float64 inputs).
    """
    return _ms_deform_attn(
        value,
        spatial_shapes,
        sampling_locations,
        attention_weights,
        block_sizes or BlockSizes(),
        interpret,
    )


__all__ = ["BlockSizes", "ms_deform_attn_pallas_tpu"]
