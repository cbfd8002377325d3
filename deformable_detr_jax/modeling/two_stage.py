"""Two-stage Deformable DETR: encoder output proposals and their position embeddings.

Follows transformers' `DeformableDetrModel.gen_encoder_output_proposals` and
`get_proposal_pos_embed` (paper appendix A.4): every encoder position proposes a box centred
on its pixel with size 0.05 * 2**level; proposals too close to the border or on padding
get logit +inf and a zeroed query.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def encoder_output_proposals(
    enc_output: jax.Array, padding_mask: jax.Array, spatial_shapes
) -> tuple[jax.Array, jax.Array]:
    """Per-position box proposals.

    Args:
      enc_output: `(bs, len_v, d_model)`.
      padding_mask: `(bs, len_v)` bool, True on PADDED positions.
      spatial_shapes: static `((h, w), ...)`.

    Returns:
      object_query `(bs, len_v, d_model)` (masked, before enc_output/enc_output_norm) and
      output_proposals `(bs, len_v, 4)` as inverse-sigmoid cxcywh (+inf where invalid).
    """
    bs = enc_output.shape[0]
    dtype = enc_output.dtype
    proposals = []
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        # (bs, h, w)
        level_mask = padding_mask[:, start : start + height * width].reshape(bs, height, width)
        valid_height = jnp.sum(~level_mask[:, :, 0], 1).astype(dtype)
        valid_width = jnp.sum(~level_mask[:, 0, :], 1).astype(dtype)
        grid_y, grid_x = jnp.meshgrid(
            jnp.arange(height, dtype=dtype), jnp.arange(width, dtype=dtype), indexing="ij"
        )
        # (h, w, 2) as (x, y)
        grid = jnp.stack([grid_x, grid_y], -1)
        # (bs, 1, 1, 2)
        scale = jnp.stack([valid_width, valid_height], -1).reshape(bs, 1, 1, 2)
        grid = (grid[None] + 0.5) / scale
        width_height = jnp.full_like(grid, 0.05 * (2.0**level))
        # (bs, h * w, 4)
        proposals.append(jnp.concatenate((grid, width_height), -1).reshape(bs, -1, 4))
        start += height * width
    output_proposals = jnp.concatenate(proposals, 1)
    valid = jnp.all((output_proposals > 0.01) & (output_proposals < 0.99), -1, keepdims=True)
    output_proposals = jnp.log(output_proposals / (1 - output_proposals))
    keep = valid & ~padding_mask[..., None]
    output_proposals = jnp.where(keep, output_proposals, jnp.inf)
    object_query = jnp.where(keep, enc_output, 0)
    return object_query, output_proposals


def proposal_pos_embed(proposals: jax.Array, d_model: int) -> jax.Array:
    """Sine embedding of the sigmoid of box logits: `(bs, n, 4)` -> `(bs, n, 2 * d_model)`.

    Computed in at least float32 (transformers forces float32 to avoid fp16 overflow).
    """
    num_pos_feats = d_model // 2
    compute = jnp.promote_types(proposals.dtype, jnp.float32)
    dim_t = jnp.arange(num_pos_feats, dtype=compute)
    dim_t = 10000 ** (2 * jnp.floor(dim_t / 2) / num_pos_feats)
    # (bs, n, 4, num_pos_feats)
    pos = (jax.nn.sigmoid(proposals).astype(compute) * (2 * math.pi))[..., None] / dim_t
    # (bs, n, 4, num_pos_feats / 2, 2) -> (bs, n, 4 * num_pos_feats)
    pos = jnp.stack((jnp.sin(pos[..., 0::2]), jnp.cos(pos[..., 1::2])), axis=4)
    return pos.reshape(*pos.shape[:2], -1).astype(proposals.dtype)
