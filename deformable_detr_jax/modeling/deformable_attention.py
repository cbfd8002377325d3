"""Multi-scale deformable attention (Zhu et al., arXiv 2010.04159, section 4.1, eq. 3).

Mirrors transformers' `DeformableDetrMultiscaleDeformableAttention`: the query predicts
`nheads * nlevels * npoints` sampling offsets and attention weights (softmax over
levels x points); value is a projection of the flattened multi-level feature map with
padded positions zeroed. The sampling itself is `pallas_kernels.ms_deform_attn`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deformable_detr_jax.config import DeformableDetrConfig
from pallas_kernels import ms_deform_attn


def _grid_init_bias(nheads: int, nlevels: int, npoints: int) -> np.ndarray:
    """Initial sampling offsets: head h looks along angle 2*pi*h/nheads, point p at p+1."""
    thetas = np.arange(nheads, dtype=np.float32) * (2.0 * math.pi / nheads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    # (nheads, nlevels, npoints, 2)
    grid = np.tile(grid[:, None, None, :], (1, nlevels, npoints, 1))
    grid *= np.arange(1, npoints + 1, dtype=np.float32)[None, None, :, None]
    return grid.reshape(-1)


class DeformableDetrMultiscaleDeformableAttention(nnx.Module):
    def __init__(self, config: DeformableDetrConfig, num_heads: int, n_points: int, *, rngs):
        d_model = config.d_model
        self.n_heads = num_heads
        self.n_levels = config.num_feature_levels
        self.n_points = n_points
        self.implementation = config.msda_implementation
        n_offsets = num_heads * self.n_levels * n_points
        grid_bias = _grid_init_bias(num_heads, self.n_levels, n_points)
        zeros = nnx.initializers.zeros
        xavier = nnx.initializers.xavier_uniform()
        self.sampling_offsets = nnx.Linear(
            d_model,
            n_offsets * 2,
            kernel_init=zeros,
            bias_init=lambda *_: jnp.asarray(grid_bias),
            rngs=rngs,
        )
        self.attention_weights = nnx.Linear(
            d_model, n_offsets, kernel_init=zeros, bias_init=zeros, rngs=rngs
        )
        self.value_proj = nnx.Linear(d_model, d_model, kernel_init=xavier, rngs=rngs)
        self.output_proj = nnx.Linear(d_model, d_model, kernel_init=xavier, rngs=rngs)

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        attention_mask: jax.Array,
        position_embeddings: jax.Array | None,
        reference_points: jax.Array,
        spatial_shapes: tuple[tuple[int, int], ...],
    ) -> jax.Array:
        """Attends from queries to sampled points of the multi-level value map.

        Args:
          hidden_states: queries `(bs, len_q, d_model)`.
          encoder_hidden_states: flattened levels `(bs, len_v, d_model)`.
          attention_mask: `(bs, len_v)` bool, True on real (non-padded) positions.
          position_embeddings: `(bs, len_q, d_model)` added to the queries, or None.
          reference_points: `(bs, len_q, nlevels, 2)` points or `(..., 4)` boxes, in [0, 1].
          spatial_shapes: static `((h, w), ...)` of the levels.

        Returns:
          `(bs, len_q, d_model)`.
        """
        if position_embeddings is not None:
            hidden_states = hidden_states + position_embeddings
        bs, len_q, _ = hidden_states.shape
        _, len_v, d_model = encoder_hidden_states.shape
        nheads, nlevels, npoints = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(encoder_hidden_states)
        value = jnp.where(attention_mask[..., None], value, 0)
        # (bs, len_v, nheads, head_dim)
        value = value.reshape(bs, len_v, nheads, d_model // nheads)
        # (bs, len_q, nheads, nlevels, npoints, 2)
        offsets = self.sampling_offsets(hidden_states).reshape(
            bs, len_q, nheads, nlevels, npoints, 2
        )
        # (bs, len_q, nheads, nlevels * npoints) -> (bs, len_q, nheads, nlevels, npoints)
        weights = self.attention_weights(hidden_states).reshape(bs, len_q, nheads, -1)
        weights = jax.nn.softmax(weights, axis=-1).reshape(bs, len_q, nheads, nlevels, npoints)

        if reference_points.shape[-1] == 2:
            # (nlevels, 2) as (w, h)
            normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], offsets.dtype)
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        else:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / npoints * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        with jax.named_scope("sampling_core"):
            output = ms_deform_attn(
                value, spatial_shapes, locations, weights, implementation=self.implementation
            )
        return self.output_proj(output)
