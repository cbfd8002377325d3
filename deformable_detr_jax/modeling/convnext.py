"""ConvNeXt backbone (Liu et al., 2201.03545) as transformers' `ConvNextBackbone`.

Module names mirror transformers' (`embeddings.patch_embeddings`, `embeddings.layernorm`,
`encoder.stages[i].downsampling_layer[0 | 1]`, `encoder.stages[i].layers[j].dwconv | layernorm |
pwconv1 | pwconv2 | layer_scale_parameter`, `hidden_states_norms.stageN`), so that inside
`DeformableDetrConvEncoder` (`model.backbone.model`) the parameters map one-to-one to the state
dict of transformers' `DeformableDetrForObjectDetection` with a `ConvNextConfig` backbone.

Channel-last throughout: transformers' "channels_first" layer norms are the same layer norm over
the last axis here. The stem is a `patch_size` x `patch_size` stride-`patch_size` convolution
without padding (the last partial patch row/column is dropped, as in torch); stage i > 0 starts
with layer norm + a 2x2 stride-2 convolution. Every layer norm has epsilon 1e-6 (the backbone's
output norms too). Drop path (stochastic depth) scales from 0 to `backbone_drop_path_rate`
linearly over all blocks and applies only when not `deterministic`.

Padding (`masks`, from `stage_masks`; `padding_invariant=True`). Every layer but the depthwise
7x7 convolution is per position or reads only its own patch (stem, 2x2 downsampling), so an
output position whose patch lies inside the image sees only the image: stride-`p` position i is
real when pixel `p i + p - 1` is (floor(h / p) of them, as the image alone gives), and each 2x2
downsampling keeps position i when input `2 i + 1` is real (floor again). The 7x7 convolution's
input is zeroed outside each stage's real positions, as the image alone pads it with zeros; the
real positions then equal the image's alone, whatever the padding holds. An image under
`p 2**(stages - 1)` pixels on a side has no real position at the last stage (alone it is refused
as too small); in a larger padded batch its outputs depend on the padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.modeling.remat import call_stage, stage_flags
from deformable_detr_jax.modeling.stochastic_depth import drop_path, drop_path_rates


def convnext_layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """transformers' `ConvNextLayerNorm` (epsilon 1e-6, two-pass variance), over channels."""
    return nnx.LayerNorm(dim, epsilon=1e-6, use_fast_variance=False, rngs=rngs)


class ConvNextEmbeddings(nnx.Module):
    """Patchify stem: `(bs, H, W, 3)` -> `(bs, H // p, W // p, hidden_sizes[0])`, layer norm."""

    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        size, width = config.backbone_patch_size, config.backbone_hidden_sizes[0]
        self.patch_embeddings = nnx.Conv(
            3, width, (size, size), strides=size, padding="VALID", rngs=rngs
        )
        self.layernorm = convnext_layer_norm(width, rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.layernorm(self.patch_embeddings(pixel_values))


class ConvNextLayer(nnx.Module):
    """Block: depthwise 7x7 conv, layer norm, Linear(dim, 4 dim), GELU, Linear(4 dim, dim),
    layer scale, drop path, residual. `(bs, h, w, dim)` -> same shape."""

    def __init__(self, config: DeformableDetrConfig, dim: int, rate: float, *, rngs: nnx.Rngs):
        self.dwconv = nnx.Conv(
            dim, dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=dim, rngs=rngs
        )
        self.layernorm = convnext_layer_norm(dim, rngs)
        self.pwconv1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.pwconv2 = nnx.Linear(4 * dim, dim, rngs=rngs)
        scale = config.backbone_layer_scale_init_value
        self.layer_scale_parameter = (
            nnx.Param(jnp.full((dim,), scale, jnp.float32)) if scale > 0 else None
        )
        self.drop_path = drop_path(rate, 4, rngs)

    def __call__(
        self, x: jax.Array, deterministic: bool = True, mask: jax.Array | None = None
    ) -> jax.Array:
        """`mask (bs, h, w)`: real positions; the 7x7 convolution reads zeros elsewhere."""
        residual = x
        if mask is not None:
            x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
        x = self.layernorm(self.dwconv(x))
        x = self.pwconv2(jax.nn.gelu(self.pwconv1(x), approximate=False))
        if self.layer_scale_parameter is not None:
            x = self.layer_scale_parameter[...].astype(x.dtype) * x
        if self.drop_path is not None:
            x = self.drop_path(x, deterministic=deterministic)
        return residual + x


class ConvNextStage(nnx.Module):
    """Optional downsampling (layer norm + 2x2 stride-2 conv) then `depth` blocks."""

    def __init__(self, config, in_channels, out_channels, stride, rates, *, rngs: nnx.Rngs):
        if in_channels != out_channels or stride > 1:
            self.downsampling_layer = nnx.List(
                [
                    convnext_layer_norm(in_channels, rngs),
                    nnx.Conv(
                        in_channels,
                        out_channels,
                        (stride, stride),
                        strides=stride,
                        padding="VALID",
                        rngs=rngs,
                    ),
                ]
            )
        else:
            self.downsampling_layer = nnx.List([])
        self.layers = nnx.List([ConvNextLayer(config, out_channels, r, rngs=rngs) for r in rates])

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True
    ) -> jax.Array:
        """`mask`: this stage's real positions (after its downsampling), or None."""
        for layer in self.downsampling_layer:
            x = layer(x)
        for layer in self.layers:
            x = layer(x, deterministic, mask)
        return x


