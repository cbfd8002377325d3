"""Multi-scale deformable attention forward as a Pallas Mosaic (TPU) kernel.

TPUs have no fast gather from VMEM, so the sampling (Zhu et al., arXiv 2010.04159, eq. 3;
bilinear as `grid_sample(align_corners=False, padding_mode="zeros")`) is written as a
one-hot matrix product per tile: for a block of `block_q` queries of one (batch, head)
and a block of `block_v` pixels of one level, the kernel builds the sampling matrix

    S[v, q] = sum over points p and bilinear corners c of
              attention_weight[q, p] * bilinear_weight[q, p, c] * (pixel[q, p, c] == v)

on the VPU (iota compares, sublanes = pixels, lanes = queries) and accumulates
`value^T (head_dim, block_v) @ S (block_v, block_q)` on the MXU in float32.

Layout and padding (done in the wrapper, with XLA):
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

Backward: the reference's VJP (`jax.vjp` of `ms_deform_attn_reference`) until a Mosaic
backward kernel exists. Interpret mode uses Pallas' TPU interpreter
(`pltpu.InterpretParams`), which simulates VMEM/SMEM and the DMA pipeline on CPU; it has
no float64 (nor has a TPU), so float64 inputs run the same kernel body in Pallas' generic
HLO interpreter instead. With jax 0.10.2 the TPU interpreter's callbacks dispatch XLA ops
of their own and can deadlock on CPU if the Python thread dispatches other computations
while an interpreted kernel runs: block on the result before dispatching more work.

Not yet measured on a TPU: `"auto"` keeps choosing `"xla"` there until it is.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ms_deform_attn.reference import ms_deform_attn_reference


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


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _level_blocks(spatial_shapes, block_v: int) -> tuple[int, ...]:
    """First pixel-block index of every level in the padded layout, plus the total."""
    firsts = [0]
    for height, width in spatial_shapes:
        firsts.append(firsts[-1] + _round_up(height * width, block_v) // block_v)
    return tuple(firsts)


# --------------------------------------------------------------------------------------
# Kernel.
# --------------------------------------------------------------------------------------


def _kernel(
    ranges_ref,  # SMEM (bs * num_q_blocks * nlevels * 2,) int32: [lo, hi] pixel blocks
    value_ref,  # (head_dim, block_v), value dtype
    loc_ref,  # (nlevels * npoints * 2, block_q), accumulation dtype
    attn_ref,  # (nlevels * npoints, block_q), accumulation dtype
    out_ref,  # (head_dim, block_q), value dtype
    acc_ref,  # VMEM scratch (head_dim, block_q), accumulation dtype
    *,
    spatial_shapes: tuple[tuple[int, int], ...],
    level_blocks: tuple[int, ...],
    npoints: int,
    num_q_blocks: int,
    block_q: int,
    block_v: int,
):
    b, q_block, v_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nlevels = len(spatial_shapes)
    acc_dtype = acc_ref.dtype

    @pl.when(v_block == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    for level, (height, width) in enumerate(spatial_shapes):
        first, end = level_blocks[level], level_blocks[level + 1]
        entry = ((b * num_q_blocks + q_block) * nlevels + level) * 2
        lo, hi = ranges_ref[entry], ranges_ref[entry + 1]

        @pl.when((v_block >= first) & (v_block < end) & (v_block >= lo) & (v_block <= hi))
        def _accumulate(level=level, height=height, width=width, first=first):
            # In-level pixel index of every (row, query) of the sampling matrix.
            # (block_v, block_q)
            pixel_of_row = (
                jax.lax.broadcasted_iota(jnp.int32, (block_v, block_q), 0)
                + (v_block - first) * block_v
            )
            s = jnp.zeros((block_v, block_q), acc_dtype)
            for p in range(npoints):
                k = level * npoints + p
                # (1, block_q) each
                loc_x = loc_ref[2 * k : 2 * k + 1, :]
                loc_y = loc_ref[2 * k + 1 : 2 * k + 2, :]
                a = attn_ref[k : k + 1, :]
                x = jnp.clip(loc_x * width - 0.5, -2.0, width + 1.0)
                y = jnp.clip(loc_y * height - 0.5, -2.0, height + 1.0)
                x0f = jnp.floor(x)
                y0f = jnp.floor(y)
                fx = x - x0f
                fy = y - y0f
                x0 = x0f.astype(jnp.int32)
                y0 = y0f.astype(jnp.int32)
                for dy, dx, weight in (
                    (0, 0, (1 - fy) * (1 - fx)),
                    (0, 1, (1 - fy) * fx),
                    (1, 0, fy * (1 - fx)),
                    (1, 1, fy * fx),
                ):
                    xi = x0 + dx
                    yi = y0 + dy
                    ok = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
                    pixel = jnp.where(ok, yi * width + xi, -1)
                    s = s + jnp.where(pixel_of_row == pixel, weight * a, 0.0)
            acc_ref[...] += jnp.dot(
                value_ref[...].astype(acc_dtype),
                s,
                preferred_element_type=acc_dtype,
                precision=jax.lax.Precision.HIGHEST,
            )

    @pl.when(v_block == pl.num_programs(3) - 1)
    def _write():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


# --------------------------------------------------------------------------------------
# Wrapper: layouts, padding, block ranges, pallas_call.
# --------------------------------------------------------------------------------------


def _block_ranges(spatial_shapes, sampling_locations, level_blocks, block_q, block_v, len_q_pad):
    """Per (batch, query block, level) the [lo, hi] pixel blocks any corner can touch.

    Row-granular and one row wider on each side than the corners, so that float rounding
    that differs from the kernel's cannot drop a corner. Untouched levels get lo > hi with
    hi = the level's first block (a valid index for the value BlockSpec to sit on).

    Returns:
      `(bs * num_q_blocks * nlevels * 2,)` int32.
    """
    bs, len_q, _, nlevels, _, _ = sampling_locations.shape
    num_q_blocks = len_q_pad // block_q
    loc = sampling_locations.astype(jnp.float32)
    ranges = []
    for level, (height, width) in enumerate(spatial_shapes):
        # (bs, len_q, nheads, npoints)
        x = loc[:, :, :, level, :, 0] * width - 0.5
        y = loc[:, :, :, level, :, 1] * height - 0.5
        near = (x > -2) & (x < width + 1) & (y > -2) & (y < height + 1)
        y0 = jnp.floor(jnp.clip(y, -2.0, height + 1.0)).astype(jnp.int32)
        first_pixel = jnp.clip(y0 - 1, 0, height - 1) * width
        last_pixel = jnp.clip(y0 + 2, 0, height - 1) * width + width - 1
        big = jnp.iinfo(jnp.int32).max
        lo = jnp.where(near, first_pixel // block_v, big)
        hi = jnp.where(near, last_pixel // block_v, -1)
        # (bs, len_q) -> (bs, num_q_blocks, block_q)
        pad = ((0, 0), (0, len_q_pad - len_q))
        lo = jnp.pad(lo.min(axis=(2, 3)), pad, constant_values=big)
        hi = jnp.pad(hi.max(axis=(2, 3)), pad, constant_values=-1)
        lo = lo.reshape(bs, num_q_blocks, block_q).min(axis=2)
        hi = hi.reshape(bs, num_q_blocks, block_q).max(axis=2)
        first, end = level_blocks[level], level_blocks[level + 1]
        touched = lo <= hi
        ranges.append(
            jnp.stack(
                [jnp.where(touched, lo + first, end), jnp.where(touched, hi + first, first)], -1
            )
        )
    # (bs, num_q_blocks, nlevels, 2)
    return jnp.stack(ranges, axis=2).reshape(-1)


def _value_index_map(b, h, q_block, v_block, ranges_ref, *, level_blocks, num_q_blocks):
    """Clamps the pixel block into the reachable range of its level (skipped steps re-use
    the resident block: no DMA)."""
    nlevels = len(level_blocks) - 1
    level = sum((v_block >= first).astype(jnp.int32) for first in level_blocks[1:nlevels])
    entry = ((b * num_q_blocks + q_block) * nlevels + level) * 2
    lo, hi = ranges_ref[entry], ranges_ref[entry + 1]
    return b, h, 0, jnp.minimum(jnp.maximum(v_block, lo), hi)


def _interpret_mode(interpret: bool, acc_dtype):
    """Pallas' TPU interpreter, or its generic HLO interpreter for float64, which the TPU
    interpreter (like a TPU) does not support; both run the same kernel body."""
    if not interpret:
        return False
    return True if jnp.dtype(acc_dtype).itemsize > 4 else pltpu.InterpretParams()


def _forward(value, spatial_shapes, sampling_locations, attention_weights, block_sizes, interpret):
    bs, len_v, nheads, head_dim = value.shape
    _, len_q, _, nlevels, npoints, _ = sampling_locations.shape
    acc_dtype = jnp.promote_types(value.dtype, jnp.float32)
    block_v = block_sizes.block_v
    block_q = block_sizes.block_q
    len_q_pad = _round_up(len_q, block_q)
    num_q_blocks = len_q_pad // block_q
    level_blocks = _level_blocks(spatial_shapes, block_v)

    # (bs, len_v, nheads, head_dim) -> (bs, nheads, head_dim, len_v)
    value_t = jnp.transpose(value, (0, 2, 3, 1))
    segments, start = [], 0
    for height, width in spatial_shapes:
        size = height * width
        pad = _round_up(size, block_v) - size
        segments.append(jnp.pad(value_t[..., start : start + size], ((0, 0),) * 3 + ((0, pad),)))
        start += size
    # (bs, nheads, head_dim, len_v_pad)
    value_t = jnp.concatenate(segments, axis=-1)
    # (bs, len_q, nheads, nlevels, npoints, 2) -> (bs, nheads, nlevels * npoints * 2, len_q_pad)
    loc_t = jnp.transpose(sampling_locations.astype(acc_dtype), (0, 2, 3, 4, 5, 1))
    loc_t = loc_t.reshape(bs, nheads, nlevels * npoints * 2, len_q)
    loc_t = jnp.pad(loc_t, ((0, 0), (0, 0), (0, 0), (0, len_q_pad - len_q)))
    # (bs, len_q, nheads, nlevels, npoints) -> (bs, nheads, nlevels * npoints, len_q_pad)
    attn_t = jnp.transpose(attention_weights.astype(acc_dtype), (0, 2, 3, 4, 1))
    attn_t = attn_t.reshape(bs, nheads, nlevels * npoints, len_q)
    attn_t = jnp.pad(attn_t, ((0, 0), (0, 0), (0, 0), (0, len_q_pad - len_q)))
    ranges = _block_ranges(
        spatial_shapes, sampling_locations, level_blocks, block_q, block_v, len_q_pad
    )

    kernel = functools.partial(
        _kernel,
        spatial_shapes=spatial_shapes,
        level_blocks=level_blocks,
        npoints=npoints,
        num_q_blocks=num_q_blocks,
        block_q=block_q,
        block_v=block_v,
    )
    value_map = functools.partial(
        _value_index_map, level_blocks=level_blocks, num_q_blocks=num_q_blocks
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(bs, nheads, num_q_blocks, level_blocks[-1]),
        in_specs=[
            pl.BlockSpec((None, None, head_dim, block_v), value_map),
            pl.BlockSpec(
                (None, None, nlevels * npoints * 2, block_q), lambda b, h, q, v, r: (b, h, 0, q)
            ),
            pl.BlockSpec(
                (None, None, nlevels * npoints, block_q), lambda b, h, q, v, r: (b, h, 0, q)
            ),
        ],
        out_specs=pl.BlockSpec((None, None, head_dim, block_q), lambda b, h, q, v, r: (b, h, 0, q)),
        scratch_shapes=[pltpu.VMEM((head_dim, block_q), acc_dtype)],
    )
    out_t = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((bs, nheads, head_dim, len_q_pad), value.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret_mode(interpret, acc_dtype),
        name="ms_deform_attn_fwd_tpu",
    )(ranges, value_t, loc_t, attn_t)
    # (bs, nheads, head_dim, len_q_pad) -> (bs, len_q, nheads * head_dim)
    out = jnp.transpose(out_t[..., :len_q], (0, 3, 1, 2))
    return out.reshape(bs, len_q, nheads * head_dim)


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
    # The reference's VJP until a Mosaic backward kernel exists.
    del block_sizes, interpret
    value, sampling_locations, attention_weights = residuals
    _, vjp = jax.vjp(
        lambda v, loc, attn: ms_deform_attn_reference(v, spatial_shapes, loc, attn),
        value,
        sampling_locations,
        attention_weights,
    )
    return vjp(grad_out)


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
    """Multi-scale deformable attention core: Mosaic forward, reference VJP backward.

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
