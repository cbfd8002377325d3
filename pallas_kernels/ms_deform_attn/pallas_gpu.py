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
next point's location loads together (see the comment above `_corners` in
`pallas_gpu_kernels.py`); corners off the level get weight zero, so a non-finite value in
the clamped border pixel they read makes the output NaN where `grid_sample` would add
nothing; the backward's atomics are relaxed (`triton_atomics.py`: no memory fence per add).

Interpret mode (`interpret=True`, CPU tests) runs the same kernel bodies through Pallas'
HLO interpreter. Two primitives differ there: Pallas' interpret rule for
`plgpu.atomic_add` rejects masks and keeps only one of several updates that hit the same
index within a call (jax 0.10), so interpret mode scatters with `jax.ref.addupdate`
(whose interpret rule is `x.at[idx].add`, exact with duplicates) and masked-off lanes add
zero to element 0; and masked-off lanes of a store point past the end (dropped) instead of
at a neighbour's element.

This module holds the public entry, `BlockSizes` and the tile table, the int32 limit
(`check_fits`), the custom VJP and the `pallas_call`s; the kernel bodies and their per-point
math are in `pallas_gpu_kernels.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ms_deform_attn import errors
from pallas_kernels.ms_deform_attn.pallas_gpu_kernels import backward_kernel, forward_kernel

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
        forward_kernel,
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
        backward_kernel,
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
