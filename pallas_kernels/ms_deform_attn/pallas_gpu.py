"""Multi-scale deformable attention as Pallas kernels with the Triton (GPU) lowering.

Follows the CUDA kernels of the original implementation (fundamentalvision
`ms_deform_attn_cuda.cu`, Zhu et al., arXiv 2010.04159): one program owns `block_q`
queries of one (batch, head); for every level and point it computes the four bilinear
corners (`grid_sample(align_corners=False, padding_mode="zeros")`: pixel coordinate =
location * size - 0.5) and gathers `head_dim`-long rows of `value` with computed indices.
The backward kernel recomputes the corners, collects the location and attention-weight
gradients of its own queries, and scatters the value gradient with atomic adds (many
queries sample the same pixel).

The grid is (nheads, query blocks, bs) with the head fastest, so the programs that run
together read neighbouring head slices of the same value rows and location rows.

Nothing is padded or transposed outside the kernels: every operand is passed flat (a free
reshape of its natural layout) and the kernels compute element offsets themselves. Triton
needs power-of-two tensor shapes, so a tile is `(block_q, next_pow2(head_dim))`. Offsets
are int32: `check_fits` refuses operands of 2**31 elements or more.

What the generated code does, read off the SASS on a CPU (`resources.py`, BENCHMARKS.md):
each thread gathers one 16-byte vector per corner (`LDG.E.128`); the gathers are unmasked,
from addresses clamped into the level, so that ptxas issues the corners' gathers and the
next point's location loads together (see the comment above `_corners`); corners off the
level get weight zero, so a non-finite value in the clamped border pixel they read makes
the output NaN where `grid_sample` would add nothing; the backward's atomics are relaxed
(`triton_atomics.py`: no memory fence per add).

Interpret mode (`interpret=True`, CPU tests) runs the same kernel bodies through Pallas'
HLO interpreter. Two primitives differ there: Pallas' interpret rule for
`plgpu.atomic_add` rejects masks and keeps only one of several updates that hit the same
index within a call (jax 0.10), so interpret mode scatters with `jax.ref.addupdate`
(whose interpret rule is `x.at[idx].add`, exact with duplicates) and masked-off lanes add
zero to element 0; and masked-off lanes of a store point past the end (dropped) instead of
at a neighbour's element.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ms_deform_attn import errors, triton_atomics

# Offsets inside the kernels are int32.
MAX_ELEMENTS = 2**31 - 1


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters. `block_q*` must be powers of two.

    `BlockSizes()` is the float32, head_dim 32 row of `default_block_sizes`.

    Attributes:
      block_q: queries per program in the forward kernel.
      block_q_bwd: queries per program in the backward kernel.
      num_warps, num_warps_bwd: warps per program.
      num_stages: Triton's software-pipelining stages (its pipeliner finds nothing to
        pipeline in these kernels; kept at 1).
    """

    block_q: int = 16
    block_q_bwd: int = 8
    num_warps: int = 4
    num_warps_bwd: int = 4
    num_stages: int = 1

    def __post_init__(self):
        for name in ("block_q", "block_q_bwd"):
            size = getattr(self, name)
            if size < 1 or size & (size - 1):
                raise ValueError(f"BlockSizes.{name}={size} must be a power of two")


# The tile table. A program is `num_warps` warps over a (block_q, next_pow2(head_dim))
# tile; the table fixes how much of a tile each thread holds, and block_q follows:
#   forward: one 16-byte vector of each gathered row per thread (4 float32, 8 bfloat16:
#     one LDG.E.128 per corner), which ptxas fits in 32-40 registers;
#   backward: 2 float32 of grad_value per thread and corner (the atomics are float32 in
#     every dtype); 4 already take 72 registers on sm_90 and 128 on sm_80, which has no
#     vector atomics and scatters element by element.
# The encoder (len_q = len_v, thousands of programs per SM wave) and the decoder (a few
# hundred queries: one partial wave) get the same tiles: in one wave the time is each
# warp's chain of 16 point latencies, which no tiling shortens (the next point's loads
# are prefetched instead); benchmarks/gpu_check.sh times other tilings at both shapes.
# See BENCHMARKS.md for registers and occupancy per shape.
_NUM_WARPS = 4
_FWD_VECTOR_BYTES = 16
_BWD_ELEMENTS_PER_THREAD = 2
_MAX_BLOCK_Q = 64


