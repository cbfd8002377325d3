"""The bilinear corner of a sampling point, decided without a contractible multiply-add.

Shared by the Pallas TPU kernels (`pallas_tpu_kernels.py`, on a location loaded from memory); the
"xla" core (`xla.py`) computes the same corner through `xla._shared_corner`, which also makes
every fusion of a jitted program read one value of it.
"""

from __future__ import annotations

import jax.numpy as jnp


def pixel_corner(loc, size, acc_dtype):
    """`floor(x)` and `x - floor(x)` of the pixel coordinate `x = loc * size - 0.5`.

    The corner is decided from `t = loc * size` by a comparison, never from an expression
    in which the multiplication feeds an addition (a compiler may contract `loc * size - 0.5`
    into a fused multiply-add in one place and not in another: jaxlib 0.10.2's CPU fusion
    emitter did, and its float64 value gradient went to the wrong pixel). Exactly on a
    centre (`t = k + 0.5`) the corner is `k` and the fraction 0, as `floor` gives.

    Args:
      loc: locations, any shape; size: the level's width (x) or height (y), broadcastable.
      acc_dtype: the dtype `t` and the fraction are computed in.

    Returns:
      the corner (int32) and the fraction in `[0, 1)` (`acc_dtype`), shaped like `loc`.
    """
    t = loc.astype(acc_dtype) * size
    t_floor = jnp.floor(t)
    # (t_floor + 0.5 is exact: an integer plus a half)
    corner = jnp.where(t >= t_floor + 0.5, t_floor, t_floor - 1)
    return corner.astype(jnp.int32), t - (corner + 0.5)
