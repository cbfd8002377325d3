"""Pure-jnp reference of the multi-scale deformable attention sampling core.

Follows the PyTorch fallback of the original implementation (fundamentalvision
`ms_deform_attn_core_pytorch`, transformers' `MultiScaleDeformableAttention`): bilinear
sampling as `grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`,
i.e. pixel coordinate = location * size - 0.5, and corners outside a level contribute zero.

This is the correctness oracle for the Pallas kernels and the CPU/TPU fallback. Per level it
gathers whole rows batched over (bs, nheads), multiplies them by the bilinear x attention
coefficients and reduces over points and corners at once. Two gather layouts, same result:

- corners: four `head_dim` rows per sample straight from the level (when a level has fewer
  samples than cells: the decoder);
- neighbourhoods: one `4 * head_dim` row per sample, its whole 2x2 neighbourhood, from a
  table built from the level bordered by zeros (when it has more: the encoder). A quarter of
  the index work, which is what gathers cost on CPU.

On CPU the queries are also processed in chunks, forward (`lax.map`) and backward (a hand-written
`lax.scan` that scatter-adds each chunk straight into the carried table gradient), so that the
gathered rows and the scatter's updates of a chunk are used while they are still in cache
instead of going through main memory; on GPU/TPU the whole level is one gather, and its
backward is autodiff's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# (bs, nheads, len, row), (bs, nheads, n) -> (bs, nheads, n, row)
_gather_rows = jax.vmap(jax.vmap(lambda rows, idx: rows[idx]))

# Gathered bytes per chunk of queries on CPU, small enough to stay in cache until reduced.
# Measured at an encoder level of 100 x 160, batch 1, 8 heads, 4 points, head_dim 32 (2 MB =
# 128 queries): chunks of 2 and 8 MB took the same time, 32 MB 1.6x longer, no chunks 3x.
CPU_CHUNK_BYTES = 2**21


def _gathers_neighbourhoods(samples: int, height: int, width: int) -> bool:
    """Whether a level is sampled through the neighbourhood table (static, per level)."""
    return samples >= (height + 1) * (width + 1)


def _query_chunk(len_q: int, bytes_per_query: int) -> int | None:
    """Queries per chunk, or None for one gather over all of them (static)."""
    if jax.default_backend() != "cpu":
        return None
    chunk = max(8, CPU_CHUNK_BYTES // bytes_per_query)
    return chunk if len_q > 2 * chunk else None


def _corner(loc, size, acc_dtype):
    """`floor(x)` and `x - floor(x)` of the pixel coordinate `x = loc * size - 0.5`.

    The corner is decided from `t = loc * size` by a comparison, never from an expression
    in which the multiplication feeds an addition: XLA recomputes these few elementwise ops
    in every fusion that needs them (the gather/scatter indices in one, the coefficients in
    another), and a compiler may contract `loc * size - 0.5` into a fused multiply-add in
    some of them and not in others. jaxlib 0.10.2's CPU fusion emitter did (where the CPU
    has FMA: not with --xla_cpu_max_isa=AVX), so under jit a point within an ulp of a pixel
    centre took its corner indices from one side of the centre and its coefficients from the
    other, and its value gradient went to the wrong (or a zero-border) pixel. Here the corner
    is the same in every fusion; only the fraction may differ there by a rounding. Exactly
    on a centre (`t = k + 0.5`) the corner is `k` and the fraction 0, as `floor` gives.
    """
    t = loc.astype(acc_dtype) * size
    t_floor = jnp.floor(t)
    # (t_floor + 0.5 is exact: an integer plus a half)
    corner = jnp.where(t >= t_floor + 0.5, t_floor, t_floor - 1)
    return corner.astype(jnp.int32), t - (corner + 0.5)


def _bilinear_terms(loc, attn, height, width, acc_dtype):
    """Top-left corner and the four corner coefficients (bilinear weight x attention).

    Returns `x0, y0` int32 `(bs, nheads, len_q, npoints)` (pixel index of the top-left corner,
    may lie outside the level) and `coeffs` `(bs, nheads, len_q, npoints, 4)` for the corners
    (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
    """
    x0, fx = _corner(loc[..., 0], width, acc_dtype)
    y0, fy = _corner(loc[..., 1], height, acc_dtype)
    attn = attn.astype(acc_dtype)
    coeffs = jnp.stack(
        [(1 - fy) * (1 - fx) * attn, (1 - fy) * fx * attn, fy * (1 - fx) * attn, fy * fx * attn],
        axis=-1,
    )
    return x0, y0, coeffs


_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (dy, dx), the order of `coeffs`' last axis


def _corner_rows(value_l, height, width, x0, y0, coeffs):
    """Table = the level's `head_dim` rows; four indices per sample, one per corner.

    Returns `table (bs, nheads, height * width, head_dim)`, `idx (bs, nheads, len_q,
    npoints * 4)` and `coeffs` with out-of-level corners zeroed.
    """
    xi = x0[..., None] + jnp.asarray([dx for _, dx in _CORNERS])
    yi = y0[..., None] + jnp.asarray([dy for dy, _ in _CORNERS])
    valid = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    idx = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
    bs, nheads, len_q = x0.shape[:3]
    return value_l, idx.reshape(bs, nheads, len_q, -1), jnp.where(valid, coeffs, 0)


def _neighbourhood_rows(value_l, height, width, x0, y0, coeffs):
    """Table = every 2x2 neighbourhood as one `4 * head_dim` row; one index per sample.

    Row (y0 + 1) * (width + 1) + (x0 + 1) holds the corners (y0, x0), (y0, x0 + 1),
    (y0 + 1, x0), (y0 + 1, x0 + 1) for every top-left corner in [-1, height - 1] x
    [-1, width - 1], read from the level bordered by one row/column of zeros, so corners
    outside the level read zero; a top-left corner outside that range has all four corners
    outside the level and its coefficients are zeroed.

    Returns `table (bs, nheads, (height + 1) * (width + 1), 4 * head_dim)`,
    `idx (bs, nheads, len_q, npoints)` and `coeffs`.
    """
    bs, nheads, _, head_dim = value_l.shape
    # (bs, nheads, height + 2, width + 2, head_dim)
    grid = jnp.pad(
        value_l.reshape(bs, nheads, height, width, head_dim),
        ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)),
    )
    table = jnp.concatenate(
        [grid[:, :, dy : dy + height + 1, dx : dx + width + 1] for dy, dx in _CORNERS], axis=-1
    ).reshape(bs, nheads, (height + 1) * (width + 1), 4 * head_dim)
    inside = (x0 >= -1) & (x0 < width) & (y0 >= -1) & (y0 < height)
    idx = jnp.clip(y0 + 1, 0, height) * (width + 1) + jnp.clip(x0 + 1, 0, width)
    return table, idx, jnp.where(inside[..., None], coeffs, 0)


def _gather_reduce(table, idx, coeffs):
    """`sum over points and corners of coeffs * rows`.

    Args:
      table: `(bs, nheads, rows, k * head_dim)`.
      idx: `(bs, nheads, len_q, npoints * 4 // k)`.
      coeffs: `(bs, nheads, len_q, npoints, 4)`.

    Returns:
      `(bs, nheads, len_q, head_dim)`.
    """
    bs, nheads, len_q, npoints, _ = coeffs.shape
    head_dim = table.shape[-1] * idx.shape[-1] // (4 * npoints)
    # (bs, nheads, len_q, npoints, 4, head_dim)
    rows = _gather_rows(table, idx.reshape(bs, nheads, -1)).reshape(
        bs, nheads, len_q, npoints, 4, head_dim
    )
    return jnp.einsum("bhqpc,bhqpcd->bhqd", coeffs, rows)


def _split_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """`(bs, nheads, len_q, ...)` -> `(nchunks, bs, nheads, chunk, ...)`, len_q padded by zeros."""
    bs, nheads, len_q = x.shape[:3]
    nchunks = -(-len_q // chunk)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, nchunks * chunk - len_q)) + ((0, 0),) * (x.ndim - 3))
    return jnp.moveaxis(x.reshape(bs, nheads, nchunks, chunk, *x.shape[3:]), 2, 0)


def _join_chunks(x: jax.Array, len_q: int) -> jax.Array:
    """`_split_chunks` undone: `(nchunks, bs, nheads, chunk, ...)` -> `(bs, nheads, len_q, ...)`."""
    nchunks, bs, nheads, chunk = x.shape[:4]
    x = jnp.moveaxis(x, 0, 2).reshape(bs, nheads, nchunks * chunk, *x.shape[4:])
    return x[:, :, :len_q]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_reduce_chunked(table, idx, coeffs, chunk: int):
    """`_gather_reduce` over `chunk` queries at a time (len_q padded with zero weights).

    The backward is chunked too, by hand (`_gather_reduce_chunked_bwd`): autodiff of the
    `lax.map` would scatter every chunk into a zero table of its own and add that whole
    table to the cotangent carried through the loop (1.3x slower training steps at 96 x 96
    on CPU than no chunks in the backward at all).
    """
    len_q = idx.shape[2]
    out = jax.lax.map(
        lambda args: _gather_reduce(table, *args),
        (_split_chunks(idx, chunk), _split_chunks(coeffs, chunk)),
    )
    return _join_chunks(out, len_q)


def _gather_reduce_chunked_fwd(table, idx, coeffs, chunk):
    return _gather_reduce_chunked(table, idx, coeffs, chunk), (table, idx, coeffs)


def _gather_reduce_chunked_bwd(chunk, residuals, grad):
    """Per chunk of queries: re-gather its rows, contract them with `grad` for the
    coefficients' gradient and scatter-add `coeffs x grad` straight into the table's gradient,
    which the loop carries and updates in place. Each chunk's rows and updates stay in cache;
    all at once they are two `4 * npoints * head_dim` floats per query (134 MB per encoder
    level of R50 at batch 2) that XLA:CPU also copies into other layouts: R50 training steps
    were 1.4-1.5x slower on CPU (BENCHMARKS.md, issue 14 item 2)."""
    table, idx, coeffs = residuals
    bs, nheads, nrows, row = table.shape
    _, _, len_q, npoints, _ = coeffs.shape
    head_dim = grad.shape[-1]
    # one flat table, so that one scatter covers every (batch, head): row offsets per pair
    flat_table = table.reshape(bs * nheads * nrows, row)
    offsets = (jnp.arange(bs * nheads, dtype=idx.dtype) * nrows).reshape(bs, nheads, 1, 1)

    def body(grad_table, chunk_args):
        # idx (bs, nheads, chunk, m), m = npoints (neighbourhood rows) or npoints * 4 (corner
        # rows); coeffs (bs, nheads, chunk, npoints, 4); grad (bs, nheads, chunk, head_dim)
        idx_c, coeffs_c, grad_c = chunk_args
        flat_idx = (idx_c + offsets).reshape(-1)
        # (bs, nheads, chunk, npoints * 4, head_dim)
        rows = flat_table[flat_idx].reshape(bs, nheads, chunk, npoints * 4, head_dim)
        # the rows as the left operand, contracted over their minor axis: no transposed copy
        grad_coeffs = jax.lax.dot_general(rows, grad_c, (((4,), (3,)), ((0, 1, 2), (0, 1, 2))))
        updates = (coeffs_c[..., None] * grad_c[:, :, :, None, None, :]).reshape(-1, row)
        grad_table = grad_table.at[flat_idx].add(updates, mode="promise_in_bounds")
        return grad_table, grad_coeffs.reshape(coeffs_c.shape)

    split = functools.partial(_split_chunks, chunk=chunk)
    grad_table, grad_coeffs = jax.lax.scan(
        body,
        jnp.zeros_like(flat_table),
        (split(idx), split(coeffs), split(grad.astype(table.dtype))),
    )
    grad_table = grad_table.reshape(table.shape)
    return grad_table, None, _join_chunks(grad_coeffs, len_q)  # idx: integer, no cotangent


_gather_reduce_chunked.defvjp(_gather_reduce_chunked_fwd, _gather_reduce_chunked_bwd)


# Rematerialised in the backward pass: saving the gathered rows of every level as VJP
# residuals costs 4 * nlevels * bs * nheads * len_q * npoints * head_dim floats (about 12 GB
# for the encoder at batch 8), recomputing them costs the gathers again.
@functools.partial(jax.checkpoint, static_argnums=(1, 2, 5, 6))
def _sample_level(
    value_l: jax.Array,
    height: int,
    width: int,
    loc: jax.Array,
    attn: jax.Array,
    neighbourhoods: bool,
    chunk: int | None,
) -> jax.Array:
    """Bilinearly samples one level and reduces over points.

    Args:
      value_l: `(bs, nheads, height * width, head_dim)`.
      loc: `(bs, nheads, len_q, npoints, 2)` as (x, y) in [0, 1] (may lie outside).
      attn: `(bs, nheads, len_q, npoints)`.
      neighbourhoods: gather through the neighbourhood table rather than by corners.
      chunk: queries per chunk, or None for all at once.

    Returns:
      `(bs, nheads, len_q, head_dim)` in float32 (or float64 for float64 inputs).
    """
    acc_dtype = jnp.promote_types(value_l.dtype, jnp.float32)
    # Gather from the accumulation dtype, so that the VJP's scatter-add into the value
    # gradient also accumulates in float32 for bfloat16 inputs (XLA fuses the convert).
    value_l = value_l.astype(acc_dtype)
    x0, y0, coeffs = _bilinear_terms(loc, attn, height, width, acc_dtype)
    rows = _neighbourhood_rows if neighbourhoods else _corner_rows
    table, idx, coeffs = rows(value_l, height, width, x0, y0, coeffs)
    if chunk is None:
        return _gather_reduce(table, idx, coeffs)
    return _gather_reduce_chunked(table, idx, coeffs, chunk)


def ms_deform_attn_reference(
    value: jax.Array,
    spatial_shapes: tuple[tuple[int, int], ...],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
) -> jax.Array:
    """Multi-scale deformable attention core, pure jnp.

    Args:
      value: `(bs, len_v, nheads, head_dim)`, levels flattened row-major and concatenated.
      spatial_shapes: static `((h, w), ...)`, one per level; `sum(h * w) == len_v`.
      sampling_locations: `(bs, len_q, nheads, nlevels, npoints, 2)` as (x, y), nominally in [0, 1].
      attention_weights: `(bs, len_q, nheads, nlevels, npoints)`.

    Returns:
      `(bs, len_q, nheads * head_dim)` in `value.dtype`.
    """
    bs, len_v, nheads, head_dim = value.shape
    _, len_q, _, nlevels, npoints, _ = sampling_locations.shape
    # (bs, nheads, len_v, head_dim)
    value_t = jnp.transpose(value, (0, 2, 1, 3))
    # (bs, nheads, nlevels, len_q, npoints, 2)
    loc_t = jnp.transpose(sampling_locations, (0, 2, 3, 1, 4, 5))
    # (bs, nheads, nlevels, len_q, npoints)
    attn_t = jnp.transpose(attention_weights, (0, 2, 3, 1, 4))
    acc_bytes = jnp.dtype(jnp.promote_types(value.dtype, jnp.float32)).itemsize
    # gathered per query: bs x nheads x npoints x 4 corners x head_dim
    chunk = _query_chunk(len_q, bs * nheads * npoints * 4 * head_dim * acc_bytes)
    out = None
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        value_l = value_t[:, :, start : start + height * width]
        start += height * width
        neighbourhoods = _gathers_neighbourhoods(len_q * npoints, height, width)
        sampled = _sample_level(
            value_l, height, width, loc_t[:, :, level], attn_t[:, :, level], neighbourhoods, chunk
        )
        out = sampled if out is None else out + sampled
    # (bs, nheads, len_q, head_dim) -> (bs, len_q, nheads * head_dim)
    out = jnp.transpose(out, (0, 2, 1, 3)).reshape(bs, len_q, nheads * head_dim)
    return out.astype(value.dtype)