def default_block_sizes(dtype, head_dim: int) -> BlockSizes:
    """The tiles used when none are given, from the table above."""
    block_d = pl.next_power_of_2(head_dim)
    threads = 32 * _NUM_WARPS
    per_thread_fwd = max(1, _FWD_VECTOR_BYTES // jnp.dtype(dtype).itemsize)

    def fit(elements_per_thread: int) -> int:
        return max(1, min(_MAX_BLOCK_Q, elements_per_thread * threads // block_d))

    return BlockSizes(
        block_q=fit(per_thread_fwd),
        block_q_bwd=fit(_BWD_ELEMENTS_PER_THREAD),
        num_warps=_NUM_WARPS,
        num_warps_bwd=_NUM_WARPS,
    )


def _compiler_params(num_warps: int, num_stages: int):
    # jax >= 0.6 names it CompilerParams; older releases TritonCompilerParams.
    params_cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return params_cls(num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------------------
# Per-point math shared by both kernels (traced inside the kernel bodies).
#
# Every gather is unmasked from an address that is always inside its array (pixel
# coordinates clamped into the level, query rows past len_q clamped to the last one,
# padded head_dim columns clamped to the last column); what must not count gets weight
# zero (forward) or is zeroed by a select (backward). A masked load would read less, but
# Triton writes the masked-off value into the destination registers before a predicated
# load, and ptxas then waited for each gather before it issued the next: one gather in
# flight per thread. Unmasked, it issues the corners' gathers two at a time at the same
# 32 registers, and the next point's location loads before this point's last products
# (sm_90 SASS, Triton 3.9, float32 encoder forward).
# --------------------------------------------------------------------------------------


def _pixel_corner(loc, size: int):
    """`floor(x)` (int32) and `x - floor(x)` of the pixel coordinate `x = loc * size - 0.5`.

    Decided from `t = loc * size` by a comparison, as `corner.pixel_corner` does, so that a
    point exactly on a pixel centre (`t = k + 0.5`) gets corner `k` and fraction 0 whatever
    the compiler contracts into fused multiply-adds. `t` is clamped to [-1.5, size + 1.5]
    first: both corners of a point beyond stay outside the level and the int cast stays
    defined.
    """
    t = jnp.clip(loc * size, -1.5, size + 1.5)
    t_floor = jnp.floor(t)
    corner = jnp.where(t >= t_floor + 0.5, t_floor, t_floor - 1)
    return corner.astype(jnp.int32), t - (corner + 0.5)


def _corners(loc_x, loc_y, height: int, width: int, row_stride: int, q_ok):
    """The four bilinear corners of one sampling point for a block of queries.

    Args:
      loc_x, loc_y: `(block_q,)` locations in [0, 1] (may lie outside), accumulation dtype.
      row_stride: elements between two neighbouring pixels of the flat value
        (`nheads * head_dim`).
      q_ok: `(block_q,)` True for queries inside `len_q`.

    Returns:
      `(fx, fy, corners)`; `fx, fy` are `(block_q,)` fractional parts and `corners` a list
      of four `(ok, offset, weight)` triples in the order (y0,x0), (y0,x1), (y1,x0),
      (y1,x1): `ok` is True for corners inside the level (of queries inside len_q),
      `offset` the element offset of the corner's pixel from the level's first one,
      clamped into the level, and `weight` the corner's bilinear weight.
    """
    x0, fx = _pixel_corner(loc_x, width)
    y0, fy = _pixel_corner(loc_y, height)
    columns = []  # (ok, offset, weight) of x0 and x0 + 1
    for xi, weight in ((x0, 1 - fx), (x0 + 1, fx)):
        ok = (xi >= 0) & (xi < width)
        columns.append((ok, jnp.clip(xi, 0, width - 1) * row_stride, weight))
    corners = []
    for yi, weight_y in ((y0, 1 - fy), (y0 + 1, fy)):
        ok_y = q_ok & (yi >= 0) & (yi < height)
        row = jnp.clip(yi, 0, height - 1) * (width * row_stride)
        for ok_x, column, weight_x in columns:
            corners.append((ok_y & ok_x, row + column, weight_y * weight_x))
    return fx, fy, corners


def _gather(ref, offsets):
    """`ref[offsets]`, unmasked: every offset must lie inside `ref` (see above)."""
    return plgpu.load(ref.at[offsets])


def _store(ref, offsets, values, mask, interpret: bool):
    """Scatter `ref[offsets] = values` where `mask`. In interpret mode masked lanes point
    past the end, so that they are dropped instead of rewriting a neighbour's element."""
    if interpret:
        offsets = jnp.where(mask, offsets, ref.shape[0])
    plgpu.store(ref.at[offsets], values, mask=mask)


def _scatter_add(ref, offsets, values, mask, interpret: bool):
    """`ref[offsets] += values` where `mask`, atomically (see the module docstring)."""
    if interpret:
        jax.ref.addupdate(ref, jnp.where(mask, offsets, 0), jnp.where(mask, values, 0))
    else:
        triton_atomics.atomic_add(ref, offsets, values, mask)


def _point_loads(loc_ref, attn_ref, row, nlevels_points: int, acc_dtype, k):
    """Location (x, y) and attention weight of point `k` (level-major) of the `(block_q,)`
    (addressable) rows `row`; `k` past the last point reads the last one again (the
    prefetch after the last point)."""
    attn_offset = row * nlevels_points + jnp.minimum(k, nlevels_points - 1)
    a = _gather(attn_ref, attn_offset).astype(acc_dtype)
    loc_x = _gather(loc_ref, attn_offset * 2).astype(acc_dtype)
    loc_y = _gather(loc_ref, attn_offset * 2 + 1).astype(acc_dtype)
    return loc_x, loc_y, a


def _block_indices(len_q: int, nheads: int, head_dim: int, block_q: int, block_d: int):
    """This program's queries and columns: `(q_ok, row, row_c, d, d_ok, d_c)`.

    `row = (b * len_q + q) * nheads + h` indexes one (batch, query, head) of
    sampling_locations / attention_weights / output rows; `row_c` is the same with queries
    past `len_q` clamped to the last one, and `d_c` the columns with those past `head_dim`
    clamped to the last one (always addressable, for the unmasked gathers).
    """
    h, q_block, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q = q_block * block_q + jnp.arange(block_q, dtype=jnp.int32)
    q_ok = q < len_q
    row = (b * len_q + q) * nheads + h
    row_c = (b * len_q + jnp.minimum(q, len_q - 1)) * nheads + h
    d = jnp.arange(block_d, dtype=jnp.int32)
    d_ok = d < head_dim
    d_c = d if block_d == head_dim else jnp.minimum(d, head_dim - 1)
    return q_ok, row, row_c, d, d_ok, d_c


def _tile_mask(ok, d_ok, block_d: int, head_dim: int):
    """`(block_q, block_d)` mask of a row tile; the column test only when padded."""
    mask = ok[:, None] if block_d == head_dim else ok[:, None] & d_ok[None, :]
    return jnp.broadcast_to(mask, (ok.shape[0], block_d))


# --------------------------------------------------------------------------------------
# Kernels. Every ref is flat; the grid is (nheads, query blocks, bs).
# --------------------------------------------------------------------------------------


def _fwd_kernel(
    value_ref,  # (bs * len_v * nheads * head_dim,)
    loc_ref,  # (bs * len_q * nheads * nlevels * npoints * 2,)
    attn_ref,  # (bs * len_q * nheads * nlevels * npoints,)
    out_ref,  # (bs * len_q * nheads * head_dim,)
    *,
    spatial_shapes: tuple[tuple[int, int], ...],
    len_q: int,
    len_v: int,
    nheads: int,
    head_dim: int,
    npoints: int,
    block_q: int,
    block_d: int,
    acc_dtype,
    interpret: bool,
):
    h, b = pl.program_id(0), pl.program_id(2)
    q_ok, row, row_c, d, d_ok, d_c = _block_indices(len_q, nheads, head_dim, block_q, block_d)
    nlevels_points = len(spatial_shapes) * npoints
    row_stride = nheads * head_dim
    point_loads = functools.partial(
        _point_loads, loc_ref, attn_ref, row_c, nlevels_points, acc_dtype
    )

    # (block_q, block_d)
    acc = jnp.zeros((block_q, block_d), acc_dtype)
    carry = (acc, point_loads(0))
    level_start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        # First element of (batch b, pixel level_start, head h) in the flat value.
        value_base = ((b * len_v + level_start) * nheads + h) * head_dim

        def point(p, carry, level=level, height=height, width=width, value_base=value_base):
            acc, (loc_x, loc_y, a) = carry
            # The next point's location and weight load while this one's corners gather.
            upcoming = point_loads(level * npoints + p + 1)
            _, _, corners = _corners(loc_x, loc_y, height, width, row_stride, q_ok)
            # (block_q, block_d) rows of the four corners (independent gathers).
            rows = [
                _gather(value_ref, (value_base + offset)[:, None] + d_c[None, :])
                for _, offset, _ in corners
            ]
            for (ok, _, weight), v in zip(corners, rows):
                acc = acc + (jnp.where(ok, weight * a, 0))[:, None] * v.astype(acc_dtype)
            return acc, upcoming

        carry = jax.lax.fori_loop(0, npoints, point, carry)
        level_start += height * width
    acc, _ = carry

    mask = _tile_mask(q_ok, d_ok, block_d, head_dim)
    _store(
        out_ref, (row * head_dim)[:, None] + d[None, :], acc.astype(out_ref.dtype), mask, interpret
    )


def _bwd_kernel(
    value_ref,  # (bs * len_v * nheads * head_dim,)
    loc_ref,  # (bs * len_q * nheads * nlevels * npoints * 2,)
    attn_ref,  # (bs * len_q * nheads * nlevels * npoints,)
    grad_out_ref,  # (bs * len_q * nheads * head_dim,)
    grad_value_init_ref,  # zeros, aliased to grad_value_ref
    grad_value_ref,  # (bs * len_v * nheads * head_dim,) accumulation dtype
    grad_loc_ref,  # like loc_ref, accumulation dtype
    grad_attn_ref,  # like attn_ref, accumulation dtype
    *,
    spatial_shapes: tuple[tuple[int, int], ...],
    len_q: int,
    len_v: int,
    nheads: int,
    head_dim: int,
    npoints: int,
    block_q: int,
    block_d: int,
    acc_dtype,
    interpret: bool,
):
    del grad_value_init_ref  # only there to zero grad_value through the alias
    h, b = pl.program_id(0), pl.program_id(2)
    q_ok, row, row_c, d, d_ok, d_c = _block_indices(len_q, nheads, head_dim, block_q, block_d)
    nlevels_points = len(spatial_shapes) * npoints
    row_stride = nheads * head_dim
    point_loads = functools.partial(
        _point_loads, loc_ref, attn_ref, row_c, nlevels_points, acc_dtype
    )

    # (block_q, block_d); zero in padded columns, so that they add nothing to g . value.
    g = _gather(grad_out_ref, (row_c * head_dim)[:, None] + d_c[None, :]).astype(acc_dtype)
    if block_d != head_dim:
        g = jnp.where(d_ok[None, :], g, 0)
    # The location and attention-weight gradients of the block's queries, collected per
    # point into (block_q, points) tiles and stored once as contiguous rows (per-point
    # stores would each move their values between thread layouts through shared memory).
    block_k = pl.next_power_of_2(nlevels_points)
    k_cols = jnp.arange(block_k, dtype=jnp.int32)
    xy_cols = jnp.arange(2 * block_k, dtype=jnp.int32)
    grad_attn_tile = jnp.zeros((block_q, block_k), acc_dtype)
    grad_loc_tile = jnp.zeros((block_q, 2 * block_k), acc_dtype)
    carry = (grad_attn_tile, grad_loc_tile, point_loads(0))

    level_start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        value_base = ((b * len_v + level_start) * nheads + h) * head_dim

        def point(p, carry, level=level, height=height, width=width, value_base=value_base):
            grad_attn_tile, grad_loc_tile, (loc_x, loc_y, a) = carry
            k = level * npoints + p
            upcoming = point_loads(k + 1)  # in flight during this point's gathers
            fx, fy, corners = _corners(loc_x, loc_y, height, width, row_stride, q_ok)
            # (block_q, block_d) element offsets of the four corners' rows.
            offsets = [(value_base + offset)[:, None] + d_c[None, :] for _, offset, _ in corners]
            rows = [_gather(value_ref, o) for o in offsets]
            # g . value at each corner, (block_q,) each; zero for corners off the level.
            g_dot = []
            for (ok, _, weight), v, o in zip(corners, rows, offsets):
                g_dot.append(jnp.where(ok, jnp.sum(g * v.astype(acc_dtype), axis=1), 0))
                grad_v = (weight * a)[:, None] * g
                mask = _tile_mask(ok, d_ok, block_d, head_dim)
                _scatter_add(grad_value_ref, o, grad_v, mask, interpret)
            g00, g01, g10, g11 = g_dot
            grad_a = sum(weight * gd for (_, _, weight), gd in zip(corners, g_dot))
            # d(sampled)/d(fx), d(sampled)/d(fy), projected on g.
            d_fx = (1 - fy) * (g01 - g00) + fy * (g11 - g10)
            d_fy = (1 - fx) * (g10 - g00) + fx * (g11 - g01)
            grad_attn_tile = jnp.where(k_cols[None, :] == k, grad_a[:, None], grad_attn_tile)
            grad_loc_tile = jnp.where(
                xy_cols[None, :] == 2 * k,
                (a * width * d_fx)[:, None],
                jnp.where(
                    xy_cols[None, :] == 2 * k + 1, (a * height * d_fy)[:, None], grad_loc_tile
                ),
            )
            return grad_attn_tile, grad_loc_tile, upcoming

        carry = jax.lax.fori_loop(0, npoints, point, carry)
        level_start += height * width
    grad_attn_tile, grad_loc_tile, _ = carry

    for ref, tile, cols, width in (
        (grad_attn_ref, grad_attn_tile, k_cols, nlevels_points),
        (grad_loc_ref, grad_loc_tile, xy_cols, 2 * nlevels_points),
    ):
        # (block_q, cols) of the flat gradient rows: row * width + col
        mask = q_ok[:, None] & (cols < width)[None, :]
        offsets = (row * width)[:, None] + cols[None, :]
        _store(ref, offsets, tile.astype(ref.dtype), mask, interpret)


# --------------------------------------------------------------------------------------
# pallas_call wrappers.
# --------------------------------------------------------------------------------------


def _acc_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _static_dims(value, spatial_shapes, sampling_locations):
    bs, len_v, nheads, head_dim = value.shape
    _, len_q, _, _, npoints, _ = sampling_locations.shape
    return dict(
        spatial_shapes=spatial_shapes,
        len_q=len_q,
        len_v=len_v,
        nheads=nheads,
        head_dim=head_dim,
        npoints=npoints,
        block_d=pl.next_power_of_2(head_dim),
        acc_dtype=_acc_dtype(value.dtype),
    ), (bs, len_q, nheads, head_dim)


def _forward(value, spatial_shapes, sampling_locations, attention_weights, block_sizes, interpret):
    dims, (bs, len_q, nheads, head_dim) = _static_dims(value, spatial_shapes, sampling_locations)
    block_q = min(block_sizes.block_q, pl.next_power_of_2(len_q))
    kernel = functools.partial(
        _fwd_kernel,
        block_q=block_q,
        interpret=interpret,
        **dims,
    )
    out = pl.pallas_call(
        kernel,
        grid=(nheads, pl.cdiv(len_q, block_q), bs),
        out_shape=jax.ShapeDtypeStruct((bs * len_q * nheads * head_dim,), value.dtype),
        compiler_params=_compiler_params(block_sizes.num_warps, block_sizes.num_stages),
        interpret=interpret,
        name="ms_deform_attn_fwd",
    )(value.reshape(-1), sampling_locations.reshape(-1), attention_weights.reshape(-1))
    # (bs * len_q * nheads * head_dim,) -> (bs, len_q, nheads * head_dim)
    return out.reshape(bs, len_q, nheads * head_dim)


def _backward(
    value, spatial_shapes, sampling_locations, attention_weights, grad_out, block_sizes, interpret
):
    dims, (bs, len_q, nheads, head_dim) = _static_dims(value, spatial_shapes, sampling_locations)
    acc_dtype = dims["acc_dtype"]
    block_q = min(block_sizes.block_q_bwd, pl.next_power_of_2(len_q))
    kernel = functools.partial(
        _bwd_kernel,
        block_q=block_q,
        interpret=interpret,
        **dims,
    )
    grad_value, grad_loc, grad_attn = pl.pallas_call(
        kernel,
        grid=(nheads, pl.cdiv(len_q, block_q), bs),
        out_shape=(
            jax.ShapeDtypeStruct((value.size,), acc_dtype),
            jax.ShapeDtypeStruct((sampling_locations.size,), acc_dtype),
            jax.ShapeDtypeStruct((attention_weights.size,), acc_dtype),
        ),
        input_output_aliases={4: 0},
        compiler_params=_compiler_params(block_sizes.num_warps_bwd, block_sizes.num_stages),
        interpret=interpret,
        name="ms_deform_attn_bwd",
    )(
        value.reshape(-1),
        sampling_locations.reshape(-1),
        attention_weights.reshape(-1),
        grad_out.reshape(-1),
        jnp.zeros((value.size,), acc_dtype),
    )
    return (
        grad_value.reshape(value.shape).astype(value.dtype),
        grad_loc.reshape(sampling_locations.shape).astype(sampling_locations.dtype),
        grad_attn.reshape(attention_weights.shape).astype(attention_weights.dtype),
    )


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


def check_fits(value, sampling_locations) -> None:
    """Raises `KernelLimitError` when an operand or the output has too many elements for
    the kernels' int32 offsets (attention_weights is half of sampling_locations)."""
    bs, _, nheads, head_dim = value.shape
    len_q = sampling_locations.shape[1]
    for name, shape in (
        ("value", value.shape),
        ("sampling_locations", sampling_locations.shape),
        ("the output", (bs, len_q, nheads * head_dim)),
    ):
        size = math.prod(shape)
        if size > MAX_ELEMENTS:
            raise errors.KernelLimitError(
                f"pallas_gpu addresses its arrays with int32 offsets, but {name} of shape "
                f"{shape} has {size} > 2**31 - 1 elements: use implementation='xla' or a "
                "smaller batch"
            )


@functools.partial(jax.jit, static_argnames=("spatial_shapes", "block_sizes", "interpret"))
def ms_deform_attn_pallas_gpu(
    value: jax.Array,
    spatial_shapes: tuple[tuple[int, int], ...],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Multi-scale deformable attention core, Pallas Triton kernels forward and backward.

    Shapes are checked by `pallas_kernels.ms_deform_attn` before this is called.

    Args:
      value: `(bs, len_v, nheads, head_dim)`.
      spatial_shapes: static `((h, w), ...)`, `sum(h * w) == len_v`.
      sampling_locations: `(bs, len_q, nheads, nlevels, npoints, 2)` as (x, y).
      attention_weights: `(bs, len_q, nheads, nlevels, npoints)`.
      block_sizes: tiles and launch parameters; `BlockSizes()` when None.
      interpret: run the kernels in Pallas' interpreter (CPU).

    Returns:
      `(bs, len_q, nheads * head_dim)` in `value.dtype`; accumulation is in float32
      (float64 for float64 inputs).
    """
    check_fits(value, sampling_locations)
    return _ms_deform_attn(
        value,
        spatial_shapes,
        sampling_locations,
        attention_weights,
        block_sizes or default_block_sizes(value.dtype, value.shape[-1]),
        interpret,
    )


__all__ = ["BlockSizes", "default_block_sizes", "ms_deform_attn_pallas_gpu"]
