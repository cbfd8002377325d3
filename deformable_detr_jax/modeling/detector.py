"""`DeformableDetrModel` and `DeformableDetrForObjectDetection` (Zhu et al., 2010.04159).

Mirrors transformers' modules of the same names: backbone -> `input_proj` (1x1 conv +
GroupNorm(32), extra stride-2 levels) + level embedding + sine/learned position ->
deformable encoder -> queries (learned, or top-k encoder proposals in two-stage) ->
deformable decoder (optionally refining boxes) -> class and box heads on every layer.

Images are NHWC: `pixel_values (bs, height, width, 3)`, `pixel_mask (bs, height, width)`
True on real pixels. Without box refinement one class head and one box head are shared by
all decoder layers (the same module object, as in the original); with refinement each
layer has its own, and two-stage adds one more pair for the encoder proposals.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.modeling.backbone import (
    DeformableDetrConvEncoder,
    downsample_mask,
    mask_padding,
    pointwise_conv,
)
from deformable_detr_jax.modeling.position_encoding import (
    DeformableDetrLearnedPositionEmbedding,
    sine_position_embedding,
)
from deformable_detr_jax.modeling.transformer import (
    DeformableDetrDecoder,
    DeformableDetrEncoder,
    inverse_sigmoid,
    layer_norm,
    linear,
)
from deformable_detr_jax.modeling.two_stage import encoder_output_proposals, proposal_pos_embed


@struct.dataclass
class DeformableDetrModelOutput:
    """Outputs of `DeformableDetrModel` (a pytree)."""

    init_reference_points: jax.Array  # (bs, num_queries, 2 | 4)
    last_hidden_state: jax.Array  # (bs, num_queries, d_model)
    intermediate_hidden_states: jax.Array  # (bs, decoder_layers, num_queries, d_model)
    intermediate_reference_points: jax.Array  # (bs, decoder_layers, num_queries, 2 | 4)
    encoder_last_hidden_state: jax.Array  # (bs, len_v, d_model)
    enc_outputs_class: jax.Array | None = None  # (bs, len_v, num_labels), two-stage
    enc_outputs_coord_logits: jax.Array | None = None  # (bs, len_v, 4), two-stage


@struct.dataclass
class DeformableDetrObjectDetectionOutput(DeformableDetrModelOutput):
    """Outputs of `DeformableDetrForObjectDetection` (a pytree).

    `logits`/`pred_boxes` are the last decoder layer's; `intermediate_logits` and
    `intermediate_boxes` hold every layer's (the last equal to `logits`/`pred_boxes`),
    the auxiliary outputs used by the loss.
    """

    logits: jax.Array | None = None  # (bs, num_queries, num_labels)
    pred_boxes: jax.Array | None = None  # (bs, num_queries, 4) cxcywh in [0, 1]
    intermediate_logits: jax.Array | None = None  # (bs, decoder_layers, num_queries, labels)
    intermediate_boxes: jax.Array | None = None  # (bs, decoder_layers, num_queries, 4)

    @property
    def auxiliary_outputs(self) -> list[dict[str, jax.Array]]:
        """transformers' `auxiliary_outputs`: one dict per decoder layer but the last."""
        return [
            {"logits": self.intermediate_logits[:, i], "pred_boxes": self.intermediate_boxes[:, i]}
            for i in range(self.intermediate_logits.shape[1] - 1)
        ]


class InputProjection(nnx.Module):
    """Conv + GroupNorm(32); transformers' `input_proj[l]` = Sequential(conv `0`, norm `1`)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, *, rngs: nnx.Rngs):
        pad = kernel_size // 2
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            (kernel_size, kernel_size),
            strides=stride,
            padding=((pad, pad), (pad, pad)),
            kernel_init=nnx.initializers.xavier_uniform(),
            rngs=rngs,
        )
        self.norm = nnx.GroupNorm(
            out_channels, num_groups=32, epsilon=1e-5, use_fast_variance=False, rngs=rngs
        )
        self.dot_general = jax.lax.dot_general  # the 1x1 product (`pointwise_conv`)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`(bs, h, w, c_in)` -> `(bs, h', w', d_model)`; GroupNorm statistics over the
        positions where `mask` `(bs, h', w')` is True (all positions when None)."""
        # 1x1 (the backbone levels) as a matrix product, see backbone.pointwise_conv
        if self.conv.kernel_size == (1, 1):
            x = pointwise_conv(self.conv, x, dot_general=self.dot_general)
        else:
            x = self.conv(x)
        if mask is None:
            return self.norm(x)
        return self.norm(x, mask=jnp.broadcast_to(mask[..., None], x.shape))


