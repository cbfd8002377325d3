"""Float64 NumPy oracle for multi-scale deformable attention, written from scratch.

Independent of `pallas_kernels` on purpose: instead of four corner gathers it writes
bilinear sampling with zero padding (`grid_sample(align_corners=False,
padding_mode="zeros")`) as a separable tent filter over every pixel of a level,

    sampled(x, y) = sum over rows i and columns j of tent(y - i) * tent(x - j) * value[i, j],
    tent(t) = max(0, 1 - |t|),  x = loc_x * width - 0.5,  y = loc_y * height - 0.5,

which equals the four-corner formula exactly (a pixel outside the level simply has no
term). The gradients are written out by hand. Where the tent has a kink (a sampling point
exactly on a pixel centre) the derivative is taken from the right, which is the derivative
the floor-based kernels produce (`floor(x)` picks the corner pair [x, x + 1]).

Dense over pixels, so only for the small shapes of the tests.
"""

from __future__ import annotations

import numpy as np


def _tent(t: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(t))


def _tent_right_derivative(t: np.ndarray) -> np.ndarray:
    # d/dt max(0, 1 - |t|), one-sided from the right at the kinks t = -1, 0, 1.
    return np.where((t >= -1) & (t < 0), 1.0, 0.0) - np.where((t >= 0) & (t < 1), 1.0, 0.0)


def _level_filters(loc_l: np.ndarray, height: int, width: int):
    """Tent filters and their derivatives along x and y for one level.

    Args:
      loc_l: `(bs, len_q, nheads, npoints, 2)` float64.

    Returns:
      `tx, dtx` of shape `(bs, len_q, nheads, npoints, width)` and `ty, dty` of shape
      `(bs, len_q, nheads, npoints, height)`, derivatives w.r.t. the pixel coordinate.
    """
    x = loc_l[..., 0] * width - 0.5
    y = loc_l[..., 1] * height - 0.5
    tx_arg = x[..., None] - np.arange(width, dtype=np.float64)
    ty_arg = y[..., None] - np.arange(height, dtype=np.float64)
    return (
        _tent(tx_arg),
        _tent_right_derivative(tx_arg),
        _tent(ty_arg),
        _tent_right_derivative(ty_arg),
    )


def _levels(value: np.ndarray, spatial_shapes):
    """Yields `(level, height, width, value_l)` with value_l `(bs, height, width, nheads, head_dim)`."""
    bs, _, nheads, head_dim = value.shape
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        value_l = value[:, start : start + height * width].reshape(
            bs, height, width, nheads, head_dim
        )
        start += height * width
        yield level, height, width, value_l


def forward(value, spatial_shapes, sampling_locations, attention_weights) -> np.ndarray:
    """`(bs, len_q, nheads * head_dim)` float64, from inputs of any float dtype."""
    value = np.asarray(value, np.float64)
    loc = np.asarray(sampling_locations, np.float64)
    attn = np.asarray(attention_weights, np.float64)
    bs, len_q, nheads, _, _, _ = loc.shape
    head_dim = value.shape[-1]
    out = np.zeros((bs, len_q, nheads, head_dim))
    for level, height, width, value_l in _levels(value, spatial_shapes):
        tx, _, ty, _ = _level_filters(loc[:, :, :, level], height, width)
        out += np.einsum(
            "bqhp,bqhpi,bqhpj,bijhd->bqhd", attn[:, :, :, level], ty, tx, value_l, optimize=True
        )
    return out.reshape(bs, len_q, nheads * head_dim)


def vjp(value, spatial_shapes, sampling_locations, attention_weights, grad_out):
    """Gradients of `sum(forward(...) * grad_out)` w.r.t. value, locations and weights.

    Returns:
      `(grad_value, grad_locations, grad_weights)` float64, shaped like the inputs.
    """
    value = np.asarray(value, np.float64)
    loc = np.asarray(sampling_locations, np.float64)
    attn = np.asarray(attention_weights, np.float64)
    bs, len_q, nheads, _, _, _ = loc.shape
    head_dim = value.shape[-1]
    # (bs, len_q, nheads * head_dim) -> (bs, len_q, nheads, head_dim)
    g = np.asarray(grad_out, np.float64).reshape(bs, len_q, nheads, head_dim)
    grad_value_levels = []
    grad_loc = np.zeros_like(loc)
    grad_attn = np.zeros_like(attn)
    for level, height, width, value_l in _levels(value, spatial_shapes):
        a = attn[:, :, :, level]
        tx, dtx, ty, dty = _level_filters(loc[:, :, :, level], height, width)
        # g . value at every pixel: (bs, len_q, nheads, height, width)
        g_dot_v = np.einsum("bqhd,bijhd->bqhij", g, value_l, optimize=True)
        grad_attn[:, :, :, level] = np.einsum(
            "bqhpi,bqhpj,bqhij->bqhp", ty, tx, g_dot_v, optimize=True
        )
        d_x = np.einsum("bqhpi,bqhpj,bqhij->bqhp", ty, dtx, g_dot_v, optimize=True)
        d_y = np.einsum("bqhpi,bqhpj,bqhij->bqhp", dty, tx, g_dot_v, optimize=True)
        grad_loc[:, :, :, level, :, 0] = a * d_x * width
        grad_loc[:, :, :, level, :, 1] = a * d_y * height
        grad_value_l = np.einsum("bqhp,bqhpi,bqhpj,bqhd->bijhd", a, ty, tx, g, optimize=True)
        grad_value_levels.append(grad_value_l.reshape(bs, height * width, nheads, head_dim))
    return np.concatenate(grad_value_levels, axis=1), grad_loc, grad_attn
