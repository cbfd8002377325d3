"""The `"pallas_tpu"` kernels' layouts, padding and block ranges, done with XLA around the
`pallas_call`s (`pallas_tpu.py`).

  - value -> `(bs, nheads, head_dim, len_v_pad)`, every level zero-padded to a multiple of
    `block_v` (`pad_levels`), so a pixel block never straddles two levels and the level of
    a block is a static range of block indices (`level_blocks`);
  - locations and weights -> `(bs, nheads, rows, len_q_pad)` in the accumulation dtype,
    queries zero-padded to a multiple of `block_q` (`query_major`; padded queries have
    weight 0);
  - per (batch, query block, level) the range of pixel blocks the block's corners can reach
    (`block_ranges`), the table the kernels get by scalar prefetch and the value BlockSpec
    clamps its block index into (`value_index_map`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def level_blocks(spatial_shapes, block_v: int) -> tuple[int, ...]:
    """First pixel-block index of every level in the padded layout, plus the total."""
    firsts = [0]
    for height, width in spatial_shapes:
        firsts.append(firsts[-1] + _round_up(height * width, block_v) // block_v)
    return tuple(firsts)


def block_ranges(spatial_shapes, sampling_locations, level_blocks, block_q, block_v, len_q_pad):
    """Per (batch, query block, level) the [lo, hi] pixel blocks any corner can touch.

    Row-granular and one row wider on each side than the corners, so that float rounding
    that differs from the kernel's cannot drop a corner. Untouched levels get lo > hi with
    hi = the level's first block (a valid index for the value BlockSpec to sit on).

    Returns:
      `(bs * num_q_blocks * nlevels * 2,)` int32.
    """
    bs, len_q, _, nlevels, _, _ = sampling_locations.shape
    num_q_blocks = len_q_pad // block_q
    loc = sampling_locations.astype(jnp.float32)
    ranges = []
    for level, (height, width) in enumerate(spatial_shapes):
        # (bs, len_q, nheads, npoints)
        x = loc[:, :, :, level, :, 0] * width - 0.5
        y = loc[:, :, :, level, :, 1] * height - 0.5
        near = (x > -2) & (x < width + 1) & (y > -2) & (y < height + 1)
        y0 = jnp.floor(jnp.clip(y, -2.0, height + 1.0)).astype(jnp.int32)
        first_pixel = jnp.clip(y0 - 1, 0, height - 1) * width
        last_pixel = jnp.clip(y0 + 2, 0, height - 1) * width + width - 1
        big = jnp.iinfo(jnp.int32).max
        lo = jnp.where(near, first_pixel // block_v, big)
        hi = jnp.where(near, last_pixel // block_v, -1)
        # (bs, len_q) -> (bs, num_q_blocks, block_q)
        pad = ((0, 0), (0, len_q_pad - len_q))
        lo = jnp.pad(lo.min(axis=(2, 3)), pad, constant_values=big)
        hi = jnp.pad(hi.max(axis=(2, 3)), pad, constant_values=-1)
        lo = lo.reshape(bs, num_q_blocks, block_q).min(axis=2)
        hi = hi.reshape(bs, num_q_blocks, block_q).max(axis=2)
        first, end = level_blocks[level], level_blocks[level + 1]
        touched = lo <= hi
        ranges.append(
            jnp.stack(
                [jnp.where(touched, lo + first, end), jnp.where(touched, hi + first, first)], -1
            )
        )
    # (bs, num_q_blocks, nlevels, 2)
    return jnp.stack(ranges, axis=2).reshape(-1)


def value_index_map(b, h, q_block, v_block, ranges_ref, *, level_blocks, num_q_blocks):
    """Clamps the pixel block into the reachable range of its level (skipped steps re-use
    the resident block: no DMA)."""
    nlevels = len(level_blocks) - 1
    level = sum((v_block >= first).astype(jnp.int32) for first in level_blocks[1:nlevels])
    entry = ((b * num_q_blocks + q_block) * nlevels + level) * 2
    lo, hi = ranges_ref[entry], ranges_ref[entry + 1]
    return b, h, 0, jnp.minimum(jnp.maximum(v_block, lo), hi)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static sizes of one call, shared by the forward and backward kernels."""

    spatial_shapes: tuple[tuple[int, int], ...]
    bs: int
    len_q: int
    len_q_pad: int
    nheads: int
    head_dim: int
    npoints: int
    block_q: int
    block_v: int
    level_blocks: tuple[int, ...]

    @classmethod
    def of(cls, value, spatial_shapes, sampling_locations, block_sizes) -> Layout:
        bs, _, nheads, head_dim = value.shape
        _, len_q, _, _, npoints, _ = sampling_locations.shape
        return cls(
            spatial_shapes=spatial_shapes,
            bs=bs,
            len_q=len_q,
            len_q_pad=_round_up(len_q, block_sizes.block_q),
            nheads=nheads,
            head_dim=head_dim,
            npoints=npoints,
            block_q=block_sizes.block_q,
            block_v=block_sizes.block_v,
            level_blocks=level_blocks(spatial_shapes, block_sizes.block_v),
        )

    @property
    def nlevels(self) -> int:
        return len(self.spatial_shapes)

    @property
    def num_q_blocks(self) -> int:
        return self.len_q_pad // self.block_q

    @property
    def len_v_pad(self) -> int:
        return self.level_blocks[-1] * self.block_v

    def kernel_args(self) -> dict:
        return dict(
            spatial_shapes=self.spatial_shapes,
            level_blocks=self.level_blocks,
            npoints=self.npoints,
            num_q_blocks=self.num_q_blocks,
            block_q=self.block_q,
            block_v=self.block_v,
        )

    def grid(self) -> tuple[int, int, int, int]:
        return (self.bs, self.nheads, self.num_q_blocks, self.level_blocks[-1])

    def query_spec(self, rows: int) -> pl.BlockSpec:
        """`(bs, nheads, rows, len_q_pad)` arrays, one query block per step."""
        return pl.BlockSpec((None, None, rows, self.block_q), lambda b, h, q, v, r: (b, h, 0, q))


