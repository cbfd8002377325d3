"""The "xla" implementation of the multi-scale deformable attention sampling core.

Pure jnp, tuned for XLA; it computes what `reference.py` (the plain formula, the correctness
oracle) computes: bilinear sampling as `grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)`, i.e. pixel coordinate = location * size - 0.5, corners outside a level
contributing zero, weighted by the attention weights and summed over levels and points. The
shared suite (`tests/test_ms_deform_attn.py`) checks its values and gradients against the
reference and the float64 NumPy oracle, as it checks the Pallas kernels.

It works in the model's own layout: the value `(bs, len_v, nheads, head_dim)` is a flat table
of `head_dim` rows, one per (batch, pixel, head), so no operand or result is transposed, and
every level is read by one gather of rows with computed indices, multiplied by the bilinear x
attention coefficients and reduced over levels, points and corners at once, one output row
per (batch, query, head). Two row layouts, same result, chosen per level:

- corners: four `head_dim` rows per sample, straight from the value (every level on CPU,
  where it measured fastest; elsewhere the levels with fewer samples than cells);
- neighbourhoods: one `4 * head_dim` row per sample, its whole 2x2 neighbourhood, from a
  table built from the level bordered by zeros (off CPU, levels with more samples than
  cells: a quarter of the indices, which is what a TPU's serialised scatter pays for).

On CPU the (batch, query, head) rows are also processed in chunks, forward and backward
(`_gather_reduce_chunked`: a hand-written VJP that scatter-adds each chunk straight into the
carried table gradient), so that the gathered rows and the scatter's updates of a chunk are
used while they are still in cache instead of going through main memory; on GPU/TPU the whole
call is one gather, and its backward is autodiff's.

"On CPU" is the platform the program is lowered for, not the default backend at trace time:
both variants are traced and `jax.lax.platform_dependent` keeps the one for the platform
being compiled for, so that `jax.export(..., platforms=["cuda"])` on a CPU machine gets the
GPU variant (and a multi-platform export both, chosen where it is compiled).

Under jit each sample's pixel coordinate and corner are computed once and read by every fusion
that needs them (the gather's indices, the validity masks, the coefficients; `_shared_corner`),
so a compiler that contracts the caller's location arithmetic differently per fusion cannot
make the rows read and their weights disagree at a pixel centre.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Gathered bytes per chunk of rows on CPU, small enough to stay in cache until reduced.
# Measured at an encoder level of 100 x 160, batch 1, 8 heads, 4 points, head_dim 32 (2 MB =
# 128 queries): chunks of 2 and 8 MB took the same time, 32 MB 1.6x longer, no chunks 3x.
CPU_CHUNK_BYTES = 2**21


def _gathers_neighbourhoods(samples: int, height: int, width: int, on_cpu: bool) -> bool:
    """Whether a level is sampled through the neighbourhood table (static, per level)."""
    if on_cpu:
        return False
    return samples >= (height + 1) * (width + 1)


def _row_chunk(rows: int, bytes_per_row: int, on_cpu: bool) -> int | None:
    """Output rows per chunk on CPU (all of them when they fit one; the hand-written backward
    either way), or None for one gather over all of them with autodiff's backward (static)."""
    if not on_cpu:
        return None
    return min(rows, max(8, CPU_CHUNK_BYTES // bytes_per_row))


# Roundings (of `t`'s magnitude) within which a point counts as on a pixel centre.
_CENTRE_SLACK = 8


def _shared_corner(loc, size, acc_dtype):
    """`corner.pixel_corner`, with the corner computed once for every consumer under jit.

    The core's `loc` is usually an elementwise expression of the caller's (reference point x
    valid ratio + offset / normaliser) that XLA recomputes inside every fusion consuming it:
    the gather's indices, the validity masks and the coefficients, forward and backward. A
    compiler may contract that chain into fused multiply-adds in some of those fusions and not
    in others (XLA:CPU does, jaxlib 0.10.2 and 0.12.1 alike), so within an ulp of a pixel
    centre two fusions would put the corner on different sides of the centre: the rows read
    would not be the rows the coefficients were computed for, and the sample would be off by
    a pixel. An `optimization_barrier` does not help: XLA:CPU removes barriers before fusion.

    Here `t` and the corner each pass through a division by a divisor known only at run time
    (1; 2 for a NaN location, whose sample is NaN anyway). XLA never duplicates a floating-point
    division into several fusions (an expensive producer, `InstructionFusion`), so each is
    computed once, and the indices, masks and coefficients all read the same `t` and corner:
    the jitted core computes what the eager one does, to the bit. (A float division, not an
    integer one: x86 has no vector integer division, which made the forward 1.25x slower.)
    `tests/test_ms_deform_attn.py` and `tests/test_jitted_model.py` check the numbers.
    """
    # (exactly 1 but for NaN, and known only at run time)
    one = 1 + jnp.isnan(loc).astype(acc_dtype)
    t = (loc.astype(acc_dtype) * size) / one
    t_floor = jnp.floor(t)
    # A point within a few roundings of a centre counts as on it (corner k, fraction about 0,
    # the right-hand derivative, as floor gives exactly on it): the same side whether or not
    # some compiler contracted the caller's arithmetic, so that jitted and eager gradients
    # agree at the centres where a freshly initialised model puts its points.
    slack = _CENTRE_SLACK * jnp.finfo(acc_dtype).eps * jnp.maximum(jnp.abs(t), 1)
    corner = jnp.where(t >= t_floor + 0.5 - slack, t_floor, t_floor - 1) / one
    return corner.astype(jnp.int32), t - (corner + 0.5)


def _bilinear_terms(loc, attn, spatial_shapes, acc_dtype):
    """Top-left corner and the four corner coefficients (bilinear weight x attention).

    Args:
      loc: `(bs, len_q, nheads, nlevels, npoints, 2)`; attn: `(bs, len_q, nheads, nlevels,
        npoints)`.

    Returns `x0, y0` int32 `(bs, len_q, nheads, nlevels, npoints)` (pixel index of the
    top-left corner, may lie outside its level) and `coeffs` `(..., 4)` for the corners
    (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
    """
    # (nlevels, 1): broadcast over npoints
    heights = jnp.asarray([h for h, _ in spatial_shapes], acc_dtype)[:, None]
    widths = jnp.asarray([w for _, w in spatial_shapes], acc_dtype)[:, None]
    x0, fx = _shared_corner(loc[..., 0], widths, acc_dtype)
    y0, fy = _shared_corner(loc[..., 1], heights, acc_dtype)
    attn = attn.astype(acc_dtype)
    coeffs = jnp.stack(
        [(1 - fy) * (1 - fx) * attn, (1 - fy) * fx * attn, fy * (1 - fx) * attn, fy * fx * attn],
        axis=-1,
    )
    return x0, y0, coeffs


_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (dy, dx), the order of `coeffs`' last axis


def _level_sizes(spatial_shapes, levels, extra: int = 0):
    """int32 heights, widths `(len(levels), 1)` and the row at which each level starts in a
    table of the levels' `(height + extra) * (width + extra)` rows, in that order."""
    heights = [spatial_shapes[level][0] for level in levels]
    widths = [spatial_shapes[level][1] for level in levels]
    sizes = [(h + extra) * (w + extra) for h, w in zip(heights, widths)]
    starts = [sum(sizes[:i]) for i in range(len(levels))]
    column = lambda xs: jnp.asarray(xs, jnp.int32)[:, None]  # noqa: E731
    return column(heights), column(widths), column(starts), sum(sizes)


def _corner_rows(value, spatial_shapes, levels, x0, y0, coeffs):
    """Table = the value's `head_dim` rows; four indices per sample, one per corner.

    Args:
      value: `(bs, len_v, nheads, head_dim)`; x0, y0, coeffs: of `levels` only.

    Returns `table (bs * len_v * nheads, head_dim)`, `idx (bs * len_q * nheads, k)` and
    `coeffs (bs * len_q * nheads, k)`, `k = len(levels) * npoints * 4`, out-of-level corners'
    coefficients zeroed.
    """
    bs, len_v, nheads, head_dim = value.shape
    level_starts = [sum(h * w for h, w in spatial_shapes[:level]) for level in levels]
    # (len(levels), 1, 1): broadcast over npoints and corners
    heights, widths, _, _ = _level_sizes(spatial_shapes, levels)
    heights, widths = heights[..., None], widths[..., None]
    starts = jnp.asarray(level_starts, jnp.int32)[:, None, None]
    xi = x0[..., None] + jnp.asarray([dx for _, dx in _CORNERS], jnp.int32)
    yi = y0[..., None] + jnp.asarray([dy for dy, _ in _CORNERS], jnp.int32)
    valid = (xi >= 0) & (xi < widths) & (yi >= 0) & (yi < heights)
    pixel = starts + jnp.clip(yi, 0, heights - 1) * widths + jnp.clip(xi, 0, widths - 1)
    idx = _flat_rows(pixel, len_v, nheads)
    table = value.reshape(bs * len_v * nheads, head_dim)
    rows = bs * x0.shape[1] * nheads
    return table, idx.reshape(rows, -1), jnp.where(valid, coeffs, 0).reshape(rows, -1)


def _flat_rows(row, rows_per_image, nheads):
    """Flat table row of `(bs, len_q, nheads, ...)` rows within each image's table."""
    bs = row.shape[0]
    image = jnp.arange(bs, dtype=jnp.int32).reshape((bs,) + (1,) * (row.ndim - 1))
    head = jnp.arange(nheads, dtype=jnp.int32).reshape((1, 1, nheads) + (1,) * (row.ndim - 3))
    return (image * rows_per_image + row) * nheads + head


def _neighbourhood_rows(value, spatial_shapes, levels, x0, y0, coeffs):
    """Table = every 2x2 neighbourhood as one `4 * head_dim` row; one index per sample.

    Level row (y0 + 1) * (width + 1) + (x0 + 1) holds the corners (y0, x0), (y0, x0 + 1),
    (y0 + 1, x0), (y0 + 1, x0 + 1) for every top-left corner in [-1, height - 1] x
    [-1, width - 1], read from the level bordered by one row/column of zeros, so corners
    outside the level read zero; a top-left corner outside that range has all four corners
    outside the level and its coefficients are zeroed.

    Returns `table (bs * rows * nheads, 4 * head_dim)` (rows: the levels' neighbourhoods),
    `idx (bs * len_q * nheads, len(levels) * npoints)` and `coeffs (bs * len_q * nheads,
    len(levels) * npoints * 4)`.
    """
    bs, _, nheads, head_dim = value.shape
    tables = []
    for level in levels:
        height, width = spatial_shapes[level]
        start = sum(h * w for h, w in spatial_shapes[:level])
        # (bs, height + 2, width + 2, nheads, head_dim)
        grid = jnp.pad(
            value[:, start : start + height * width].reshape(bs, height, width, nheads, head_dim),
            ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)),
        )
        # (bs, (height + 1) * (width + 1), nheads, 4 * head_dim)
        tables.append(
            jnp.concatenate(
                [grid[:, dy : dy + height + 1, dx : dx + width + 1] for dy, dx in _CORNERS], -1
            ).reshape(bs, (height + 1) * (width + 1), nheads, 4 * head_dim)
        )
    heights, widths, starts, total = _level_sizes(spatial_shapes, levels, extra=1)
    inside = (x0 >= -1) & (x0 < widths) & (y0 >= -1) & (y0 < heights)
    row = starts + jnp.clip(y0 + 1, 0, heights) * (widths + 1) + jnp.clip(x0 + 1, 0, widths)
    table = jnp.concatenate(tables, 1).reshape(bs * total * nheads, 4 * head_dim)
    rows = bs * x0.shape[1] * nheads
    coeffs = jnp.where(inside[..., None], coeffs, 0)
    return table, _flat_rows(row, total, nheads).reshape(rows, -1), coeffs.reshape(rows, -1)


