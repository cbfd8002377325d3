"""The `"pallas_gpu"` kernel bodies: `forward_kernel` and `backward_kernel` (Triton), and the
per-point math they share.

Every ref is flat; the grid is (nheads, query blocks, bs) (`pallas_gpu.py` calls them). One
program owns `block_q` queries of one (batch, head) and loops over the levels and points: the
forward gathers the four bilinear corners' `head_dim`-long rows of `value` and sums them,
weighted; the backward recomputes the corners, collects the location and attention-weight
gradients of its own queries and scatters the value gradient with atomic adds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ms_deform_attn import triton_atomics

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


def forward_kernel(
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


def _grad_out_rows(grad_out_ref, row_c, d_ok, d_c, head_dim: int, block_d: int, acc_dtype):
    """`(block_q, block_d)` rows of the output's cotangent; zero in padded columns, so that
    they add nothing to g . value."""
    g = _gather(grad_out_ref, (row_c * head_dim)[:, None] + d_c[None, :]).astype(acc_dtype)
    if block_d != head_dim:
        g = jnp.where(d_ok[None, :], g, 0)
    return g


def _scatter_corners(
    value_ref, grad_value_ref, g, d_c, d_ok, head_dim, interpret, base, corners, a
):
    """Adds `weight * a * g` to the value gradient rows of one point's four corners (`base`:
    the level's first element), and returns g . value at each corner, `(block_q,)` each, zero
    for corners off the level. `g`: `(block_q, block_d)` in the accumulation dtype."""
    block_d, acc_dtype = g.shape[1], g.dtype
    # (block_q, block_d) element offsets of the four corners' rows.
    offsets = [(base + offset)[:, None] + d_c[None, :] for _, offset, _ in corners]
    rows = [_gather(value_ref, o) for o in offsets]
    g_dot = []
    for (ok, _, weight), v, o in zip(corners, rows, offsets):
        g_dot.append(jnp.where(ok, jnp.sum(g * v.astype(acc_dtype), axis=1), 0))
        grad_v = (weight * a)[:, None] * g
        mask = _tile_mask(ok, d_ok, block_d, head_dim)
        _scatter_add(grad_value_ref, o, grad_v, mask, interpret)
    return g_dot


def _point_grad_tiles(block_q: int, nlevels_points: int, acc_dtype):
    """`(k_cols, xy_cols, grad_attn_tile, grad_loc_tile)`: the columns and the zero
    `(block_q, cols)` tiles that collect the block's attention-weight and location gradients
    (stored once as contiguous rows: per-point stores would each move their values between
    thread layouts through shared memory)."""
    block_k = pl.next_power_of_2(nlevels_points)
    k_cols = jnp.arange(block_k, dtype=jnp.int32)
    xy_cols = jnp.arange(2 * block_k, dtype=jnp.int32)
    grad_attn_tile = jnp.zeros((block_q, block_k), acc_dtype)
    grad_loc_tile = jnp.zeros((block_q, 2 * block_k), acc_dtype)
    return k_cols, xy_cols, grad_attn_tile, grad_loc_tile


def _collect_point_grads(k_cols, xy_cols, tiles, k, corners, g_dot, fx, fy, a, height, width):
    """Point `k`'s attention-weight and location gradients, from g . value at its corners,
    written into column `k` (`2k`, `2k + 1`) of the tiles `(grad_attn_tile, grad_loc_tile)`."""
    grad_attn_tile, grad_loc_tile = tiles
    g00, g01, g10, g11 = g_dot
    grad_a = sum(weight * gd for (_, _, weight), gd in zip(corners, g_dot))
    # d(sampled)/d(fx), d(sampled)/d(fy), projected on g.
    d_fx = (1 - fy) * (g01 - g00) + fy * (g11 - g10)
    d_fy = (1 - fx) * (g10 - g00) + fx * (g11 - g01)
    grad_attn_tile = jnp.where(k_cols[None, :] == k, grad_a[:, None], grad_attn_tile)
    grad_loc_tile = jnp.where(
        xy_cols[None, :] == 2 * k,
        (a * width * d_fx)[:, None],
        jnp.where(xy_cols[None, :] == 2 * k + 1, (a * height * d_fy)[:, None], grad_loc_tile),
    )
    return grad_attn_tile, grad_loc_tile


def _store_point_grads(refs, tiles, columns, q_ok, row, nlevels_points: int, interpret: bool):
    """Stores the tiles `(grad_attn_tile, grad_loc_tile)` of `_point_grad_tiles` (columns
    `(k_cols, xy_cols)`) into the flat gradients `(grad_attn_ref, grad_loc_ref)`: the rows of
    the block's queries inside len_q."""
    for ref, tile, cols, width in zip(refs, tiles, columns, (nlevels_points, 2 * nlevels_points)):
        # (block_q, cols) of the flat gradient rows: row * width + col
        mask = q_ok[:, None] & (cols < width)[None, :]
        offsets = (row * width)[:, None] + cols[None, :]
        _store(ref, offsets, tile.astype(ref.dtype), mask, interpret)


def backward_kernel(
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
    # (block_q, block_d)
    g = _grad_out_rows(grad_out_ref, row_c, d_ok, d_c, head_dim, block_d, acc_dtype)
    scatter_corners = functools.partial(
        _scatter_corners, value_ref, grad_value_ref, g, d_c, d_ok, head_dim, interpret
    )
    k_cols, xy_cols, *tiles = _point_grad_tiles(block_q, nlevels_points, acc_dtype)
    collect = functools.partial(_collect_point_grads, k_cols, xy_cols)
    carry = (*tiles, point_loads(0))

    level_start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        value_base = ((b * len_v + level_start) * nheads + h) * head_dim

        def point(p, carry, level=level, height=height, width=width, value_base=value_base):
            *tiles, (loc_x, loc_y, a) = carry
            k = level * npoints + p
            upcoming = point_loads(k + 1)  # in flight during this point's gathers
            fx, fy, corners = _corners(loc_x, loc_y, height, width, row_stride, q_ok)
            g_dot = scatter_corners(value_base, corners, a)
            tiles = collect(tiles, k, corners, g_dot, fx, fy, a, height, width)
            return *tiles, upcoming

        carry = jax.lax.fori_loop(0, npoints, point, carry)
        level_start += height * width
    refs = (grad_attn_ref, grad_loc_ref)
    _store_point_grads(refs, carry[:2], (k_cols, xy_cols), q_ok, row, nlevels_points, interpret)


__all__ = ["backward_kernel", "forward_kernel"]
