"""The deformable transformer: encoder and decoder layers and stacks.

Mirrors transformers' `DeformableDetrEncoder(Layer)` and `DeformableDetrDecoder(Layer)`
(post-norm layers; the decoder's self-attention is ordinary multi-head attention with the
query position added to queries and keys; cross-attention is multi-scale deformable).
Iterative box refinement (section 4.2 of the paper) happens in the decoder loop when the
box heads are passed in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.modeling.deformable_attention import (
    DeformableDetrMultiscaleDeformableAttention,
)

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with torch's epsilon and two-pass variance."""
    return nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)


def linear(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features, out_features, kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs
    )


def inverse_sigmoid(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    x = jnp.clip(x, 0, 1)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1 - x, eps))


class DeformableDetrMLP(nnx.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout."""

    def __init__(
        self,
        config: DeformableDetrConfig,
        hidden_size: int,
        intermediate_size: int,
        *,
        rngs: nnx.Rngs,
    ):
        self.fc1 = linear(hidden_size, intermediate_size, rngs)
        self.fc2 = linear(intermediate_size, hidden_size, rngs)
        self.activation_fn = ACTIVATIONS[config.activation_function]
        self.activation_dropout = nnx.Dropout(config.activation_dropout, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        x = self.activation_dropout(self.activation_fn(self.fc1(x)), deterministic=deterministic)
        return self.dropout(self.fc2(x), deterministic=deterministic)


class DeformableDetrSelfAttention(nnx.Module):
    """Multi-head attention; position embeddings go into queries and keys, not values."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = linear(hidden_size, hidden_size, rngs)
        self.k_proj = linear(hidden_size, hidden_size, rngs)
        self.v_proj = linear(hidden_size, hidden_size, rngs)
        self.o_proj = linear(hidden_size, hidden_size, rngs)
        self.attention_dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, hidden_states, position_embeddings, deterministic: bool) -> jax.Array:
        bs, len_q, d_model = hidden_states.shape
        qk_input = hidden_states + position_embeddings
        # (bs, len_q, nheads, head_dim)
        shape = (bs, len_q, self.num_heads, self.head_dim)
        query = self.q_proj(qk_input).reshape(shape)
        key = self.k_proj(qk_input).reshape(shape)
        value = self.v_proj(hidden_states).reshape(shape)
        # (bs, nheads, len_q, len_q)
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) * self.head_dim**-0.5
        probs = self.attention_dropout(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
        # (bs, len_q, nheads, head_dim) -> (bs, len_q, d_model)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, value).reshape(bs, len_q, d_model)
        return self.o_proj(out)


class DeformableDetrEncoderLayer(nnx.Module):
    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        self.self_attn = DeformableDetrMultiscaleDeformableAttention(
            config, config.encoder_attention_heads, config.encoder_n_points, rngs=rngs
        )
        self.self_attn_layer_norm = layer_norm(config.d_model, rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.mlp = DeformableDetrMLP(config, config.d_model, config.encoder_ffn_dim, rngs=rngs)
        self.final_layer_norm = layer_norm(config.d_model, rngs)

    def __call__(
        self,
        hidden_states,
        attention_mask,
        position_embeddings,
        reference_points,
        spatial_shapes,
        deterministic: bool,
    ) -> jax.Array:
        residual = hidden_states
        hidden_states = self.self_attn(
            hidden_states,
            hidden_states,
            attention_mask,
            position_embeddings,
            reference_points,
            spatial_shapes,
        )
        hidden_states = self.dropout(hidden_states, deterministic=deterministic)
        hidden_states = self.self_attn_layer_norm(residual + hidden_states)
        hidden_states = hidden_states + self.mlp(hidden_states, deterministic)
        return self.final_layer_norm(hidden_states)


class DeformableDetrDecoderLayer(nnx.Module):
    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        self.self_attn = DeformableDetrSelfAttention(
            config.d_model, config.decoder_attention_heads, config.attention_dropout, rngs=rngs
        )
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.self_attn_layer_norm = layer_norm(config.d_model, rngs)
        self.encoder_attn = DeformableDetrMultiscaleDeformableAttention(
            config, config.decoder_attention_heads, config.decoder_n_points, rngs=rngs
        )
        self.encoder_attn_layer_norm = layer_norm(config.d_model, rngs)
        self.mlp = DeformableDetrMLP(config, config.d_model, config.decoder_ffn_dim, rngs=rngs)
        self.final_layer_norm = layer_norm(config.d_model, rngs)

    def __call__(
        self,
        hidden_states,
        query_position_embeddings,
        reference_points,
        spatial_shapes,
        encoder_hidden_states,
        encoder_attention_mask,
        deterministic: bool,
    ) -> jax.Array:
        residual = hidden_states
        hidden_states = self.self_attn(hidden_states, query_position_embeddings, deterministic)
        hidden_states = self.dropout(hidden_states, deterministic=deterministic)
        hidden_states = self.self_attn_layer_norm(residual + hidden_states)

        residual = hidden_states
        hidden_states = self.encoder_attn(
            hidden_states,
            encoder_hidden_states,
            encoder_attention_mask,
            query_position_embeddings,
            reference_points,
            spatial_shapes,
        )
        hidden_states = self.dropout(hidden_states, deterministic=deterministic)
        hidden_states = self.encoder_attn_layer_norm(residual + hidden_states)

        hidden_states = hidden_states + self.mlp(hidden_states, deterministic)
        return self.final_layer_norm(hidden_states)


def encoder_reference_points(spatial_shapes, valid_ratios: jax.Array) -> jax.Array:
    """Pixel centres of every level, normalised by the valid area.

    `valid_ratios (bs, nlevels, 2)` -> `(bs, len_v, nlevels, 2)` as (x, y).
    """
    points = []
    for level, (height, width) in enumerate(spatial_shapes):
        ref_y, ref_x = jnp.meshgrid(
            jnp.arange(height, dtype=valid_ratios.dtype) + 0.5,
            jnp.arange(width, dtype=valid_ratios.dtype) + 0.5,
            indexing="ij",
        )
        # (bs, h * w)
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(jnp.stack((ref_x, ref_y), -1))
    # (bs, len_v, 1, 2) * (bs, 1, nlevels, 2)
    return jnp.concatenate(points, 1)[:, :, None] * valid_ratios[:, None]


class DeformableDetrEncoder(nnx.Module):
    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.layers = nnx.List(
            [DeformableDetrEncoderLayer(config, rngs=rngs) for _ in range(config.encoder_layers)]
        )

    def __call__(
        self,
        inputs_embeds,
        attention_mask,
        position_embeddings,
        spatial_shapes,
        valid_ratios,
        deterministic: bool,
    ) -> jax.Array:
        """`(bs, len_v, d_model)` flattened levels -> `(bs, len_v, d_model)`."""
        hidden_states = self.dropout(inputs_embeds, deterministic=deterministic)
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask,
                position_embeddings,
                reference_points,
                spatial_shapes,
                deterministic,
            )
        return hidden_states


class DeformableDetrDecoder(nnx.Module):
    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [DeformableDetrDecoderLayer(config, rngs=rngs) for _ in range(config.decoder_layers)]
        )

    def __call__(
        self,
        inputs_embeds,
        query_position_embeddings,
        encoder_hidden_states,
        encoder_attention_mask,
        reference_points,
        spatial_shapes,
        valid_ratios,
        bbox_embed=None,
        deterministic: bool = True,
    ):
        """Runs the decoder stack, refining `reference_points` when `bbox_embed` is given.

        Args:
          inputs_embeds: `(bs, num_queries, d_model)` query content.
          query_position_embeddings: `(bs, num_queries, d_model)`.
          encoder_hidden_states: `(bs, len_v, d_model)`; encoder_attention_mask `(bs, len_v)`.
          reference_points: `(bs, num_queries, 2)` points or `(bs, num_queries, 4)` boxes.
          valid_ratios: `(bs, nlevels, 2)`.
          bbox_embed: per-layer box heads for iterative refinement, or None.

        Returns:
          intermediate hidden states `(bs, layers, num_queries, d_model)` and reference
          points `(bs, layers, num_queries, 2 | 4)` after each layer.
        """
        hidden_states = inputs_embeds
        intermediate, intermediate_reference_points = [], []
        for idx, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                # (bs, num_queries, nlevels, 4)
                scale = jnp.concatenate([valid_ratios, valid_ratios], -1)[:, None]
            else:
                scale = valid_ratios[:, None]
            reference_points_input = reference_points[:, :, None] * scale
            hidden_states = layer(
                hidden_states,
                query_position_embeddings,
                reference_points_input,
                spatial_shapes,
                encoder_hidden_states,
                encoder_attention_mask,
                deterministic,
            )
            if bbox_embed is not None:
                with jax.named_scope("heads"):  # (a part of benchmarks/train_parts.py)
                    tmp = bbox_embed[idx](hidden_states)
                if reference_points.shape[-1] == 4:
                    new_reference_points = tmp + inverse_sigmoid(reference_points)
                else:
                    new_reference_points = tmp.at[..., :2].add(inverse_sigmoid(reference_points))
                reference_points = jax.lax.stop_gradient(jax.nn.sigmoid(new_reference_points))
            intermediate.append(hidden_states)
            intermediate_reference_points.append(reference_points)
        return jnp.stack(intermediate, 1), jnp.stack(intermediate_reference_points, 1)
