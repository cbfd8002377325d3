"""Synthetic shapes: coloured circles, squares and triangles on textured backgrounds.

A random-access detection dataset generated on the fly, so that the project trains and is tested
with no download. Image `index` is a pure function of `(seed, index)`: the same index always gives
the same pixels and boxes, in any process, in any order. Shapes are drawn aliased (a pixel belongs
to a shape when its centre does) and never overlap, so each box is exactly the extent of its
shape's pixels. The class is the shape (0 circle, 1 square, 2 triangle), never the colour: colours
are random per object, backgrounds are two-colour textures (stripes, checks or smooth blobs) with
pixel noise, chosen far enough from the object colours that the task is learnable at 128-256 px.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from deformable_detr_jax.box_format import xyxy_to_cxcywh

SHAPE_NAMES = ("circle", "square", "triangle")
BACKGROUNDS = ("stripes", "checks", "blobs")

_MIN_COLOR_DISTANCE = 110.0  # RGB L2 between an object and either background colour
_MIN_OBJECT_PIXELS = 8  # smallest shape side in pixels


@dataclasses.dataclass(frozen=True)
class ShapesSource:
    """`num_images` synthetic images of `image_size` (an int or (height, width)).

    Each image holds `min_objects..max_objects` shapes whose side is a uniform fraction
    `min_object_size..max_object_size` of the shorter image side, on one of `backgrounds` (a
    subset of `BACKGROUNDS`; "checks" is the hardest next to squares). Records are
    `{"image": (height, width, 3) uint8, "boxes": (n, 4) float32 cxcywh in [0, 1], "labels": (n,)
    int32, "image_id": index}`.
    """

    num_images: int
    image_size: int | tuple[int, int] = 128
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 3
    min_object_size: float = 0.15
    max_object_size: float = 0.4
    backgrounds: tuple[str, ...] = BACKGROUNDS

    label_names = SHAPE_NAMES
    num_labels = len(SHAPE_NAMES)

    def __post_init__(self):
        size = self.image_size
        size = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)
        object.__setattr__(self, "image_size", size)
        if len(size) != 2 or min(size) < 16:
            raise ValueError(f"ShapesSource image_size must be >= 16 px per side, got {size}")
        if self.num_images < 1:
            raise ValueError(f"ShapesSource num_images must be positive, got {self.num_images}")
        if not 0 <= self.min_objects <= self.max_objects or self.max_objects < 1:
            raise ValueError(
                "ShapesSource needs 0 <= min_objects <= max_objects and max_objects >= 1, got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if not 0 < self.min_object_size <= self.max_object_size <= 0.9:
            raise ValueError(
                "ShapesSource needs 0 < min_object_size <= max_object_size <= 0.9 (fractions of "
                f"the shorter side), got {self.min_object_size}, {self.max_object_size}"
            )
        object.__setattr__(self, "backgrounds", tuple(self.backgrounds))
        if not self.backgrounds or not set(self.backgrounds) <= set(BACKGROUNDS):
            raise ValueError(
                f"ShapesSource backgrounds must be a non-empty subset of {BACKGROUNDS}, "
                f"got {self.backgrounds}"
            )
        if self.min_object_size * min(size) < _MIN_OBJECT_PIXELS:
            raise ValueError(
                f"ShapesSource min_object_size={self.min_object_size} of {min(size)} px is under "
                f"{_MIN_OBJECT_PIXELS} px; raise min_object_size or image_size"
            )

    def __len__(self) -> int:
        return self.num_images

    def describe(self, index: int) -> str:
        return f"shapes image {index} (seed {self.seed})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, _ = self.render(index)
        return record

    def render(self, index: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The record of image `index` and what was drawn: `masks (n, height, width)` bool and
        `colors (n, 3)` uint8 (each shape is filled with exactly its colour)."""
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"shapes index {index} out of range [0, {self.num_images})")
        rng = np.random.default_rng([self.seed, index])
        height, width = self.image_size
        image, background_colors = _background(rng, height, width, self.backgrounds)

        num_objects = int(rng.integers(self.min_objects, self.max_objects + 1))
        masks, colors, labels, boxes_xyxy = [], [], [], []
        for _ in range(num_objects):
            placed = _place_shape(
                rng, height, width, self.min_object_size, self.max_object_size, boxes_xyxy
            )
            if placed is None:  # no free room left: fewer objects in this image
                break
            label, mask, box = placed
            color = _object_color(rng, background_colors + colors)
            image[mask] = color
            masks.append(mask)
            colors.append(color)
            labels.append(label)
            boxes_xyxy.append(box)

        boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
        # (n, 4) pixel x0, y0, x1, y1 -> cx, cy, w, h normalised
        scale = np.asarray([width, height, width, height], dtype=np.float32)
        boxes = xyxy_to_cxcywh(boxes)
        record = {
            "image": image,
            "boxes": (boxes / scale).astype(np.float32),
            "labels": np.asarray(labels, dtype=np.int32),
            "image_id": index,
        }
        drawn = {
            "masks": np.asarray(masks, dtype=bool).reshape(-1, height, width),
            "colors": np.asarray(colors, dtype=np.uint8).reshape(-1, 3),
        }
        return record, drawn


