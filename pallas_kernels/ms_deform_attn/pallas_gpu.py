"""Multi-scale deformable attention as Pallas kernels with the Triton (GPU) lowering.

Follows the CUDA kernels of the original implementation (fundamentalvision
`ms_deform_attn_cuda.cu`, Zhu et al., arXiv 2010.04159): one program owns `block_q`
queries of one (batch, head); for every level and point it computes the four bilinear
corners (`grid_sample(align_corners=False, padding_mode="zeros")`: pixel coordinate =
location * size - 0.5) and gathers `head_dim`-long rows of `value` with computed indices.
The backward kernel recomputes the corners, writes the location and attention-weight
gradients of its own queries, and scatters the value gradient with atomic adds (many
queries sample the same pixel).

The grid is (nheads, query blocks, bs) with the head fastest, so the programs that run
together read neighbouring head slices of the same value rows and location rows.

Nothing is padded or transposed outside the kernels: every operand is passed flat (a free
reshape of its natural layout) and the kernels compute element offsets themselves, with
masks for the tails. Triton needs power-of-two tensor shapes, so a tile is `(block_q,
next_pow2(head_dim))`; queries past `len_q` and columns past `head_dim` are masked off.
Offsets are int32: `bs * len_v * nheads * head_dim` and friends must stay below 2**31.

Interpret mode (`interpret=True`, CPU tests) runs the same kernel bodies through Pallas'
HLO interpreter. One primitive differs there: Pallas' interpret rule for
`plgpu.atomic_add` rejects masks and keeps only one of several updates that hit the same
index within a call (jax 0.10), so interpret mode scatters with `jax.ref.addupdate`
(whose interpret rule is `x.at[idx].add`, exact with duplicates; its Triton lowering is
the same atomic add) and masked-off lanes add zero to element 0.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Offsets inside the kernels are int32.
MAX_ELEMENTS = 2**31 - 1


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters. `block_q*` must be powers of two.

    Attributes:
      block_q: queries per program in the forward kernel.
      block_q_bwd: queries per program in the backward kernel (more live registers).
      num_warps, num_warps_bwd: warps per program.
      num_stages: software-pipelining stages of the point loop.
    """

    block_q: int = 64
    block_q_bwd: int = 32
    num_warps: int = 4
    num_warps_bwd: int = 4
    num_stages: int = 1

    def __post_init__(self):
        for name in ("block_q", "block_q_bwd"):
            size = getattr(self, name)
            if size < 1 or size & (size - 1):
                raise ValueError(f"BlockSizes.{name}={size} must be a power of two")


