"""Position embeddings of the feature maps: normalised sine (scale 2*pi) and learned.

Follows transformers' `DeformableDetrSinePositionEmbedding` (normalize=True, offset -0.5,
temperature 10000) and `DeformableDetrLearnedPositionEmbedding` (50 rows/columns).
Outputs are channel-last: `(bs, height, width, 2 * num_position_features)`, y then x.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def sine_position_embedding(
    mask: jax.Array, num_position_features: int, dtype, temperature: float = 10000.0
) -> jax.Array:
    """`mask (bs, h, w)` bool (True = real pixel) -> `(bs, h, w, 2 * num_position_features)`."""
    embed_mask = mask.astype(dtype)
    y_embed = jnp.cumsum(embed_mask, axis=1)
    x_embed = jnp.cumsum(embed_mask, axis=2)
    eps = 1e-6
    scale = 2 * math.pi
    y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * scale
    x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * scale
    dim_t = jnp.arange(num_position_features, dtype=dtype)
    dim_t = temperature ** (2 * jnp.floor(dim_t / 2) / num_position_features)
    # (bs, h, w, num_position_features)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    # interleave sin of even and cos of odd features: (bs, h, w, F/2, 2) -> (bs, h, w, F)
    pos_x = jnp.stack((jnp.sin(pos_x[..., 0::2]), jnp.cos(pos_x[..., 1::2])), axis=4)
    pos_y = jnp.stack((jnp.sin(pos_y[..., 0::2]), jnp.cos(pos_y[..., 1::2])), axis=4)
    pos_x = pos_x.reshape(*pos_x.shape[:3], -1)
    pos_y = pos_y.reshape(*pos_y.shape[:3], -1)
    return jnp.concatenate((pos_y, pos_x), axis=3)


class DeformableDetrLearnedPositionEmbedding(nnx.Module):
    """Absolute row/column embeddings, for feature maps of at most 50x50."""

    max_size = 50

    def __init__(self, embedding_dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.uniform(1.0)
        self.row_embeddings = nnx.Embed(
            self.max_size, embedding_dim, embedding_init=init, rngs=rngs
        )
        self.column_embeddings = nnx.Embed(
            self.max_size, embedding_dim, embedding_init=init, rngs=rngs
        )

    def __call__(self, mask: jax.Array, dtype) -> jax.Array:
        bs, height, width = mask.shape
        if height > self.max_size or width > self.max_size:
            raise ValueError(
                f"learned position embeddings cover at most {self.max_size}x{self.max_size} "
                f"feature maps, got {height}x{width}; use smaller images or "
                "position_embedding_type='sine'"
            )
        x_emb = self.column_embeddings.embedding[:width]
        y_emb = self.row_embeddings.embedding[:height]
        # (h, w, 2 * embedding_dim): x features first, then y
        pos = jnp.concatenate(
            [
                jnp.broadcast_to(x_emb[None], (height, width, x_emb.shape[-1])),
                jnp.broadcast_to(y_emb[:, None], (height, width, y_emb.shape[-1])),
            ],
            axis=-1,
        )
        return jnp.broadcast_to(pos[None], (bs, *pos.shape)).astype(dtype)