def pad_levels(value_t, layout: Layout):
    """`(bs, nheads, head_dim, len_v)` -> `(..., len_v_pad)`, every level zero-padded to a
    multiple of `block_v`."""
    segments, start = [], 0
    for height, width in layout.spatial_shapes:
        size = height * width
        pad = _round_up(size, layout.block_v) - size
        segments.append(jnp.pad(value_t[..., start : start + size], ((0, 0),) * 3 + ((0, pad),)))
        start += size
    return jnp.concatenate(segments, axis=-1)


def unpad_levels(value_t, layout: Layout):
    """The inverse of `pad_levels`."""
    segments = []
    for level, (height, width) in enumerate(layout.spatial_shapes):
        start = layout.level_blocks[level] * layout.block_v
        segments.append(value_t[..., start : start + height * width])
    return jnp.concatenate(segments, axis=-1)


def query_major(x, layout: Layout, acc_dtype):
    """`(bs, len_q, nheads, ...)` -> `(bs, nheads, prod(...), len_q_pad)` in `acc_dtype`,
    queries zero-padded (padded queries have weight 0)."""
    bs, len_q, nheads = x.shape[:3]
    x = jnp.moveaxis(x.astype(acc_dtype), 1, -1).reshape(bs, nheads, -1, len_q)
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, layout.len_q_pad - len_q)))


def from_query_major(x_t, layout: Layout, shape, dtype):
    """The inverse of `query_major`: `(bs, nheads, rows, len_q_pad)` -> `shape`
    `(bs, len_q, nheads, ...)` in `dtype`."""
    bs, len_q, nheads = shape[:3]
    x = x_t[..., :len_q].reshape(bs, nheads, *shape[3:], len_q)
    return jnp.moveaxis(x, -1, 1).astype(dtype)


def kernel_inputs(value, spatial_shapes, sampling_locations, attention_weights, layout):
    """`(acc_dtype, locations, weights, ranges)`: the kernels' accumulation dtype, and the
    locations, weights and range table in the kernels' layouts."""
    acc_dtype = jnp.promote_types(value.dtype, jnp.float32)
    # (bs, len_q, nheads, nlevels, npoints, 2) -> (bs, nheads, nlevels * npoints * 2, len_q_pad)
    loc_t = query_major(sampling_locations, layout, acc_dtype)
    # (bs, len_q, nheads, nlevels, npoints) -> (bs, nheads, nlevels * npoints, len_q_pad)
    attn_t = query_major(attention_weights, layout, acc_dtype)
    ranges = block_ranges(
        spatial_shapes,
        sampling_locations,
        layout.level_blocks,
        layout.block_q,
        layout.block_v,
        layout.len_q_pad,
    )
    return acc_dtype, loc_t, attn_t, ranges


__all__ = [
    "Layout",
    "block_ranges",
    "from_query_major",
    "kernel_inputs",
    "level_blocks",
    "pad_levels",
    "query_major",
    "unpad_levels",
    "value_index_map",
]