class DeformableDetrMLPPredictionHead(nnx.Module):
    """Box head: `num_layers` linear layers with ReLU between them."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers, *, rngs: nnx.Rngs):
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nnx.List([nnx.Linear(n, k, rngs=rngs) for n, k in zip(dims, outs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


def valid_ratio(mask: jax.Array, dtype) -> jax.Array:
    """`(bs, h, w)` mask -> `(bs, 2)` fraction of valid columns and rows, as (w, h)."""
    _, height, width = mask.shape
    valid_height = jnp.sum(mask[:, :, 0], 1).astype(dtype) / height
    valid_width = jnp.sum(mask[:, 0, :], 1).astype(dtype) / width
    return jnp.stack([valid_width, valid_height], -1)


class DeformableDetrModel(nnx.Module):
    """Backbone + deformable encoder-decoder, without the heads."""

    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        self.config = config
        d_model = config.d_model
        self.backbone = DeformableDetrConvEncoder(config, rngs=rngs)
        if config.position_embedding_type == "learned":
            self.position_embedding = DeformableDetrLearnedPositionEmbedding(
                d_model // 2, rngs=rngs
            )
        else:
            self.position_embedding = None  # sine: computed from the mask, no parameters

        channels = self.backbone.intermediate_channel_sizes
        projections = [InputProjection(c, d_model, 1, 1, rngs=rngs) for c in channels]
        in_channels = channels[-1]
        for _ in range(config.num_feature_levels - len(channels)):
            projections.append(InputProjection(in_channels, d_model, 3, 2, rngs=rngs))
            in_channels = d_model
        self.input_proj = nnx.List(projections)

        if not config.two_stage:
            self.query_position_embeddings = nnx.Embed(
                config.num_queries,
                2 * d_model,
                embedding_init=nnx.initializers.normal(1.0),
                rngs=rngs,
            )
        self.encoder = DeformableDetrEncoder(config, rngs=rngs)
        self.decoder = DeformableDetrDecoder(config, rngs=rngs)
        self.level_embed = nnx.Param(
            jax.random.normal(rngs.params(), (config.num_feature_levels, d_model))
        )
        if config.two_stage:
            self.enc_output = linear(d_model, d_model, rngs)
            self.enc_output_norm = layer_norm(d_model, rngs)
            self.pos_trans = linear(2 * d_model, 2 * d_model, rngs)
            self.pos_trans_norm = layer_norm(2 * d_model, rngs)
        else:
            self.reference_points = nnx.Linear(
                d_model, 2, kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs
            )

    def _position_embedding(self, mask: jax.Array, dtype) -> jax.Array:
        if self.position_embedding is None:
            return sine_position_embedding(mask, self.config.d_model // 2, dtype)
        return self.position_embedding(mask, dtype)

    def __call__(
        self,
        pixel_values: jax.Array,
        pixel_mask: jax.Array,
        class_embed=None,
        bbox_embed=None,
        deterministic: bool = True,
        padding_invariant: bool = False,
    ) -> DeformableDetrModelOutput:
        """Runs backbone, encoder and decoder.

        `class_embed`/`bbox_embed` are the detection heads: the decoder refines boxes with
        `bbox_embed` when `config.with_box_refine`, and two-stage scores proposals with the
        last pair. `padding_invariant`: see `DeformableDetrForObjectDetection.__call__`.
        """
        config = self.config
        dtype = pixel_values.dtype
        # (named scopes: the parts of a profile, benchmarks/train_parts.py)
        sources, masks = self._project_features(
            pixel_values, pixel_mask, padding_invariant, deterministic
        )
        source_flatten, mask_flatten, pos_flatten, spatial_shapes, valid_ratios = (
            self._flatten_levels(sources, masks, dtype)
        )
        with jax.named_scope("encoder"):
            memory = self.encoder(
                source_flatten,
                mask_flatten,
                pos_flatten,
                spatial_shapes,
                valid_ratios,
                deterministic,
            )

        enc_outputs_class = enc_outputs_coord_logits = None
        if config.two_stage:
            query_embed, target, reference_points, enc_outputs_class, enc_outputs_coord_logits = (
                self._two_stage_queries(
                    memory, mask_flatten, spatial_shapes, class_embed, bbox_embed, padding_invariant
                )
            )
        else:
            query_embed, target, reference_points = self._learned_queries(memory.shape[0], dtype)

        with jax.named_scope("decoder"):
            hidden, references = self.decoder(
                target,
                query_embed,
                memory,
                mask_flatten,
                reference_points,
                spatial_shapes,
                valid_ratios,
                bbox_embed=bbox_embed if config.with_box_refine else None,
                deterministic=deterministic,
            )
        return DeformableDetrModelOutput(
            init_reference_points=reference_points,
            last_hidden_state=hidden[:, -1],
            intermediate_hidden_states=hidden,
            intermediate_reference_points=references,
            encoder_last_hidden_state=memory,
            enc_outputs_class=enc_outputs_class,
            enc_outputs_coord_logits=enc_outputs_coord_logits,
        )

    def _project_features(
        self,
        pixel_values: jax.Array,
        pixel_mask: jax.Array,
        padding_invariant: bool,
        deterministic: bool = True,
    ) -> tuple[list[jax.Array], list[jax.Array]]:
        """Backbone + `input_proj`: per level `(bs, h, w, d_model)` features and `(bs, h, w)`
        bool masks, the extra stride-2 levels computed from the last backbone level."""
        with jax.named_scope("backbone"):
            features = self.backbone(pixel_values, pixel_mask, padding_invariant, deterministic)

        sources, masks = [], []
        with jax.named_scope("input_proj"):
            for level, (source, mask) in enumerate(features):
                sources.append(self.input_proj[level](source, mask if padding_invariant else None))
                masks.append(mask)
            for level in range(len(sources), self.config.num_feature_levels):
                src = features[-1][0] if level == len(features) else sources[-1]
                if padding_invariant:
                    # zero the padding the 3x3 stride-2 conv would read; its real outputs are
                    # the strided real inputs (see backbone.mask_pyramid)
                    src = mask_padding(src, {tuple(masks[-1].shape[1:3]): masks[-1]})
                    mask = masks[-1][:, ::2, ::2]
                source = self.input_proj[level](src, mask if padding_invariant else None)
                sources.append(source)
                if not padding_invariant:
                    mask = downsample_mask(pixel_mask, source.shape[1], source.shape[2])
                masks.append(mask)
        return sources, masks

    def _flatten_levels(
        self, sources: list[jax.Array], masks: list[jax.Array], dtype
    ) -> tuple[jax.Array, jax.Array, jax.Array, tuple[tuple[int, int], ...], jax.Array]:
        """Flatten the levels: (bs, h, w, d_model) -> (bs, h * w, d_model), concatenated.

        Returns `source_flatten (bs, len_v, d_model)`, `mask_flatten (bs, len_v)`, `pos_flatten
        (bs, len_v, d_model)` (position + level embedding), the levels' `spatial_shapes` and
        `valid_ratios (bs, nlevels, 2)`.
        """
        spatial_shapes = tuple((s.shape[1], s.shape[2]) for s in sources)
        bs = sources[0].shape[0]
        level_embed = self.level_embed[...].astype(dtype)
        source_flatten = jnp.concatenate([s.reshape(bs, -1, s.shape[-1]) for s in sources], 1)
        mask_flatten = jnp.concatenate([m.reshape(bs, -1) for m in masks], 1)
        pos_flatten = jnp.concatenate(
            [
                self._position_embedding(m, dtype).reshape(bs, -1, self.config.d_model)
                + level_embed[level][None, None]
                for level, m in enumerate(masks)
            ],
            1,
        )
        # (bs, nlevels, 2)
        valid_ratios = jnp.stack([valid_ratio(m, dtype) for m in masks], 1)
        return source_flatten, mask_flatten, pos_flatten, spatial_shapes, valid_ratios

    def _two_stage_queries(
        self,
        memory: jax.Array,
        mask_flatten: jax.Array,
        spatial_shapes: tuple[tuple[int, int], ...],
        class_embed,
        bbox_embed,
        padding_invariant: bool,
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
        """Two-stage queries from the top-k encoder proposals, scored by the last head pair.

        Args:
          memory: `(bs, len_v, d_model)` encoder output; `mask_flatten (bs, len_v)` bool.

        Returns:
          `query_embed, target (bs, num_proposals, d_model)`, `reference_points (bs,
          num_proposals, 4)`, `enc_outputs_class (bs, len_v, num_labels)` and
          `enc_outputs_coord_logits (bs, len_v, 4)`.
        """
        config, d_model = self.config, self.config.d_model
        object_query, output_proposals = encoder_output_proposals(
            memory, ~mask_flatten, spatial_shapes
        )
        object_query = self.enc_output_norm(self.enc_output(object_query))
        enc_outputs_class = class_embed[-1](object_query)
        enc_outputs_coord_logits = bbox_embed[-1](object_query) + output_proposals
        # (bs, num_proposals) indices of the highest-scoring proposals
        scores = enc_outputs_class[..., 0]
        if padding_invariant:  # padded positions are not proposals of the unpadded image
            scores = jnp.where(mask_flatten, scores, -jnp.inf)
        _, topk = jax.lax.top_k(scores, config.two_stage_num_proposals)
        topk_coords_logits = jnp.take_along_axis(enc_outputs_coord_logits, topk[..., None], axis=1)
        topk_coords_logits = jax.lax.stop_gradient(topk_coords_logits)
        reference_points = jax.nn.sigmoid(topk_coords_logits)
        pos_trans_out = self.pos_trans_norm(
            self.pos_trans(proposal_pos_embed(topk_coords_logits, d_model))
        )
        query_embed, target = pos_trans_out[..., :d_model], pos_trans_out[..., d_model:]
        return query_embed, target, reference_points, enc_outputs_class, enc_outputs_coord_logits

    def _learned_queries(self, bs: int, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Learned queries: `query_embed, target (bs, num_queries, d_model)` and
        `reference_points (bs, num_queries, 2)` from `query_position_embeddings`."""
        config, d_model = self.config, self.config.d_model
        # (num_queries, 2 * d_model) -> query position and content, broadcast over bs
        query_embeds = self.query_position_embeddings.embedding[...].astype(dtype)
        query_embed = jnp.broadcast_to(
            query_embeds[None, :, :d_model], (bs, config.num_queries, d_model)
        )
        target = jnp.broadcast_to(
            query_embeds[None, :, d_model:], (bs, config.num_queries, d_model)
        )
        reference_points = jax.nn.sigmoid(self.reference_points(query_embed))
        return query_embed, target, reference_points


