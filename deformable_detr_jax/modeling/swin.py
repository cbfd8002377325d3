"""Swin Transformer backbone (Liu et al., 2103.14030) as transformers' `SwinBackbone`.

Module names mirror transformers' (`swin.embeddings.patch_embeddings.projection`,
`swin.embeddings.norm`, `swin.encoder.layers[i].blocks[j].layernorm_before | attention.q_proj |
k_proj | v_proj | o_proj | attention.relative_position_bias.relative_position_bias_table |
layernorm_after | mlp.fc1 | mlp.fc2`, `swin.encoder.layers[i].downsample.norm | reduction`,
`swin.layernorm`, `hidden_states_norms.stageN`), so that inside `DeformableDetrConvEncoder`
(`model.backbone.model`) the parameters map one-to-one to transformers' state dict.
`swin.layernorm` (the classifier's final norm) is kept for that mapping and never used.

What transformers computes, and so this module (tokens are `(bs, h * w, c)`, row-major):
- the image is zero-padded bottom/right to a multiple of `patch_size`, patchified by a
  `patch_size` stride-`patch_size` convolution and layer-normed;
- every block pads its layer-normed input with zeros to a multiple of `window_size` (always:
  the backbone runs with `always_partition=True`, no window clamping), shifts it cyclically by
  `window_size // 2` in odd blocks, and attends within windows with a relative position bias and,
  when shifted, the -100 mask between regions that the shift brought together; the padding takes
  part in attention unmasked;
- drop path applies to the attention branch only (transformers' `SwinLayer`), in training;
- after every stage but the last: patch merging (zero pad to even sizes, 2x2 neighbours
  concatenated as (0,0), (1,0), (0,1), (1,1), layer norm, Linear(4c, 2c) without bias);
- a backbone output is a stage's tokens before merging, through its own layer norm.
Every layer norm has epsilon 1e-5.

Padding (`pixel_mask`; `padding_invariant=True`): each image of a padded batch computes what it
computes alone, unpadded, on its real positions (`stage_masks`: patch i is real when its first
pixel is, ceil(h / p) of them, and each merging keeps every other one, ceil again). The image
alone sees zeros where the batch holds padding, so the pixels, every block's layer-normed
tokens and the merging's input are zeroed outside the real positions; and it pads each block's
map to ITS OWN multiple of the window (`own_extents`), so a shifted block rolls modulo that
extent, per image (`own_cyclic_shift`: a gather; positions past the extent hold no real token
and stay in place), with the -100 region mask built on that extent (`own_shift_mask`).
Non-shifted windows tile from the origin, so the image's windows are the batch's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.modeling.remat import call_stage, stage_flags
from deformable_detr_jax.modeling.stochastic_depth import drop_path, drop_path_rates
from deformable_detr_jax.modeling.transformer import layer_norm


@functools.cache
def relative_position_index(window: int) -> np.ndarray:
    """`(window**2, window**2)` indices into the bias table: (dy + w - 1) (2w - 1) + dx + w - 1."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)  # (2, w*w)
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """`(bs, H, W, c)` (H, W multiples of `window`) -> `(bs * nH * nW, window**2, c)`."""
    bs, height, width, channels = x.shape
    # (bs, nH, window, nW, window, c)
    x = x.reshape(bs, height // window, window, width // window, window, channels)
    # (bs, nH, nW, window, window, c) -> (bs * nH * nW, window**2, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
    """`(bs * nH * nW, window**2, c)` -> `(bs, H, W, c)` (the inverse of `window_partition`)."""
    channels = windows.shape[-1]
    # (bs, nH, nW, window, window, c)
    x = windows.reshape(-1, height // window, width // window, window, window, channels)
    # (bs, nH, window, nW, window, c) -> (bs, H, W, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


@functools.cache
def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """`(nH * nW, window**2, window**2)`: -100 between tokens of a shifted window that come from
    different regions of the (padded) map, else 0 (transformers' `get_attn_mask`)."""
    rows, cols = np.arange(height), np.arange(width)
    row_region = (rows >= height - window).astype(int) + (rows >= height - shift)
    col_region = (cols >= width - window).astype(int) + (cols >= width - shift)
    regions = (row_region[:, None] * 3 + col_region[None, :])[None, :, :, None]
    # (nH * nW, window**2)
    windows = window_partition(regions, window)[..., 0]
    return np.where(windows[:, None, :] != windows[:, :, None], -100.0, 0.0)


def own_extents(mask: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """Per image `(bs,)` the height and width its own map is padded to: its real rows and
    columns (`mask (bs, h, w)`, top-left) rounded up to a multiple of `window`."""
    rows = jnp.sum(mask[:, :, 0], 1, dtype=jnp.int32)
    cols = jnp.sum(mask[:, 0, :], 1, dtype=jnp.int32)
    return (rows + window - 1) // window * window, (cols + window - 1) // window * window


def own_shift_indices(extent: jax.Array, size: int, shift: int) -> jax.Array:
    """`(bs, size)` source of each position of a roll by `-shift` modulo each image's `extent`
    `(bs,)`: `(j + shift) mod extent` below the extent, `j` past it (a negative `shift`
    undoes a positive one)."""
    j = jnp.arange(size, dtype=jnp.int32)[None]
    extent = extent[:, None]
    return jnp.where(j < extent, (j + shift) % jnp.maximum(extent, 1), j)


def own_cyclic_shift(x: jax.Array, extents: tuple[jax.Array, jax.Array], shift: int) -> jax.Array:
    """`(bs, H, W, c)` rolled by `(-shift, -shift)` within each image's own `extents` (rows,
    columns): `jnp.roll` of each image's padded map, with positions past it unmoved."""
    rows = own_shift_indices(extents[0], x.shape[1], shift)
    cols = own_shift_indices(extents[1], x.shape[2], shift)

    def one(image, r, c):  # (H, W, c) gathered by rows, then by columns
        image = jnp.take(image, r, axis=0, mode="clip")
        return jnp.take(image, c, axis=1, mode="clip")

    return jax.vmap(one)(x, rows, cols)


def own_shift_mask(
    extents: tuple[jax.Array, jax.Array], height: int, width: int, window: int, shift: int
) -> jax.Array:
    """`(bs, nH * nW, window**2, window**2)`: `shift_mask` with each image's own padded
    `extents` in place of the map's (`height`, `width`, multiples of `window`)."""

    def regions(extent, size):  # (bs, size): 0, 1, 2 as transformers' slices of the extent
        j = jnp.arange(size, dtype=jnp.int32)[None]
        extent = extent[:, None]
        return (j >= extent - window).astype(jnp.int32) + (j >= extent - shift)

    ids = regions(extents[0], height)[:, :, None] * 3 + regions(extents[1], width)[:, None, :]
    bs = ids.shape[0]
    # (bs, nH * nW, window**2)
    windows = window_partition(ids[..., None], window)[..., 0].reshape(bs, -1, window * window)
    return jnp.where(windows[..., None, :] != windows[..., :, None], -100.0, 0.0)


def zero_outside(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`x (bs, h, w, c)` with zeros where `mask (bs, h, w)` is False (unchanged when None)."""
    if mask is None:
        return x
    return jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


class SwinPatchEmbeddings(nnx.Module):
    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        size, width = config.backbone_patch_size, config.backbone_hidden_sizes[0]
        self.patch_size = size
        self.projection = nnx.Conv(3, width, (size, size), strides=size, padding="VALID", rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """`(bs, H, W, 3)` -> `(bs, ceil(H / p), ceil(W / p), embed_dim)`."""
        _, height, width, _ = pixel_values.shape
        size = self.patch_size
        pad = ((0, 0), (0, -height % size), (0, -width % size), (0, 0))
        return self.projection(jnp.pad(pixel_values, pad))


class SwinEmbeddings(nnx.Module):
    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        self.patch_embeddings = SwinPatchEmbeddings(config, rngs=rngs)
        self.norm = layer_norm(config.backbone_hidden_sizes[0], rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.norm(self.patch_embeddings(pixel_values))


class SwinRelativePositionBias(nnx.Module):
    def __init__(self, num_heads: int, window: int, *, rngs: nnx.Rngs):
        del rngs
        self.window = window
        # ((2 window - 1)**2, heads), zero-initialised as in transformers
        self.relative_position_bias_table = nnx.Param(
            jnp.zeros(((2 * window - 1) ** 2, num_heads), jnp.float32)
        )

    def __call__(self) -> jax.Array:
        """`(heads, window**2, window**2)`."""
        area = self.window * self.window
        index = relative_position_index(self.window).reshape(-1)
        table = self.relative_position_bias_table[...]
        # (w*w, w*w, heads) -> (heads, w*w, w*w); `take`, not `table[index]`: jitted with x64
        # on, jax's indexing fails on the numpy int64 index (int32 vs int64 in its bounds fix)
        bias = jnp.take(table, index, axis=0, mode="clip").reshape(area, area, -1)
        return bias.transpose(2, 0, 1)


class SwinAttention(nnx.Module):
    """Multi-head self-attention within windows, plus the relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.q_proj = nnx.Linear(dim, dim, rngs=rngs)
        self.k_proj = nnx.Linear(dim, dim, rngs=rngs)
        self.v_proj = nnx.Linear(dim, dim, rngs=rngs)
        self.o_proj = nnx.Linear(dim, dim, rngs=rngs)
        self.relative_position_bias = SwinRelativePositionBias(num_heads, window, rngs=rngs)

    def __call__(self, windows: jax.Array, mask, bs: int) -> jax.Array:
        """`windows (bs * nwin, len_w, dim)`, `mask` None, `(nwin, len_w, len_w)` (every
        image's) or `(bs, nwin, len_w, len_w)` (each image's own) -> `windows`' shape."""
        n, length, dim = windows.shape
        head_dim = dim // self.num_heads

        def heads(x):  # (n, len_w, dim) -> (n, nheads, len_w, head_dim)
            return x.reshape(n, length, self.num_heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = (heads(p(windows)) for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = jnp.einsum("nhqd,nhkd->nhqk", q, k) * head_dim**-0.5
        scores = scores + self.relative_position_bias().astype(scores.dtype)[None]
        if mask is not None:
            mask = jnp.asarray(mask, scores.dtype)
            if mask.ndim == 3:
                mask = mask[None]
            # (bs, nwin, nheads, len_w, len_w) + (bs or 1, nwin, 1, len_w, len_w)
            scores = scores.reshape(bs, -1, self.num_heads, length, length)
            scores = scores + mask[:, :, None]
            scores = scores.reshape(n, self.num_heads, length, length)
        probs = jax.nn.softmax(scores, axis=-1)
        # (n, nheads, len_w, head_dim) -> (n, len_w, dim)
        out = jnp.einsum("nhqk,nhkd->nqhd", probs, v).reshape(n, length, dim)
        return self.o_proj(out)


class SwinMLP(nnx.Module):
    def __init__(self, dim: int, ratio: float, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, int(ratio * dim), rngs=rngs)
        self.fc2 = nnx.Linear(int(ratio * dim), dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwinLayer(nnx.Module):
    """One (shifted) window attention block: `(bs, h * w, dim)` -> same."""

    def __init__(self, config, dim, num_heads, rate, shift, *, rngs: nnx.Rngs):
        self.window = config.backbone_window_size
        self.shift = shift
        self.layernorm_before = layer_norm(dim, rngs)
        self.attention = SwinAttention(dim, num_heads, self.window, rngs=rngs)
        self.layernorm_after = layer_norm(dim, rngs)
        self.mlp = SwinMLP(dim, config.backbone_mlp_ratio, rngs=rngs)
        self.drop_path = drop_path(rate, 3, rngs)

    def __call__(
        self,
        x: jax.Array,
        height: int,
        width: int,
        deterministic: bool,
        real: jax.Array | None = None,
    ) -> jax.Array:
        """`real (bs, h, w)`: the real positions, or None (see the module docstring)."""
        bs, _, dim = x.shape
        window, shift = self.window, self.shift
        shortcut = x
        # (bs, h * w, dim) -> (bs, h, w, dim), zero-padded to window multiples
        x = zero_outside(self.layernorm_before(x).reshape(bs, height, width, dim), real)
        x = jnp.pad(x, ((0, 0), (0, -height % window), (0, -width % window), (0, 0)))
        padded_h, padded_w = x.shape[1:3]
        mask = extents = None
        if shift > 0 and real is None:
            x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
            mask = shift_mask(padded_h, padded_w, window, shift)
        elif shift > 0:
            extents = own_extents(real, window)
            x = own_cyclic_shift(x, extents, shift)
            mask = own_shift_mask(extents, padded_h, padded_w, window, shift)
        x = self.attention(window_partition(x, window), mask, bs)
        x = window_reverse(x, window, padded_h, padded_w)
        if shift > 0 and real is None:
            x = jnp.roll(x, (shift, shift), axis=(1, 2))
        elif shift > 0:
            x = own_cyclic_shift(x, extents, -shift)
        # (bs, h, w, dim) -> (bs, h * w, dim)
        x = x[:, :height, :width].reshape(bs, height * width, dim)
        if self.drop_path is not None:
            x = self.drop_path(x, deterministic=deterministic)
        x = shortcut + x
        return x + self.mlp(self.layernorm_after(x))


class SwinPatchMerging(nnx.Module):
    """`(bs, h * w, dim)` -> `(bs, ceil(h / 2) * ceil(w / 2), 2 dim)`."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.reduction = nnx.Linear(4 * dim, 2 * dim, use_bias=False, rngs=rngs)
        self.norm = layer_norm(4 * dim, rngs)

    def __call__(
        self, x: jax.Array, height: int, width: int, real: jax.Array | None = None
    ) -> jax.Array:
        """`real (bs, h, w)`: the real positions (the rest read as zeros), or None."""
        bs, _, dim = x.shape
        x = zero_outside(x.reshape(bs, height, width, dim), real)
        x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
        # (bs, h / 2, w / 2, 4 dim): (row, col) offsets (0,0), (1,0), (0,1), (1,1)
        x = jnp.concatenate([x[:, r::2, c::2] for c in range(2) for r in range(2)], -1)
        return self.reduction(self.norm(x.reshape(bs, -1, 4 * dim)))


class SwinStage(nnx.Module):
    def __init__(self, config, dim, depth, num_heads, rates, last, *, rngs: nnx.Rngs):
        shift = config.backbone_window_size // 2
        self.blocks = nnx.List(
            [
                SwinLayer(config, dim, num_heads, rates[i], 0 if i % 2 == 0 else shift, rngs=rngs)
                for i in range(depth)
            ]
        )
        self.downsample = None if last else SwinPatchMerging(dim, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        real: jax.Array | None = None,
        *,
        height: int,
        width: int,
        deterministic: bool,
    ) -> jax.Array:
        """The blocks (not the merging): `(bs, h * w, dim)` -> same; `real`: the stage's real
        positions `(bs, h, w)`, or None."""
        for block in self.blocks:
            x = block(x, height, width, deterministic, real)
        return x


class SwinEncoder(nnx.Module):
    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        depths = config.backbone_depths
        rates = drop_path_rates(config.backbone_drop_path_rate, depths)
        self.layers = nnx.List(
            [
                SwinStage(
                    config,
                    config.backbone_hidden_sizes[i],
                    depths[i],
                    config.backbone_num_heads[i],
                    rates[i],
                    i == len(depths) - 1,
                    rngs=rngs,
                )
                for i in range(len(depths))
            ]
        )
        self.remat = stage_flags(config.backbone_remat, len(depths))

    def __call__(
        self, x: jax.Array, deterministic: bool, masks: list[jax.Array] | None = None
    ) -> list[jax.Array]:
        """`(bs, h, w, embed_dim)` -> every stage's output before merging `(bs, h_i, w_i, c_i)`,
        h_i = ceil(h_{i-1} / 2); `masks`: every stage's real positions, or None."""
        bs, height, width, dim = x.shape
        x = x.reshape(bs, height * width, dim)
        outputs = []
        for i, (stage, remat) in enumerate(zip(self.layers, self.remat)):
            real = None if masks is None else masks[i]
            x = call_stage(
                stage, remat, x, real, height=height, width=width, deterministic=deterministic
            )
            outputs.append(x.reshape(bs, height, width, x.shape[-1]))
            if stage.downsample is not None:
                x = stage.downsample(x, height, width, real)
                height, width = (height + 1) // 2, (width + 1) // 2
        return outputs


class SwinModel(nnx.Module):
    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        self.embeddings = SwinEmbeddings(config, rngs=rngs)
        self.encoder = SwinEncoder(config, rngs=rngs)
        # transformers' SwinModel.layernorm: in its state dict, unused by the backbone
        self.layernorm = layer_norm(config.backbone_hidden_sizes[-1], rngs)


class SwinBackbone(nnx.Module):
    """`swin` + the `out_stages` outputs through their own layer norms."""

    def __init__(self, config: DeformableDetrConfig, *, rngs: nnx.Rngs):
        self.swin = SwinModel(config, rngs=rngs)
        self.out_stages = config.backbone_out_stages
        self.patch_size = config.backbone_patch_size
        self.num_stages = len(config.backbone_depths)
        self.hidden_states_norms = nnx.Dict(
            {
                f"stage{i + 1}": layer_norm(config.backbone_hidden_sizes[i], rngs)
                for i in self.out_stages
            }
        )

    def stage_masks(self, pixel_mask: jax.Array) -> list[jax.Array]:
        """Every stage's real positions `(bs, h_i, w_i)` of top-left images whose pixels are
        `pixel_mask (bs, H, W)`: a patch is real when its first pixel is, a merged one when its
        first of four is."""
        p = self.patch_size
        masks = [pixel_mask[:, ::p, ::p]]
        for _ in range(1, self.num_stages):
            masks.append(masks[-1][:, ::2, ::2])
        return masks

    def __call__(
        self,
        pixel_values: jax.Array,
        deterministic: bool = True,
        pixel_mask: jax.Array | None = None,
    ) -> list[jax.Array]:
        """`(bs, H, W, 3)` -> per out stage i `(bs, h_i, w_i, hidden_sizes[i])`, h_0 =
        ceil(H / patch_size), h_i = ceil(h_{i-1} / 2).

        With `pixel_mask (bs, H, W)` the padding is kept out (module docstring): real positions
        equal those of each image alone, unpadded."""
        masks = None
        if pixel_mask is not None:
            masks = self.stage_masks(pixel_mask)
            pixel_values = zero_outside(pixel_values, pixel_mask)
        stages = self.swin.encoder(self.swin.embeddings(pixel_values), deterministic, masks)
        return [self.hidden_states_norms[f"stage{i + 1}"](stages[i]) for i in self.out_stages]
