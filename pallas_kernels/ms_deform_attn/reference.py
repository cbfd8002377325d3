"""The multi-scale deformable attention sampling core, written plainly: the correctness oracle.

Zhu et al. (arXiv 2010.04159), eq. 3, as the PyTorch fallback of the original implementation
computes it (fundamentalvision `ms_deform_attn_core_pytorch`, transformers'
`MultiScaleDeformableAttention`): every sampling point is sampled bilinearly from its level as
`torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`
does, weighted by its attention weight, and the samples are summed over levels and points.
For a point at `(loc_x, loc_y)` in a level of `height x width` pixels:

    x = loc_x * width - 0.5,  y = loc_y * height - 0.5        (pixel coordinates)
    x0 = floor(x),  y0 = floor(y),  fx = x - x0,  fy = y - y0
    sample = (1 - fy)(1 - fx) v[y0, x0] + (1 - fy) fx v[y0, x0 + 1]
             + fy (1 - fx) v[y0 + 1, x0] + fy fx v[y0 + 1, x0 + 1]

where a corner outside the level contributes zero. Exactly on a pixel centre (`x` an integer)
`floor` picks the corners `x` and `x + 1` with weights 1 and 0, so the location gradient there
is the derivative from the right.

Written for reading, not speed: one gather per corner per level, autodiff's backward, nothing
chosen per backend. It computes in float32, or float64 when an input is float64 (with
`jax.enable_x64`). The implementations of the dispatch table (`xla.py`, the Pallas kernels)
are tested against it and against the float64 NumPy oracle of the tests
(`tests/msda_oracle.py`), values and gradients.

Evaluate it op by op (outside `jit`, or under `jax.disable_jit()`), as the tests do, where
points may lie within a rounding of a pixel centre: under `jit` a compiler may contract
`loc * size - 0.5` (and the caller's arithmetic that made `loc`) into fused multiply-adds in
one fusion and not in another, and the corner read and its weight then come from different
sides of the centre (jaxlib 0.12.1's XLA:CPU, with the locations computed in the same program
as the model computes them: value gradients off by whole pixels). `xla.py` guards against
that (`_shared_corner`); this file does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# (dy, dx) of the four corners, from the top-left one
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


def ms_deform_attn_reference(
    value: jax.Array,
    spatial_shapes: tuple[tuple[int, int], ...],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
) -> jax.Array:
    """Multi-scale deformable attention core, the plain formula.

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
    _, len_q, _, _, _, _ = sampling_locations.shape
    dtype = jnp.result_type(value, sampling_locations, attention_weights, jnp.float32)
    # index arrays that broadcast against (bs, len_q, nheads, npoints)
    batch = jnp.arange(bs)[:, None, None, None]
    head = jnp.arange(nheads)[None, None, :, None]
    # (bs, len_q, nheads, head_dim)
    out = jnp.zeros((bs, len_q, nheads, head_dim), dtype)
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        height, width = int(height), int(width)
        # (bs, height, width, nheads, head_dim)
        value_l = value[:, start : start + height * width].astype(dtype)
        value_l = value_l.reshape(bs, height, width, nheads, head_dim)
        start += height * width
        # (bs, len_q, nheads, npoints)
        x = sampling_locations[:, :, :, level, :, 0].astype(dtype) * width - 0.5
        y = sampling_locations[:, :, :, level, :, 1].astype(dtype) * height - 0.5
        attn = attention_weights[:, :, :, level].astype(dtype)
        x0 = jnp.floor(x)
        y0 = jnp.floor(y)
        fx = x - x0
        fy = y - y0
        for dy, dx in _CORNERS:
            # (bs, len_q, nheads, npoints)
            xi = x0 + dx
            yi = y0 + dy
            weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy) * attn
            inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
            # clipped into the level (in float, so that far points cannot overflow int32);
            # the corners that were outside get weight zero
            xi = jnp.clip(xi, 0, width - 1).astype(jnp.int32)
            yi = jnp.clip(yi, 0, height - 1).astype(jnp.int32)
            # (bs, len_q, nheads, npoints, head_dim)
            corner = value_l[batch, yi, xi, head]
            weight = jnp.where(inside, weight, 0)
            # (bs, len_q, nheads, head_dim)
            out = out + jnp.sum(weight[..., None] * corner, axis=3)
    return out.reshape(bs, len_q, nheads * head_dim).astype(value.dtype)
