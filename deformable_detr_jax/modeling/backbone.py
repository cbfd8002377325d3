"""ResNet backbone with frozen batch norm, returning C3..C5 (or C5) and downsampled masks.

Module names mirror transformers' `ResNetBackbone` (`embedder.embedder.convolution`,
`encoder.stages[i].layers[j].layer[k]`, `shortcut`) inside `DeformableDetrConvEncoder`
(`model.backbone.model`), so weights map one-to-one. Strides sit on the 3x3 convolution
(ResNet v1.5, as torchvision and timm). DC5 (`config.dilation`) replaces the last stage's
stride with dilation 2, the first block keeping dilation 1, as timm's `output_stride=16`.
Batch norm is frozen as transformers' `DeformableDetrFrozenBatchNorm2d` (eps 1e-5).

1x1 convolutions. The bottleneck's 1x1 reduce/expand convolutions, every shortcut and the
input projections' 1x1 convolutions are computed as matrix products over channels
(`pointwise_conv`; a stride-2 shortcut on the stride-2 subsampled input), the same sum: the
filter gradient of a 1x1 `conv_general_dilated` is what XLA:CPU runs slowly, 1.4 to 4.8x the
matrix product's at R50 layer2..3 sizes, and the whole R50 backbone's forward+backward at
2 x 384 x 512 takes 2.89 s this way against 3.98 s (benchmarks/backbone.py, BENCHMARKS.md).
The `convolution` modules and their `kernel`s (checkpoint names) are unchanged.

Padding. As in transformers, padded pixels are plain zeros to the convolutions: from the first
BN + ReLU on, the padded region holds non-zero values that the next 3x3 convolution carries back
across the border, so features near the bottom/right edge depend on how much padding there is.
With `padding_invariant=True` the input of every convolution wider than 1x1 (and of the max pool)
is zeroed on padded positions, at its own resolution (`mask_pyramid`: the pixel mask strided by
2 per stride-2 layer, which is exactly the set of positions an unpadded image has), so every
real position sees what it would see without padding: outputs on real positions equal those of
the unpadded image up to float rounding. The ConvNeXt and Swin backbones do the same their own
way (`convnext.py`, `swin.py`: their own masks per stage, `stage_masks`; Swin's windows padded
and shifted per image); in every case a padded batch's image, top-left with a prefix pixel mask,
gives on its real positions what it gives alone with an all-true mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.modeling.convnext import ConvNextBackbone
from deformable_detr_jax.modeling.remat import call_stage, stage_flags
from deformable_detr_jax.modeling.swin import SwinBackbone


class FrozenBatchNorm2d(nnx.Module):
    """Batch norm with fixed statistics and affine parameters (none of them trained)."""

    def __init__(self, num_features: int):
        self.weight = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        # (..., channels): same operation order as transformers' frozen batch norm.
        scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + 1e-5)
        bias = self.bias[...] - self.running_mean[...] * scale
        return x * scale.astype(x.dtype) + bias.astype(x.dtype)


Masks = dict[tuple[int, int], jax.Array]  # (h, w) -> (bs, h, w) bool, one per resolution


def mask_pyramid(pixel_mask: jax.Array, strides: int = 6) -> Masks:
    """The pixel mask at every resolution the backbone reaches, keyed by (height, width).

    A stride-2 layer (3x3 pad 1, 7x7 pad 3, 1x1, max pool 3 pad 1) maps n positions to
    ceil(n / 2) and output i to input 2i, so the real positions of a top-left-aligned image
    at each resolution are the pixel mask's every other row and column, recursively.
    """
    masks = {}
    for _ in range(strides + 1):
        masks[tuple(pixel_mask.shape[1:3])] = pixel_mask
        pixel_mask = pixel_mask[:, ::2, ::2]
    return masks


def mask_padding(x: jax.Array, masks: Masks | None) -> jax.Array:
    """`(bs, h, w, c)` with padded positions set to zero (unchanged when `masks` is None)."""
    if masks is None:
        return x
    return jnp.where(masks[tuple(x.shape[1:3])][..., None], x, jnp.zeros((), x.dtype))


def pointwise_conv(
    conv: nnx.Conv, x: jax.Array, stride: int = 1, dot_general=jax.lax.dot_general
) -> jax.Array:
    """`conv(x)` for a 1x1, unpadded `conv` of `stride`, as a matrix product (plus its bias
    where it has one).

    `(bs, h, w, in)` -> `(bs, ceil(h / stride), ceil(w / stride), out)`, in the promoted dtype
    of `x` and the kernel (as `nnx.Conv` computes it). `dot_general` computes the product, as
    `nnx.Linear`'s does: the layers below pass their own `dot_general` attribute, which a
    caller may replace as it may an `nnx.Linear`'s.
    """
    kernel = conv.kernel[...]
    bias = None if conv.bias is None else conv.bias[...]
    dtype = jnp.promote_types(x.dtype, kernel.dtype)
    if stride > 1:
        x = x[:, ::stride, ::stride]
    # (bs, h, w, in) @ (in, out)
    out = dot_general(
        x.astype(dtype),
        kernel[0, 0].astype(dtype),
        (((3,), (0,)), ((), ())),
        precision=conv.precision,
    )
    return out if bias is None else out + bias.astype(dtype)


class ResNetConvLayer(nnx.Module):
    """Conv (no bias) + frozen BN + optional ReLU; `padding = dilation * (kernel // 2)`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        activation: bool = True,
        *,
        rngs: nnx.Rngs,
    ):
        pad = dilation * (kernel_size // 2)
        self.convolution = nnx.Conv(
            in_channels,
            out_channels,
            (kernel_size, kernel_size),
            strides=stride,
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=dilation,
            use_bias=False,
            kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
            rngs=rngs,
        )
        self.normalization = FrozenBatchNorm2d(out_channels)
        self.activation = activation
        self.pointwise = kernel_size == 1 and stride == 1
        self.dot_general = jax.lax.dot_general  # the 1x1 product (`pointwise_conv`)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pointwise:
            x = pointwise_conv(self.convolution, x, dot_general=self.dot_general)
        else:
            x = self.convolution(x)
        x = self.normalization(x)
        return jax.nn.relu(x) if self.activation else x


class ResNetShortCut(nnx.Module):
    """1x1 projection of the residual when channels or stride change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs):
        self.convolution = nnx.Conv(
            in_channels,
            out_channels,
            (1, 1),
            strides=stride,
            padding="VALID",
            use_bias=False,
            kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
            rngs=rngs,
        )
        self.normalization = FrozenBatchNorm2d(out_channels)
        self.stride = stride
        self.dot_general = jax.lax.dot_general  # the 1x1 product (`pointwise_conv`)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = pointwise_conv(self.convolution, x, self.stride, self.dot_general)
        return self.normalization(x)


class ResNetBasicLayer(nnx.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    def __init__(self, in_channels, out_channels, stride, first_dilation, dilation, *, rngs):
        self.shortcut = (
            ResNetShortCut(in_channels, out_channels, stride, rngs=rngs)
            if in_channels != out_channels or stride != 1
            else None
        )
        self.layer = nnx.List(
            [
                ResNetConvLayer(in_channels, out_channels, 3, stride, first_dilation, rngs=rngs),
                ResNetConvLayer(out_channels, out_channels, 3, 1, dilation, False, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array, masks: Masks | None = None) -> jax.Array:
        residual = x if self.shortcut is None else self.shortcut(x)
        x = self.layer[0](mask_padding(x, masks))
        x = self.layer[1](mask_padding(x, masks))
        return jax.nn.relu(x + residual)


class ResNetBottleNeckLayer(nnx.Module):
    """1x1 reduce, 3x3 (strided, dilated), 1x1 expand (ResNet-50/101)."""

    def __init__(self, in_channels, out_channels, stride, first_dilation, dilation, *, rngs):
        del dilation  # only the 3x3 conv is dilated, with `first_dilation` as in timm
        reduces = out_channels // 4
        self.shortcut = (
            ResNetShortCut(in_channels, out_channels, stride, rngs=rngs)
            if in_channels != out_channels or stride != 1
            else None
        )
        self.layer = nnx.List(
            [
                ResNetConvLayer(in_channels, reduces, 1, rngs=rngs),
                ResNetConvLayer(reduces, reduces, 3, stride, first_dilation, rngs=rngs),
                ResNetConvLayer(reduces, out_channels, 1, activation=False, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array, masks: Masks | None = None) -> jax.Array:
        residual = x if self.shortcut is None else self.shortcut(x)
        x = self.layer[0](x)  # 1x1: no neighbours to leak from
        x = self.layer[1](mask_padding(x, masks))
        x = self.layer[2](x)
        return jax.nn.relu(x + residual)


class ResNetStage(nnx.Module):
    def __init__(self, block, in_channels, out_channels, stride, depth, dilation, *, rngs):
        # The first block keeps the previous stage's dilation (1), later blocks use `dilation`.
        self.layers = nnx.List(
            [
                block(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    stride if i == 0 else 1,
                    1 if i == 0 else dilation,
                    dilation,
                    rngs=rngs,
                )
                for i in range(depth)
            ]
        )

    def __call__(self, x: jax.Array, masks: Masks | None = None) -> jax.Array:
        for layer in self.layers:
            x = layer(x, masks)
        return x


class ResNetEmbeddings(nnx.Module):
    """7x7 stride-2 conv + BN + ReLU, then 3x3 stride-2 max pool."""

    def __init__(self, embedding_size: int, *, rngs: nnx.Rngs):
        self.embedder = ResNetConvLayer(3, embedding_size, 7, 2, rngs=rngs)

    def __call__(self, x: jax.Array, masks: Masks | None = None) -> jax.Array:
        x = self.embedder(mask_padding(x, masks))
        # After ReLU, zeroed padding cannot raise a maximum that has a real position in its
        # window (every window of a real output position has one).
        x = mask_padding(x, masks)
        # (bs, height, width, channels), padded with -inf like torch's MaxPool2d(3, 2, 1).
        return jax.lax.reduce_window(
            x,
            -jnp.inf,
            jax.lax.max,
            (1, 3, 3, 1),
            (1, 2, 2, 1),
            ((0, 0), (1, 1), (1, 1), (0, 0)),
        )


class ResNetEncoder(nnx.Module):
    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        block = ResNetBasicLayer if config.backbone_layer_type == "basic" else ResNetBottleNeckLayer
        stages = []
        in_channels = config.backbone_embedding_size
        for i, (depth, out_channels) in enumerate(
            zip(config.backbone_depths, config.backbone_hidden_sizes)
        ):
            dilated = config.dilation and i == 3
            stride = 1 if i == 0 or dilated else 2
            stages.append(
                ResNetStage(
                    block, in_channels, out_channels, stride, depth, 2 if dilated else 1, rngs=rngs
                )
            )
            in_channels = out_channels
        self.stages = nnx.List(stages)
        self.remat = stage_flags(config.backbone_remat, len(stages))

    def __call__(self, x: jax.Array, masks: Masks | None = None) -> list[jax.Array]:
        outputs = []
        for stage, remat in zip(self.stages, self.remat):
            x = call_stage(stage, remat, x, masks)
            outputs.append(x)
        return outputs


class ResNetBackbone(nnx.Module):
    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        self.embedder = ResNetEmbeddings(config.backbone_embedding_size, rngs=rngs)
        self.encoder = ResNetEncoder(config, rngs=rngs)
        self.out_stages = config.backbone_out_stages

    def __call__(self, pixel_values: jax.Array, masks: Masks | None = None) -> list[jax.Array]:
        """C2..C5 selected by `out_stages`; `masks` (from `mask_pyramid`) zero the padding
        before every convolution that mixes neighbours."""
        stages = self.encoder(self.embedder(pixel_values, masks), masks)
        return [stages[i] for i in self.out_stages]


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of torch's `interpolate(mode="nearest")` for a static size change.

    torch computes `min(floor(dst * float32(in / out)), in - 1)` in float32.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def downsample_mask(pixel_mask: jax.Array, height: int, width: int) -> jax.Array:
    """Nearest-neighbour resize of a `(bs, H, W)` bool mask to `(bs, height, width)`."""
    _, in_h, in_w = pixel_mask.shape
    rows = nearest_indices(in_h, height)
    cols = nearest_indices(in_w, width)
    return pixel_mask[:, rows][:, :, cols]


BACKBONES = {"resnet": ResNetBackbone, "convnext": ConvNextBackbone, "swin": SwinBackbone}


class DeformableDetrConvEncoder(nnx.Module):
    """Backbone feature maps plus the pixel mask downsampled to each of them."""

    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        self.model = BACKBONES[config.backbone_type](config, rngs=rngs)
        self.backbone_type = config.backbone_type
        self.intermediate_channel_sizes = tuple(
            config.backbone_hidden_sizes[i] for i in config.backbone_out_stages
        )

    def __call__(
        self,
        pixel_values: jax.Array,
        pixel_mask: jax.Array,
        padding_invariant: bool = False,
        deterministic: bool = True,
    ) -> list[tuple[jax.Array, jax.Array]]:
        """`(bs, H, W, 3)`, `(bs, H, W)` -> [(features `(bs, h, w, c)`, mask `(bs, h, w)`)].

        Masks are the pixel mask resized by nearest neighbour (transformers), or with
        `padding_invariant` each level's real positions: the pixel mask strided
        (`mask_pyramid`) and applied inside the ResNet, or the ConvNeXt's / Swin's
        `stage_masks`, applied inside them.
        `deterministic=False` applies ConvNeXt's and Swin's drop path (the ResNet has none).
        """
        if self.backbone_type != "resnet":
            if padding_invariant:
                # each stage's real positions (ConvNeXt's floor, Swin's ceil), kept out inside
                features = self.model(pixel_values, deterministic, pixel_mask)
                masks = self.model.stage_masks(pixel_mask)
                return [(f, masks[i]) for f, i in zip(features, self.model.out_stages)]
            features = self.model(pixel_values, deterministic)
            return [(f, downsample_mask(pixel_mask, f.shape[1], f.shape[2])) for f in features]
        if padding_invariant:
            masks = mask_pyramid(pixel_mask)
            features = self.model(pixel_values, masks)
            return [(f, masks[tuple(f.shape[1:3])]) for f in features]
        features = self.model(pixel_values)
        return [(f, downsample_mask(pixel_mask, f.shape[1], f.shape[2])) for f in features]
