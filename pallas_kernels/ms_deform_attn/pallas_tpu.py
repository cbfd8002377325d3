"""Multi-scale deformable attention forward and backward as Pallas Mosaic (TPU) kernels.

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

Backward (`_bwd_kernel`), the mirror of the forward on the same grid, block ranges and
sampling matrix: per tile, `grad_value[:, pixel block] += grad (head_dim, block_q) @ S^T` on
the MXU, into a `(head_dim, len_v_pad)` float32 accumulator that stays in VMEM for all query
and pixel blocks of a (batch, head) and is written once; and `M = value^T grad` (the value
enters pixel-major, `(block_v, head_dim)`, so that this is a plain matrix product) whose
entries at each corner's pixel, summed over the tile's rows, are the cotangents of the corner
coefficients; after a query block's last pixel block the bilinear chain rule turns those into
the location and weight gradients. Only the (batch, head) axes are parallel (the value
gradient accumulates over query blocks). Both kernels decide a corner by the same comparison
on `loc * size` (`_corner_terms`, `corner.pixel_corner`), so that the backward's corners are
the forward's. The accumulator needs `4 * head_dim * len_v_pad` bytes of VMEM (2.9 MB at
800 x 1333, head_dim 32).

Interpret mode uses Pallas' TPU interpreter (`pltpu.InterpretParams`), which simulates
VMEM/SMEM and the DMA pipeline on CPU; it has no float64 (nor has a TPU), so float64 inputs run the same kernel bodies in Pallas' generic
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

from pallas_kernels.ms_deform_attn.corner import pixel_corner


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


def _corner_terms(loc, size: int):
    """Top-left corner (int32) and fraction of the pixel coordinate `loc * size - 0.5`.

    `corner.pixel_corner` (the corner decided by a comparison on `loc * size`, so that a
    compiler contracting multiply-adds differently in the forward and backward kernels
    cannot give them different corners), on `loc` clipped to two pixels outside the level
    (whose corners all lie outside) so that the int32 conversion stays in range.
    """
    return pixel_corner(jnp.clip(loc, -1.5 / size, (size + 1.5) / size), size, loc.dtype)


def _point_corners(loc_ref, attn_ref, level, p, npoints, height, width):
    """The four corners of point `p` of `level` for a block of queries: a list of
    `(pixel, bilinear_weight)` with pixel -1 outside the level, each `(1, block_q)`, and the
    point's `(fx, fy, attn)`."""
    k = level * npoints + p
    # (1, block_q) each
    x0, fx = _corner_terms(loc_ref[2 * k : 2 * k + 1, :], width)
    y0, fy = _corner_terms(loc_ref[2 * k + 1 : 2 * k + 2, :], height)
    a = attn_ref[k : k + 1, :]
    corners = []
    for dy, dx, weight in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        xi = x0 + dx
        yi = y0 + dy
        ok = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        corners.append((jnp.where(ok, yi * width + xi, -1), weight))
    return corners, (fx, fy, a)