def _compiler_params(num_warps: int, num_stages: int):
    # jax >= 0.6 names it CompilerParams; older releases TritonCompilerParams.
    params_cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return params_cls(num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------------------
# Per-point math shared by both kernels (traced inside the kernel bodies).
# --------------------------------------------------------------------------------------


def _corners(loc_x, loc_y, height: int, width: int, q_ok):
    """The four bilinear corners of one sampling point for a block of queries.

    Args:
      loc_x, loc_y: `(block_q,)` locations in [0, 1] (may lie outside), accumulation dtype.
      q_ok: `(block_q,)` True for queries inside `len_q`.

    Returns:
      `(fx, fy, corners)`; `fx, fy` are `(block_q,)` fractional parts and `corners` is a
      list of four `(ok, pixel, weight)` triples in the order (y0,x0), (y0,x1), (y1,x0),
      (y1,x1): `ok` masks corners inside the level, `pixel` is the in-level row-major
      index (clamped, so always addressable), `weight` the bilinear weight.
    """
    # Clamp far-away points before the int cast; [-2, size + 1] keeps every corner of
    # such a point outside the level, so nothing changes but the cast stays defined.
    x = jnp.clip(loc_x * width - 0.5, -2.0, width + 1.0)
    y = jnp.clip(loc_y * height - 0.5, -2.0, height + 1.0)
    x0f = jnp.floor(x)
    y0f = jnp.floor(y)
    fx = x - x0f
    fy = y - y0f
    x0 = x0f.astype(jnp.int32)
    y0 = y0f.astype(jnp.int32)
    corners = []
    for dy, dx, weight in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        xi = x0 + dx
        yi = y0 + dy
        ok = q_ok & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        pixel = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
        corners.append((ok, pixel, weight))
    return fx, fy, corners


def _load(ref, offsets, mask):
    """Gather `ref[offsets]` where `mask`, zero elsewhere (masked lanes read element 0)."""
    return plgpu.load(ref.at[jnp.where(mask, offsets, 0)], mask=mask, other=0)


def _store(ref, offsets, values, mask):
    """Scatter `ref[offsets] = values` where `mask`; masked lanes point past the end so
    that interpret mode drops them instead of rewriting a neighbour's element."""
    plgpu.store(ref.at[jnp.where(mask, offsets, ref.shape[0])], values, mask=mask)


def _scatter_add(ref, offsets, values, mask, interpret: bool):
    """`ref[offsets] += values` where `mask`, atomically (see the module docstring)."""
    if interpret:
        jax.ref.addupdate(ref, jnp.where(mask, offsets, 0), jnp.where(mask, values, 0))
    else:
        plgpu.atomic_add(ref, offsets, values, mask=mask)


def _point_loads(loc_ref, attn_ref, row, k, nlevels_points, q_ok, acc_dtype):
    """Location (x, y) and attention weight of point `k` (level-major) for a query block."""
    attn_offset = row * nlevels_points + k
    a = _load(attn_ref, attn_offset, q_ok).astype(acc_dtype)
    loc_x = _load(loc_ref, attn_offset * 2, q_ok).astype(acc_dtype)
    loc_y = _load(loc_ref, attn_offset * 2 + 1, q_ok).astype(acc_dtype)
    return loc_x, loc_y, a


# --------------------------------------------------------------------------------------
# Kernels. Every ref is flat; `row = (b * len_q + q) * nheads + h` indexes one
# (batch, query, head) of sampling_locations / attention_weights / output.
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
):
    h, q_block, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q = q_block * block_q + jnp.arange(block_q, dtype=jnp.int32)
    d = jnp.arange(block_d, dtype=jnp.int32)
    q_ok = q < len_q
    d_ok = d < head_dim
    row = (b * len_q + q) * nheads + h
    nlevels_points = len(spatial_shapes) * npoints

    acc = jnp.zeros((block_q, block_d), acc_dtype)
    level_start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        # First element of (batch b, pixel level_start, head h) in the flat value.
        value_base = (b * len_v + level_start) * nheads + h

        def point(p, acc, level=level, height=height, width=width, value_base=value_base):
            loc_x, loc_y, a = _point_loads(
                loc_ref, attn_ref, row, level * npoints + p, nlevels_points, q_ok, acc_dtype
            )
            _, _, corners = _corners(loc_x, loc_y, height, width, q_ok)
            for ok, pixel, weight in corners:
                mask = ok[:, None] & d_ok[None, :]
                offsets = ((value_base + pixel * nheads) * head_dim)[:, None] + d[None, :]
                v = _load(value_ref, offsets, mask).astype(acc_dtype)
                acc = acc + (weight * a)[:, None] * v
            return acc

        acc = jax.lax.fori_loop(0, npoints, point, acc)
        level_start += height * width

    mask = q_ok[:, None] & d_ok[None, :]
    _store(out_ref, (row * head_dim)[:, None] + d[None, :], acc.astype(out_ref.dtype), mask)


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
    h, q_block, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q = q_block * block_q + jnp.arange(block_q, dtype=jnp.int32)
    d = jnp.arange(block_d, dtype=jnp.int32)
    q_ok = q < len_q
    d_ok = d < head_dim
    row = (b * len_q + q) * nheads + h
    nlevels_points = len(spatial_shapes) * npoints

    out_mask = q_ok[:, None] & d_ok[None, :]
    # (block_q, block_d)
    g = _load(grad_out_ref, (row * head_dim)[:, None] + d[None, :], out_mask).astype(acc_dtype)

    level_start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        value_base = (b * len_v + level_start) * nheads + h

        def point(p, carry, level=level, height=height, width=width, value_base=value_base):
            k = level * npoints + p
            loc_x, loc_y, a = _point_loads(
                loc_ref, attn_ref, row, k, nlevels_points, q_ok, acc_dtype
            )
            fx, fy, corners = _corners(loc_x, loc_y, height, width, q_ok)
            # g . value at each corner, (block_q,) each; zero for corners off the level.
            g_dot = []
            for ok, pixel, weight in corners:
                mask = ok[:, None] & d_ok[None, :]
                offsets = ((value_base + pixel * nheads) * head_dim)[:, None] + d[None, :]
                v = _load(value_ref, offsets, mask).astype(acc_dtype)
                g_dot.append(jnp.sum(g * v, axis=1))
                grad_v = (weight * a)[:, None] * g
                _scatter_add(grad_value_ref, offsets, grad_v, mask, interpret)
            g00, g01, g10, g11 = g_dot
            grad_a = sum(weight * gd for (_, _, weight), gd in zip(corners, g_dot))
            # d(sampled)/d(fx), d(sampled)/d(fy), projected on g.
            d_fx = (1 - fy) * (g01 - g00) + fy * (g11 - g10)
            d_fy = (1 - fx) * (g10 - g00) + fx * (g11 - g01)
            attn_offset = row * nlevels_points + k
            _store(grad_attn_ref, attn_offset, grad_a.astype(grad_attn_ref.dtype), q_ok)
            _store(
                grad_loc_ref, attn_offset * 2, (a * width * d_fx).astype(grad_loc_ref.dtype), q_ok
            )
            _store(
                grad_loc_ref,
                attn_offset * 2 + 1,
                (a * height * d_fy).astype(grad_loc_ref.dtype),
                q_ok,
            )
            return carry

        jax.lax.fori_loop(0, npoints, point, 0)
        level_start += height * width


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
    kernel = functools.partial(_fwd_kernel, block_q=block_q, **dims)
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
    kernel = functools.partial(_bwd_kernel, block_q=block_q, interpret=interpret, **dims)
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
    """Raises ValueError when an operand is too large for the kernels' int32 offsets."""
    for name, x in (("value", value), ("sampling_locations", sampling_locations)):
        if x.size > MAX_ELEMENTS:
            raise ValueError(
                f"pallas_gpu addresses {name} with int32 offsets; {name}.shape={x.shape} has "
                f"{x.size} > 2**31 - 1 elements: split the batch or use implementation='xla'"
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
        block_sizes or BlockSizes(),
        interpret,
    )


__all__ = ["BlockSizes", "ms_deform_attn_pallas_gpu"]