def _gather_reduce(table, idx, coeffs):
    """`sum over samples and corners of coeffs * rows`.

    Args:
      table: `(table_rows, k * head_dim)`, k = 1 (corner rows) or 4 (neighbourhood rows).
      idx: `(rows, m)`.
      coeffs: `(rows, m * k)`.

    Returns:
      `(rows, head_dim)`.
    """
    rows, m = idx.shape
    head_dim = table.shape[1] * m // coeffs.shape[1]
    # (rows, m * k, head_dim)
    gathered = table[idx.reshape(-1)].reshape(rows, coeffs.shape[1], head_dim)
    return jnp.einsum("rc,rcd->rd", coeffs, gathered)


def _chunk_start(i, chunk: int, rows: int):
    """First row of chunk `i`; the last chunk ends at `rows`, overlapping the one before."""
    return jnp.minimum(i * chunk, rows - chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_reduce_chunked(table, idx, coeffs, chunk: int):
    """`_gather_reduce` over `chunk` rows at a time (`chunk <= rows`), in place in the result.

    The backward is chunked too, by hand (`_gather_reduce_chunked_bwd`): autodiff of the loop
    would scatter every chunk into a zero table of its own and add that whole table to the
    cotangent carried through the loop (1.3x slower training steps at 96 x 96 on CPU than no
    chunks in the backward at all).
    """
    rows = idx.shape[0]
    head_dim = table.shape[1] * idx.shape[1] // coeffs.shape[1]

    def body(i, out):
        start = _chunk_start(i, chunk, rows)
        part = _gather_reduce(
            table,
            jax.lax.dynamic_slice_in_dim(idx, start, chunk),
            jax.lax.dynamic_slice_in_dim(coeffs, start, chunk),
        )
        return jax.lax.dynamic_update_slice_in_dim(out, part, start, 0)

    out = jnp.zeros((rows, head_dim), table.dtype)
    return jax.lax.fori_loop(0, -(-rows // chunk), body, out)


def _gather_reduce_chunked_fwd(table, idx, coeffs, chunk):
    return _gather_reduce_chunked(table, idx, coeffs, chunk), (table, idx, coeffs)


def _gather_reduce_chunked_bwd(chunk, residuals, grad):
    """Per chunk of rows: re-gather its table rows, contract them with `grad` for the
    coefficients' gradient and scatter-add `coeffs x grad` straight into the table's gradient,
    which the loop carries and updates in place. Each chunk's rows and updates stay in cache;
    all at once they are two `4 * npoints * head_dim` floats per (query, head, level): 134 MB
    per encoder level of R50 at batch 2, which XLA:CPU also copied into other layouts (R50
    training steps were 1.4-1.5x slower on CPU, BENCHMARKS.md, issue 14 item 2). The rows of
    the last chunk that the one before already did scatter nothing."""
    table, idx, coeffs = residuals
    rows, m = idx.shape
    samples = coeffs.shape[1]
    head_dim = grad.shape[1]
    grad = grad.astype(table.dtype)

    def body(i, carry):
        grad_table, grad_coeffs = carry
        start = _chunk_start(i, chunk, rows)
        # idx_c (chunk, m), coeffs_c (chunk, samples), grad_c (chunk, head_dim)
        idx_c, coeffs_c, grad_c = (
            jax.lax.dynamic_slice_in_dim(x, start, chunk) for x in (idx, coeffs, grad)
        )
        flat_idx = idx_c.reshape(-1)
        # (chunk, samples, head_dim)
        gathered = table[flat_idx].reshape(chunk, samples, head_dim)
        # the rows as the left operand, contracted over their minor axis: no transposed copy
        part = jax.lax.dot_general(gathered, grad_c, (((2,), (1,)), ((0,), (0,))))
        fresh = start + jnp.arange(chunk) >= i * chunk
        grad_c = jnp.where(fresh[:, None], grad_c, 0)
        updates = (coeffs_c[:, :, None] * grad_c[:, None, :]).reshape(chunk * m, -1)
        grad_table = grad_table.at[flat_idx].add(updates, mode="promise_in_bounds")
        return grad_table, jax.lax.dynamic_update_slice_in_dim(grad_coeffs, part, start, 0)

    init = (jnp.zeros_like(table), jnp.zeros_like(coeffs))
    grad_table, grad_coeffs = jax.lax.fori_loop(0, -(-rows // chunk), body, init)
    return grad_table, None, grad_coeffs  # idx: integer, no cotangent


_gather_reduce_chunked.defvjp(_gather_reduce_chunked_fwd, _gather_reduce_chunked_bwd)


def _select_levels(x: jax.Array, levels: tuple[int, ...], nlevels: int) -> jax.Array:
    """`x[:, :, :, levels]` (static), without a copy when that is every level."""
    if levels == tuple(range(nlevels)):
        return x
    return jnp.concatenate([x[:, :, :, level : level + 1] for level in levels], axis=3)


# Rematerialised in the backward pass: the gather's indices and coefficients (and the
# neighbourhood tables) are recomputed from the value, locations and weights rather than kept
# as residuals (two `nlevels * npoints * 4` arrays per (batch, query, head) per layer).
@functools.partial(jax.checkpoint, static_argnums=(1, 4))
def _sample(
    value: jax.Array,
    spatial_shapes: tuple[tuple[int, int], ...],
    loc: jax.Array,
    attn: jax.Array,
    on_cpu: bool,
) -> jax.Array:
    """Bilinearly samples every level and reduces over levels and points.

    Args:
      value: `(bs, len_v, nheads, head_dim)`.
      loc: `(bs, len_q, nheads, nlevels, npoints, 2)` as (x, y) in [0, 1] (may lie outside).
      attn: `(bs, len_q, nheads, nlevels, npoints)`.
      on_cpu: the CPU variant (corner rows only, chunks of rows with the hand-written
        backward) rather than the one for other platforms (neighbourhood rows for dense
        levels, one gather per layout).

    Returns:
      `(bs * len_q * nheads, head_dim)` in float32 (or float64 for float64 inputs).
    """
    acc_dtype = jnp.promote_types(value.dtype, jnp.float32)
    # Gather from the accumulation dtype, so that the VJP's scatter-add into the value
    # gradient also accumulates in float32 for bfloat16 inputs (XLA fuses the convert).
    value = value.astype(acc_dtype)
    x0, y0, coeffs = _bilinear_terms(loc, attn, spatial_shapes, acc_dtype)
    bs, len_q, nheads, nlevels, npoints = x0.shape
    rows = bs * len_q * nheads
    neighbourhoods = [
        _gathers_neighbourhoods(len_q * npoints, h, w, on_cpu) for h, w in spatial_shapes
    ]
    out = None
    for layout, use in ((_corner_rows, False), (_neighbourhood_rows, True)):
        levels = tuple(level for level in range(nlevels) if neighbourhoods[level] == use)
        if not levels:
            continue
        table, idx, level_coeffs = layout(
            value,
            spatial_shapes,
            levels,
            *(_select_levels(x, levels, nlevels) for x in (x0, y0, coeffs)),
        )
        bytes_per_row = level_coeffs.shape[1] * value.shape[-1] * value.dtype.itemsize
        chunk = _row_chunk(rows, bytes_per_row, on_cpu)
        if chunk is None:
            sampled = _gather_reduce(table, idx, level_coeffs)
        else:
            sampled = _gather_reduce_chunked(table, idx, level_coeffs, chunk)
        out = sampled if out is None else out + sampled
    return out


def ms_deform_attn_xla(
    value: jax.Array,
    spatial_shapes: tuple[tuple[int, int], ...],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
) -> jax.Array:
    """Multi-scale deformable attention core, pure jnp, tuned for XLA.

    Args:
      value: `(bs, len_v, nheads, head_dim)`, levels flattened row-major and concatenated.
      spatial_shapes: static `((h, w), ...)`, one per level; `sum(h * w) == len_v`.
      sampling_locations: `(bs, len_q, nheads, nlevels, npoints, 2)` as (x, y), nominally in
        [0, 1].
      attention_weights: `(bs, len_q, nheads, nlevels, npoints)`.

    Returns:
      `(bs, len_q, nheads * head_dim)` in `value.dtype`.
    """
    bs, _, nheads, head_dim = value.shape
    len_q = sampling_locations.shape[1]
    spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)

    def variant(on_cpu: bool):
        return lambda *args: _sample(args[0], spatial_shapes, *args[1:], on_cpu)

    # Both variants are traced; the one for the platform being lowered for is compiled.
    out = jax.lax.platform_dependent(
        value,
        sampling_locations,
        attention_weights,
        cpu=variant(True),
        default=variant(False),
    )
    # (bs * len_q * nheads, head_dim) -> (bs, len_q, nheads * head_dim): a reshape, no copy
    return out.reshape(bs, len_q, nheads * head_dim).astype(value.dtype)