def _level_steps(ranges_ref, spatial_shapes, level_blocks, num_q_blocks):
    """Per level: `(level, height, width, first, active)`, `active` a scalar bool that says
    whether the current pixel block belongs to the level and lies in the query block's
    reachable range (the SMEM table)."""
    b, q_block, v_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nlevels = len(spatial_shapes)
    steps = []
    for level, (height, width) in enumerate(spatial_shapes):
        first, end = level_blocks[level], level_blocks[level + 1]
        entry = ((b * num_q_blocks + q_block) * nlevels + level) * 2
        lo, hi = ranges_ref[entry], ranges_ref[entry + 1]
        active = (v_block >= first) & (v_block < end) & (v_block >= lo) & (v_block <= hi)
        steps.append((level, height, width, first, active))
    return steps


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
    v_block = pl.program_id(3)
    acc_dtype = acc_ref.dtype

    @pl.when(v_block == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    for level, height, width, first, active in _level_steps(
        ranges_ref, spatial_shapes, level_blocks, num_q_blocks
    ):

        @pl.when(active)
        def _accumulate(level=level, height=height, width=width, first=first):
            # In-level pixel index of every (row, query) of the sampling matrix.
            # (block_v, block_q)
            pixel_of_row = (
                jax.lax.broadcasted_iota(jnp.int32, (block_v, block_q), 0)
                + (v_block - first) * block_v
            )
            s = jnp.zeros((block_v, block_q), acc_dtype)
            for p in range(npoints):
                corners, (_, _, a) = _point_corners(
                    loc_ref, attn_ref, level, p, npoints, height, width
                )
                for pixel, weight in corners:
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


_NT = (((1,), (1,)), ((), ()))  # dot_general: contract the lanes of both operands (A @ B^T)


def _bwd_kernel(
    ranges_ref,  # SMEM (bs * num_q_blocks * nlevels * 2,) int32: [lo, hi] pixel blocks
    value_ref,  # (block_v, head_dim), value dtype: pixels on sublanes
    loc_ref,  # (nlevels * npoints * 2, block_q), accumulation dtype
    attn_ref,  # (nlevels * npoints, block_q), accumulation dtype
    grad_ref,  # (head_dim, block_q), accumulation dtype: the output's cotangent
    grad_value_ref,  # (head_dim, len_v_pad), value dtype: resident for the (batch, head)
    grad_loc_ref,  # (nlevels * npoints * 2, block_q), locations' dtype
    grad_attn_ref,  # (nlevels * npoints, block_q), weights' dtype
    grad_value_acc,  # VMEM scratch (head_dim, len_v_pad), accumulation dtype
    grad_coeff_acc,  # VMEM scratch (nlevels * npoints * 4, block_q), accumulation dtype
    *,
    spatial_shapes: tuple[tuple[int, int], ...],
    level_blocks: tuple[int, ...],
    npoints: int,
    num_q_blocks: int,
    block_q: int,
    block_v: int,
):
    """The mirror of `_kernel` on the same grid and the same sampling matrix `S`:

      grad_value[:, block]  += grad (head_dim, block_q) @ S^T           (MXU)
      grad_coeff[q, p, c]   += sum over the block's pixels v of
                               [v == pixel(q, p, c)] * (value^T grad)[v, q]   (MXU + VPU)

    and, after the last pixel block, the bilinear chain rule from the corner coefficients'
    cotangents to the locations and weights. `grad_value` accumulates over every query and
    pixel block of a (batch, head) in VMEM and is written once.
    """
    q_block, v_block = pl.program_id(2), pl.program_id(3)
    acc_dtype = grad_value_acc.dtype
    last_v = v_block == pl.num_programs(3) - 1

    @pl.when((q_block == 0) & (v_block == 0))
    def _init_value():
        grad_value_acc[...] = jnp.zeros_like(grad_value_acc)

    @pl.when(v_block == 0)
    def _init_coeffs():
        grad_coeff_acc[...] = jnp.zeros_like(grad_coeff_acc)

    grad = grad_ref[...]
    for level, height, width, first, active in _level_steps(
        ranges_ref, spatial_shapes, level_blocks, num_q_blocks
    ):

        @pl.when(active)
        def _accumulate(level=level, height=height, width=width, first=first):
            # (block_v, block_q)
            pixel_of_row = (
                jax.lax.broadcasted_iota(jnp.int32, (block_v, block_q), 0)
                + (v_block - first) * block_v
            )
            # <value[v], grad[q]> for every pixel and query of the tile, (block_v, block_q)
            value_dot_grad = jnp.dot(
                value_ref[...].astype(acc_dtype),
                grad,
                preferred_element_type=acc_dtype,
                precision=jax.lax.Precision.HIGHEST,
            )
            s = jnp.zeros((block_v, block_q), acc_dtype)
            for p in range(npoints):
                corners, (_, _, a) = _point_corners(
                    loc_ref, attn_ref, level, p, npoints, height, width
                )
                for c, (pixel, weight) in enumerate(corners):
                    hit = pixel_of_row == pixel
                    s = s + jnp.where(hit, weight * a, 0.0)
                    row = (level * npoints + p) * 4 + c
                    grad_coeff_acc[row : row + 1, :] += jnp.sum(
                        jnp.where(hit, value_dot_grad, 0.0), axis=0, keepdims=True
                    )
            start = pl.multiple_of(v_block * block_v, block_v)
            grad_value_acc[:, pl.ds(start, block_v)] += jax.lax.dot_general(
                grad,
                s,
                _NT,
                preferred_element_type=acc_dtype,
                precision=jax.lax.Precision.HIGHEST,
            )

    @pl.when(last_v)
    def _chain_rule():
        for level, (height, width) in enumerate(spatial_shapes):
            for p in range(npoints):
                k = level * npoints + p
                _, (fx, fy, a) = _point_corners(loc_ref, attn_ref, level, p, npoints, height, width)
                # (1, block_q) each: the cotangents of the corners' coefficients
                g00, g01, g10, g11 = (
                    grad_coeff_acc[4 * k + c : 4 * k + c + 1, :] for c in range(4)
                )
                grad_attn_ref[k : k + 1, :] = (
                    (1 - fy) * (1 - fx) * g00
                    + (1 - fy) * fx * g01
                    + fy * (1 - fx) * g10
                    + fy * fx * g11
                ).astype(grad_attn_ref.dtype)
                grad_fx = a * ((1 - fy) * (g01 - g00) + fy * (g11 - g10))
                grad_fy = a * ((1 - fx) * (g10 - g00) + fx * (g11 - g01))
                grad_loc_ref[2 * k : 2 * k + 1, :] = (grad_fx * width).astype(grad_loc_ref.dtype)
                grad_loc_ref[2 * k + 1 : 2 * k + 2, :] = (grad_fy * height).astype(
                    grad_loc_ref.dtype
                )

    @pl.when(last_v & (q_block == pl.num_programs(2) - 1))
    def _write_value():
        grad_value_ref[...] = grad_value_acc[...].astype(grad_value_ref.dtype)


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


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static sizes of one call, shared by the forward and backward kernels."""

    spatial_shapes: tuple[tuple[int, int], ...]
    bs: int
    len_q: int
    len_q_pad: int
    nheads: int
    head_dim: int
    npoints: int
    block_q: int
    block_v: int
    level_blocks: tuple[int, ...]

    @property
    def nlevels(self) -> int:
        return len(self.spatial_shapes)

    @property
    def num_q_blocks(self) -> int:
        return self.len_q_pad // self.block_q

    @property
    def len_v_pad(self) -> int:
        return self.level_blocks[-1] * self.block_v

    def kernel_args(self) -> dict:
        return dict(
            spatial_shapes=self.spatial_shapes,
            level_blocks=self.level_blocks,
            npoints=self.npoints,
            num_q_blocks=self.num_q_blocks,
            block_q=self.block_q,
            block_v=self.block_v,
        )

    def grid(self) -> tuple[int, int, int, int]:
        return (self.bs, self.nheads, self.num_q_blocks, self.level_blocks[-1])

    def query_spec(self, rows: int) -> pl.BlockSpec:
        """`(bs, nheads, rows, len_q_pad)` arrays, one query block per step."""
        return pl.BlockSpec((None, None, rows, self.block_q), lambda b, h, q, v, r: (b, h, 0, q))


def _layout(value, spatial_shapes, sampling_locations, block_sizes) -> _Layout:
    bs, _, nheads, head_dim = value.shape
    _, len_q, _, _, npoints, _ = sampling_locations.shape
    return _Layout(
        spatial_shapes=spatial_shapes,
        bs=bs,
        len_q=len_q,
        len_q_pad=_round_up(len_q, block_sizes.block_q),
        nheads=nheads,
        head_dim=head_dim,
        npoints=npoints,
        block_q=block_sizes.block_q,
        block_v=block_sizes.block_v,
        level_blocks=_level_blocks(spatial_shapes, block_sizes.block_v),
    )


def _pad_levels(value_t, layout: _Layout):
    """`(bs, nheads, head_dim, len_v)` -> `(..., len_v_pad)`, every level zero-padded to a
    multiple of `block_v`."""
    segments, start = [], 0
    for height, width in layout.spatial_shapes:
        size = height * width
        pad = _round_up(size, layout.block_v) - size
        segments.append(jnp.pad(value_t[..., start : start + size], ((0, 0),) * 3 + ((0, pad),)))
        start += size
    return jnp.concatenate(segments, axis=-1)


def _unpad_levels(value_t, layout: _Layout):
    """The inverse of `_pad_levels`."""
    segments = []
    for level, (height, width) in enumerate(layout.spatial_shapes):
        start = layout.level_blocks[level] * layout.block_v
        segments.append(value_t[..., start : start + height * width])
    return jnp.concatenate(segments, axis=-1)


def _query_major(x, layout: _Layout, acc_dtype):
    """`(bs, len_q, nheads, ...)` -> `(bs, nheads, prod(...), len_q_pad)` in `acc_dtype`,
    queries zero-padded (padded queries have weight 0)."""
    bs, len_q, nheads = x.shape[:3]
    x = jnp.moveaxis(x.astype(acc_dtype), 1, -1).reshape(bs, nheads, -1, len_q)
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, layout.len_q_pad - len_q)))


def _from_query_major(x_t, layout: _Layout, shape, dtype):
    """The inverse of `_query_major`: `(bs, nheads, rows, len_q_pad)` -> `shape`
    `(bs, len_q, nheads, ...)` in `dtype`."""
    bs, len_q, nheads = shape[:3]
    x = x_t[..., :len_q].reshape(bs, nheads, *shape[3:], len_q)
    return jnp.moveaxis(x, -1, 1).astype(dtype)


def _inputs(value, spatial_shapes, sampling_locations, attention_weights, layout):
    """Locations, weights and the range table in the kernels' layouts."""
    acc_dtype = jnp.promote_types(value.dtype, jnp.float32)
    # (bs, len_q, nheads, nlevels, npoints, 2) -> (bs, nheads, nlevels * npoints * 2, len_q_pad)
    loc_t = _query_major(sampling_locations, layout, acc_dtype)
    # (bs, len_q, nheads, nlevels, npoints) -> (bs, nheads, nlevels * npoints, len_q_pad)
    attn_t = _query_major(attention_weights, layout, acc_dtype)
    ranges = _block_ranges(
        spatial_shapes,
        sampling_locations,
        layout.level_blocks,
        layout.block_q,
        layout.block_v,
        layout.len_q_pad,
    )
    return acc_dtype, loc_t, attn_t, ranges


def _forward(value, spatial_shapes, sampling_locations, attention_weights, block_sizes, interpret):
    layout = _layout(value, spatial_shapes, sampling_locations, block_sizes)
    bs, nheads, head_dim = layout.bs, layout.nheads, layout.head_dim
    points = layout.nlevels * layout.npoints
    acc_dtype, loc_t, attn_t, ranges = _inputs(
        value, spatial_shapes, sampling_locations, attention_weights, layout
    )
    # (bs, len_v, nheads, head_dim) -> (bs, nheads, head_dim, len_v_pad)
    value_t = _pad_levels(jnp.transpose(value, (0, 2, 3, 1)), layout)
    value_map = functools.partial(
        _value_index_map, level_blocks=layout.level_blocks, num_q_blocks=layout.num_q_blocks
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
        functools.partial(_kernel, **layout.kernel_args()),
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


def _backward(
    value, spatial_shapes, sampling_locations, attention_weights, grad_out, block_sizes, interpret
):
    """`(grad_value, grad_locations, grad_weights)` from `_bwd_kernel`."""
    layout = _layout(value, spatial_shapes, sampling_locations, block_sizes)
    bs, nheads, head_dim = layout.bs, layout.nheads, layout.head_dim
    points = layout.nlevels * layout.npoints
    acc_dtype, loc_t, attn_t, ranges = _inputs(
        value, spatial_shapes, sampling_locations, attention_weights, layout
    )
    # (bs, len_v, nheads, head_dim) -> (bs, nheads, len_v_pad, head_dim): pixels on sublanes,
    # so that value^T grad is a plain matrix product
    value_v = jnp.swapaxes(_pad_levels(jnp.transpose(value, (0, 2, 3, 1)), layout), 2, 3)
    # (bs, len_q, nheads * head_dim) -> (bs, nheads, head_dim, len_q_pad)
    grad_t = _query_major(grad_out.reshape(bs, layout.len_q, nheads, head_dim), layout, acc_dtype)
    value_map = functools.partial(
        _value_index_map, level_blocks=layout.level_blocks, num_q_blocks=layout.num_q_blocks
    )

    def value_rows_map(*args):
        b, h, _, v = value_map(*args)
        return b, h, v, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
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
    grad_value_t, grad_loc_t, grad_attn_t = pl.pallas_call(
        functools.partial(_bwd_kernel, **layout.kernel_args()),
        grid_spec=grid_spec,
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
    grad_value = jnp.transpose(_unpad_levels(grad_value_t, layout), (0, 3, 1, 2))
    grad_loc = _from_query_major(
        grad_loc_t, layout, sampling_locations.shape, sampling_locations.dtype
    )
    grad_attn = _from_query_major(
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