class ConvNextEncoder(nnx.Module):
    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        sizes = config.backbone_hidden_sizes
        rates = drop_path_rates(config.backbone_drop_path_rate, config.backbone_depths)
        self.stages = nnx.List(
            [
                ConvNextStage(
                    config, sizes[max(i - 1, 0)], sizes[i], 2 if i > 0 else 1, rates[i], rngs=rngs
                )
                for i in range(len(sizes))
            ]
        )
        self.remat = stage_flags(config.backbone_remat, len(sizes))

    def __call__(
        self, x: jax.Array, deterministic: bool = True, masks: list[jax.Array] | None = None
    ) -> list[jax.Array]:
        """Every stage's output `(bs, h_i, w_i, hidden_sizes[i])`, h_i = h_0 // 2**i; `masks`:
        every stage's real positions (`stage_masks`), or None."""
        outputs = []
        for i, (stage, remat) in enumerate(zip(self.stages, self.remat)):
            mask = None if masks is None else masks[i]
            x = call_stage(stage, remat, x, mask, deterministic=deterministic)
            outputs.append(x)
        return outputs


class ConvNextBackbone(nnx.Module):
    """Stem + stages; the `out_stages` outputs through their own layer norms."""

    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        self.embeddings = ConvNextEmbeddings(config, rngs=rngs)
        self.encoder = ConvNextEncoder(config, rngs=rngs)
        self.out_stages = config.backbone_out_stages
        self.patch_size = config.backbone_patch_size
        self.num_stages = len(config.backbone_depths)
        self.hidden_states_norms = nnx.Dict(
            {
                f"stage{i + 1}": convnext_layer_norm(config.backbone_hidden_sizes[i], rngs)
                for i in self.out_stages
            }
        )

    def stage_masks(self, pixel_mask: jax.Array) -> list[jax.Array]:
        """Every stage's real positions `(bs, H // (p 2**i), W // (p 2**i))` of top-left images
        whose pixels are `pixel_mask (bs, H, W)`: the positions whose patch is all image."""
        p = self.patch_size
        masks = [pixel_mask[:, p - 1 :: p, p - 1 :: p]]
        for _ in range(1, self.num_stages):
            masks.append(masks[-1][:, 1::2, 1::2])
        return masks

    def __call__(
        self,
        pixel_values: jax.Array,
        deterministic: bool = True,
        pixel_mask: jax.Array | None = None,
    ) -> list[jax.Array]:
        """`(bs, H, W, 3)` -> per out stage i `(bs, H // (p 2**i), W // (p 2**i), width_i)`.

        With `pixel_mask (bs, H, W)` the padding is kept out (`stage_masks`): real positions
        equal those of each image alone, unpadded."""
        side = self.patch_size * 2 ** (self.num_stages - 1)
        if min(pixel_values.shape[1:3]) < side:
            raise ValueError(
                f"pixel_values of {pixel_values.shape[1]}x{pixel_values.shape[2]} are too small for "
                f"this ConvNeXt (patch size {self.patch_size}, {self.num_stages} stages): height "
                f"and width must be at least {side}"
            )
        masks = None if pixel_mask is None else self.stage_masks(pixel_mask)
        stages = self.encoder(self.embeddings(pixel_values), deterministic, masks)
        return [self.hidden_states_norms[f"stage{i + 1}"](stages[i]) for i in self.out_stages]