class DeformableDetrForObjectDetection(nnx.Module):
    """Deformable DETR with class and box heads on every decoder layer.

    Example:
      model = DeformableDetrForObjectDetection(DeformableDetrConfig(), rngs=nnx.Rngs(0))
      out = model(pixel_values, pixel_mask)  # (bs, h, w, 3), (bs, h, w)
      out.logits, out.pred_boxes  # (bs, 300, 91), (bs, 300, 4)
    """

    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = DeformableDetrModel(config, rngs=rngs)
        num_pred = config.num_decoder_predictions
        # Focal-loss prior (probability 0.01) on the class bias; zero last box layer.
        prior_bias = -math.log((1 - 0.01) / 0.01)

        def make_class_embed():
            return nnx.Linear(
                config.d_model,
                config.num_labels,
                bias_init=nnx.initializers.constant(prior_bias),
                rngs=rngs,
            )

        def make_bbox_embed():
            head = DeformableDetrMLPPredictionHead(config.d_model, config.d_model, 4, 3, rngs=rngs)
            last = head.layers[-1]
            last.kernel[...] = jnp.zeros_like(last.kernel[...])
            last.bias[...] = jnp.zeros_like(last.bias[...])
            return head

        if config.with_box_refine:
            class_heads = [make_class_embed() for _ in range(num_pred)]
            bbox_heads = [make_bbox_embed() for _ in range(num_pred)]
        else:  # one head pair shared by every layer (the same module object)
            class_heads = [make_class_embed()] * num_pred
            bbox_heads = [make_bbox_embed()] * num_pred
        if not config.two_stage:
            # initial boxes start small: sigmoid(-2) ~ 0.12 of the image (original init)
            first = bbox_heads[0].layers[-1]
            first.bias[...] = first.bias[...].at[2:].set(-2.0)
        self.class_embed = nnx.List(class_heads)
        self.bbox_embed = nnx.List(bbox_heads)

    def __call__(
        self,
        pixel_values: jax.Array,
        pixel_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
        padding_invariant: bool = False,
    ) -> DeformableDetrObjectDetectionOutput:
        """Detects objects.

        Args:
          pixel_values: `(bs, height, width, 3)` normalised images (NHWC).
          pixel_mask: `(bs, height, width)`, True/1 on real pixels, 0 on padding (bottom and
            right, as the image processor pads); all pixels are real when None.
          deterministic: False enables dropout (needs the model's `dropout` rng stream).
          padding_invariant: False (default) computes exactly what transformers and the
            original do, where padding leaks into the features near the bottom/right border
            (backbone convolutions, nearest-neighbour masks, `input_proj` GroupNorm statistics
            over all positions, two-stage proposals at padded positions). True masks all four,
            so each image's outputs equal those of the image alone, unpadded, up to float
            rounding, whatever the padding (`Detector` uses this). Identical when nothing is
            padded.

        Returns:
          `DeformableDetrObjectDetectionOutput` with `logits (bs, num_queries, num_labels)`
          and `pred_boxes (bs, num_queries, 4)` (cxcywh, normalised to the unpadded image).
        """
        pixel_values, pixel_mask = check_inputs(pixel_values, pixel_mask)
        outputs = self.model(
            pixel_values,
            pixel_mask,
            self.class_embed,
            self.bbox_embed,
            deterministic,
            padding_invariant,
        )
        with jax.named_scope("heads"):
            logits, boxes = self._heads(outputs)
        return DeformableDetrObjectDetectionOutput(
            **{f.name: getattr(outputs, f.name) for f in dataclasses.fields(outputs)},
            logits=logits[:, -1],
            pred_boxes=boxes[:, -1],
            intermediate_logits=logits,
            intermediate_boxes=boxes,
        )

    def _heads(self, outputs: DeformableDetrModelOutput) -> tuple[jax.Array, jax.Array]:
        """Every decoder layer's logits `(bs, layers, num_queries, num_labels)` and boxes
        `(bs, layers, num_queries, 4)`."""
        hidden = outputs.intermediate_hidden_states
        logits, boxes = [], []
        for level in range(hidden.shape[1]):
            # layer 0 starts from the initial points (2 or 4 coords), later layers from
            # the previous layer's (refined) reference
            reference = inverse_sigmoid(
                outputs.init_reference_points
                if level == 0
                else outputs.intermediate_reference_points[:, level - 1]
            )
            logits.append(self.class_embed[level](hidden[:, level]))
            delta = self.bbox_embed[level](hidden[:, level])
            if reference.shape[-1] == 4:
                coord_logits = delta + reference
            else:
                coord_logits = delta.at[..., :2].add(reference)
            boxes.append(jax.nn.sigmoid(coord_logits))
        return jnp.stack(logits, 1), jnp.stack(boxes, 1)


def check_inputs(pixel_values, pixel_mask) -> tuple[jax.Array, jax.Array]:
    """Validates image and mask shapes before tracing; returns the mask as bool."""
    shape = getattr(pixel_values, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"pixel_values must be (bs, height, width, 3) NHWC, got shape {shape}; "
            "transpose NCHW arrays with x.transpose(0, 2, 3, 1) and add a batch axis"
        )
    if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
        raise ValueError(
            f"pixel_values must be floating point (normalised), got {pixel_values.dtype}; "
            "preprocess images with ImageProcessor"
        )
    bs, height, width, _ = shape
    if height < 32 or width < 32:
        raise ValueError(
            f"pixel_values height and width must be at least 32 (the backbone stride), "
            f"got {height}x{width}"
        )
    if pixel_mask is None:
        return pixel_values, jnp.ones((bs, height, width), bool)
    mask_shape = getattr(pixel_mask, "shape", None)
    if mask_shape is None or tuple(mask_shape) != (bs, height, width):
        raise ValueError(
            f"pixel_mask must have shape (bs, height, width) = {(bs, height, width)} to match "
            f"pixel_values {tuple(shape)}, got {mask_shape}"
        )
    return pixel_values, pixel_mask.astype(bool)
