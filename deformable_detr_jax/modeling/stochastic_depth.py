"""Drop path (stochastic depth, Huang et al., 1603.09382) for ConvNeXt and Swin blocks.

A residual branch is kept per sample with probability 1 - rate and then scaled by 1 / (1 - rate),
only in training (`deterministic=False`), as transformers' `ConvNextDropPath` / `SwinDropPath`:
an `nnx.Dropout` whose mask is one draw per sample (broadcast over the other axes). The rates grow
linearly from 0 to the backbone's `drop_path_rate` over all its blocks.
"""

from __future__ import annotations

import numpy as np
from flax import nnx


def drop_path_rates(rate: float, depths: tuple[int, ...]) -> list[list[float]]:
    """Per stage, per block stochastic-depth rates: 0 .. `rate` linearly over all blocks."""
    rates = np.linspace(0.0, rate, sum(depths)).tolist()
    starts = np.cumsum((0,) + tuple(depths))
    return [rates[a:b] for a, b in zip(starts[:-1], starts[1:])]


def drop_path(rate: float, ndim: int, rngs: nnx.Rngs) -> nnx.Dropout | None:
    """The drop path of a branch of `ndim` axes (batch first), or None when `rate` is 0 (as
    transformers' `nn.Identity`)."""
    if rate <= 0.0:
        return None
    return nnx.Dropout(rate, broadcast_dims=tuple(range(1, ndim)), rngs=rngs)
