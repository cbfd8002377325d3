"""The `"pallas_tpu"` kernel bodies: `forward_kernel` and `backward_kernel` (Mosaic).

Both run on the grid `(bs, nheads, query blocks, pixel blocks)` of `pallas_tpu.py` and build
the same one-hot sampling matrix per tile, sublanes = pixels, lanes = queries:

    S[v, q] = sum over points p and bilinear corners c of
              attention_weight[q, p] * bilinear_weight[q, p, c] * (pixel[q, p, c] == v)

Both decide a corner by the same comparison on `loc * size` (`_corner_terms`,
`corner.pixel_corner`), so that the backward's corners are the forward's. A tile outside its
query block's reachable range of the level (the SMEM table of `pallas_tpu_layout`) does no
work (`_level_steps`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.ms_deform_attn.corner import pixel_corner


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


def _pixel_of_row(v_block, first, block_v: int, block_q: int):
    """In-level pixel index of every (row, query) of the sampling matrix, `(block_v, block_q)`."""
    return jax.lax.broadcasted_iota(jnp.int32, (block_v, block_q), 0) + (v_block - first) * block_v


def forward_kernel(
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
    """`out (head_dim, block_q) = sum over pixel blocks of value^T (head_dim, block_v) @ S`,
    on the MXU in the accumulation dtype."""
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
            pixel_of_row = _pixel_of_row(v_block, first, block_v, block_q)
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


def _sampling_and_coeff_grads(
    loc_ref, attn_ref, grad_coeff_acc, pixel_of_row, value_dot_grad, level, npoints, height, width
):
    """The tile's sampling matrix `S` of `level`, `(block_v, block_q)`; on the way, adds to
    `grad_coeff_acc`'s row of each corner the entries of `value_dot_grad` at its pixel,
    summed over the tile's rows."""
    s = jnp.zeros(pixel_of_row.shape, value_dot_grad.dtype)
    for p in range(npoints):
        corners, (_, _, a) = _point_corners(loc_ref, attn_ref, level, p, npoints, height, width)
        for c, (pixel, weight) in enumerate(corners):
            hit = pixel_of_row == pixel
            s = s + jnp.where(hit, weight * a, 0.0)
            row = (level * npoints + p) * 4 + c
            grad_coeff_acc[row : row + 1, :] += jnp.sum(
                jnp.where(hit, value_dot_grad, 0.0), axis=0, keepdims=True
            )
    return s


def _backward_tile(refs, npoints, block_q, block_v, grad, v_block, level, height, width, first):
    """One tile of `level` in the query block's reachable range: `grad_value[:, block] +=
    grad @ S^T`, and the corners' rows of `grad_coeff_acc` (`_sampling_and_coeff_grads`).
    `refs` is `(value_ref, loc_ref, attn_ref, grad_value_acc, grad_coeff_acc)`."""
    value_ref, loc_ref, attn_ref, grad_value_acc, grad_coeff_acc = refs
    acc_dtype = grad_value_acc.dtype
    pixel_of_row = _pixel_of_row(v_block, first, block_v, block_q)
    # <value[v], grad[q]> for every pixel and query of the tile, (block_v, block_q)
    value_dot_grad = jnp.dot(
        value_ref[...].astype(acc_dtype),
        grad,
        preferred_element_type=acc_dtype,
        precision=jax.lax.Precision.HIGHEST,
    )
    s = _sampling_and_coeff_grads(
        loc_ref,
        attn_ref,
        grad_coeff_acc,
        pixel_of_row,
        value_dot_grad,
        level,
        npoints,
        height,
        width,
    )
    start = pl.multiple_of(v_block * block_v, block_v)
    grad_value_acc[:, pl.ds(start, block_v)] += jax.lax.dot_general(
        grad, s, _NT, preferred_element_type=acc_dtype, precision=jax.lax.Precision.HIGHEST
    )


def _chain_rule(
    loc_ref, attn_ref, grad_coeff_acc, grad_loc_ref, grad_attn_ref, spatial_shapes, npoints
):
    """The bilinear chain rule from the corner coefficients' cotangents (`grad_coeff_acc`)
    to the locations' and weights' gradients of the query block."""
    for level, (height, width) in enumerate(spatial_shapes):
        for p in range(npoints):
            k = level * npoints + p
            _, (fx, fy, a) = _point_corners(loc_ref, attn_ref, level, p, npoints, height, width)
            # (1, block_q) each: the cotangents of the corners' coefficients
            g00, g01, g10, g11 = (grad_coeff_acc[4 * k + c : 4 * k + c + 1, :] for c in range(4))
            grad_attn_ref[k : k + 1, :] = (
                (1 - fy) * (1 - fx) * g00
                + (1 - fy) * fx * g01
                + fy * (1 - fx) * g10
                + fy * fx * g11
            ).astype(grad_attn_ref.dtype)
            grad_fx = a * ((1 - fy) * (g01 - g00) + fy * (g11 - g10))
            grad_fy = a * ((1 - fx) * (g10 - g00) + fx * (g11 - g01))
            grad_loc_ref[2 * k : 2 * k + 1, :] = (grad_fx * width).astype(grad_loc_ref.dtype)
            grad_loc_ref[2 * k + 1 : 2 * k + 2, :] = (grad_fy * height).astype(grad_loc_ref.dtype)


def backward_kernel(
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
    """The mirror of `forward_kernel` on the same grid and sampling matrix `S`: per tile
    `grad_value[:, block] += grad @ S^T` and the corner coefficients' cotangents (summed
    `value^T grad` at each corner's pixel); after the last pixel block, the chain rule to the
    locations and weights. `grad_value` stays in VMEM for the (batch, head), written once."""
    q_block, v_block = pl.program_id(2), pl.program_id(3)
    last_v = v_block == pl.num_programs(3) - 1
    refs = (value_ref, loc_ref, attn_ref, grad_value_acc, grad_coeff_acc)
    tile = functools.partial(_backward_tile, refs, npoints, block_q, block_v)

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
            tile(grad, v_block, level, height, width, first)

    @pl.when(last_v)
    def _grad_points():
        _chain_rule(
            loc_ref, attn_ref, grad_coeff_acc, grad_loc_ref, grad_attn_ref, spatial_shapes, npoints
        )

    @pl.when(last_v & (q_block == pl.num_programs(2) - 1))
    def _write_value():
        grad_value_ref[...] = grad_value_acc[...].astype(grad_value_ref.dtype)


__all__ = ["backward_kernel", "forward_kernel"]
