"""Pure-jnp reference of the multi-scale deformable attention sampling core.

Follows the PyTorch fallback of the original implementation (fundamentalvision
`ms_deform_attn_core_pytorch`, transformers' `MultiScaleDeformableAttention`): bilinear
sampling as `grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`,
i.e. pixel coordinate = location * size - 0.5, and corners outside a level contribute zero.

This is the correctness oracle for the Pallas kernels and the CPU/TPU fallback. It is
written as four gathers per level (one per bilinear corner) whose products are reduced over
points immediately, so the largest intermediate is `[bs, nheads, len_q, npoints, head_dim]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# (bs, nheads, len, head_dim), (bs, nheads, n) -> (bs, nheads, n, head_dim)
_gather_rows = jax.vmap(jax.vmap(lambda rows, idx: rows[idx]))


# Rematerialised in the backward pass: saving the gathered corners of every level as VJP
# residuals costs 4 * nlevels * bs * nheads * len_q * npoints * head_dim floats (about 12 GB
# for the encoder at batch 8), recomputing them costs four gathers.
@functools.partial(jax.checkpoint, static_argnums=(1, 2))
def _sample_level(
    value_l: jax.Array,
    height: int,
    width: int,
    loc: jax.Array,
    attn: jax.Array,
) -> jax.Array:
    """Bilinearly samples one level and reduces over points.

    Args:
      value_l: `(bs, nheads, height * width, head_dim)`.
      loc: `(bs, nheads, len_q, npoints, 2)` as (x, y) in [0, 1] (may lie outside).
      attn: `(bs, nheads, len_q, npoints)`.

    Returns:
      `(bs, nheads, len_q, head_dim)` in float32 (or float64 for float64 inputs).
    """
    bs, nheads, len_q, npoints, _ = loc.shape
    acc_dtype = jnp.promote_types(value_l.dtype, jnp.float32)
    # Gather from the accumulation dtype, so that the VJP's scatter-add into the value
    # gradient also accumulates in float32 for bfloat16 inputs (XLA fuses the convert).
    value_l = value_l.astype(acc_dtype)
    loc = loc.astype(acc_dtype)
    attn = attn.astype(acc_dtype)
    x = loc[..., 0] * width - 0.5
    y = loc[..., 1] * height - 0.5
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0
    fy = y - y0
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)
    out = jnp.zeros((bs, nheads, len_q, value_l.shape[-1]), acc_dtype)
    for dy, dx, w in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        xi = x0 + dx
        yi = y0 + dy
        valid = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        # (bs, nheads, len_q * npoints)
        idx = (jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)).reshape(
            bs, nheads, len_q * npoints
        )
        # (bs, nheads, len_q * npoints, head_dim): whole head_dim rows per index, batched
        # over (bs, nheads); take_along_axis would build an index per output element.
        corner = _gather_rows(value_l, idx)
        # (bs, nheads, len_q, npoints, head_dim)
        corner = corner.reshape(bs, nheads, len_q, npoints, -1)
        coeff = jnp.where(valid, w * attn, 0.0)
        out = out + jnp.einsum("bhqp,bhqpd->bhqd", coeff, corner)
    return out


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
    out = None
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        value_l = value_t[:, :, start : start + height * width]
        start += height * width
        sampled = _sample_level(value_l, height, width, loc_t[:, :, level], attn_t[:, :, level])
        out = sampled if out is None else out + sampled
    # (bs, nheads, len_q, head_dim) -> (bs, len_q, nheads * head_dim)
    out = jnp.transpose(out, (0, 2, 1, 3)).reshape(bs, len_q, nheads * head_dim)
    return out.astype(value.dtype)