# ----------------------------------------------------------------------------- drawing


def _background(rng: np.random.Generator, height: int, width: int, kinds: tuple[str, ...]):
    """A two-colour texture with pixel noise; returns it (uint8) and its two colours."""
    color_a, color_b = (rng.uniform(30, 225, size=3).astype(np.float32) for _ in range(2))
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "stripes":  # at a random angle and period
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 24)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
        t = 0.5 + 0.5 * np.sin(phase)
    elif kind == "checks":
        cell = rng.integers(6, 24)
        t = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
    else:  # smooth blobs: a coarse random grid upsampled bilinearly
        grid = rng.random((5, 5)).astype(np.float32)
        gy, gx = np.broadcast_arrays(yy / max(height - 1, 1) * 4, xx / max(width - 1, 1) * 4)
        y0, x0 = np.minimum(gy.astype(int), 3), np.minimum(gx.astype(int), 3)
        fy, fx = gy - y0, gx - x0
        t = (
            grid[y0, x0] * (1 - fy) * (1 - fx)
            + grid[y0 + 1, x0] * fy * (1 - fx)
            + grid[y0, x0 + 1] * (1 - fy) * fx
            + grid[y0 + 1, x0 + 1] * fy * fx
        )
    # (height, width, 3) blend of the two colours, plus noise
    image = color_a + (color_b - color_a) * t[..., None]
    image += rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(6.0)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image, [color_a.astype(np.uint8), color_b.astype(np.uint8)]


def _object_color(rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
    """A saturated colour at least `_MIN_COLOR_DISTANCE` from every colour in `avoid`."""
    best, best_distance = None, -1.0
    for _ in range(64):
        color = rng.integers(0, 256, size=3)
        color[rng.integers(3)] = rng.choice([0, 255])  # push one channel to an extreme
        distance = min(np.linalg.norm(color - a.astype(np.float64)) for a in avoid)
        if distance >= _MIN_COLOR_DISTANCE:
            return color.astype(np.uint8)
        if distance > best_distance:
            best, best_distance = color, distance
    return best.astype(np.uint8)


def _shape_mask(label: int, cx: float, cy: float, side: float, flip: bool, height, width):
    """`(height, width)` bool: pixels whose centre lies inside the shape."""
    half = side / 2
    # only the window around the shape is evaluated
    top, left = max(int(cy - half) - 1, 0), max(int(cx - half) - 1, 0)
    bottom, right = min(int(cy + half) + 2, height), min(int(cx + half) + 2, width)
    yy, xx = np.mgrid[top:bottom, left:right].astype(np.float64) + 0.5
    if label == 0:  # circle of diameter `side`
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= half**2
    elif label == 1:  # axis-aligned square
        inside = (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    else:  # triangle with a horizontal base of `side`, apex up (or down when `flip`)
        v = (yy - (cy - half)) / side  # 0 at the apex row, 1 at the base row
        if flip:
            v = 1 - v
        inside = (v >= 0) & (v <= 1) & (np.abs(xx - cx) <= half * v)
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = inside
    return mask


def _place_shape(rng, height, width, min_size, max_size, taken, tries: int = 30):
    """(label, mask, pixel box x0, y0, x1, y1) of a shape clear of the boxes `taken`, or None."""
    short = min(height, width)
    for _ in range(tries):
        label = int(rng.integers(len(SHAPE_NAMES)))
        side = max(rng.uniform(min_size, max_size) * short, _MIN_OBJECT_PIXELS)
        cx = rng.uniform(side / 2 + 1, width - side / 2 - 1)
        cy = rng.uniform(side / 2 + 1, height - side / 2 - 1)
        flip = bool(rng.integers(2))
        mask = _shape_mask(label, cx, cy, side, flip, height, width)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size < 3 or cols.size < 3:
            continue
        box = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        gap = 2  # pixels kept free between shapes
        if all(
            box[0] >= t[2] + gap
            or t[0] >= box[2] + gap
            or box[1] >= t[3] + gap
            or t[1] >= box[3] + gap
            for t in taken
        ):
            return label, mask, box
    return None
