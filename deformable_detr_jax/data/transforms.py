"""The DETR training augmentations and the evaluation resize, as pure numpy functions.

Follows `datasets/transforms.py` and `make_coco_transforms` of facebookresearch/detr, which
fundamentalvision/Deformable-DETR reuses unchanged:

    train: RandomHorizontalFlip(0.5),
           RandomSelect(RandomResize(scales, max_size=1333),
                        Compose(RandomResize([400, 500, 600]), RandomSizeCrop(384, 600),
                                RandomResize(scales, max_size=1333)))
    eval:  RandomResize([800], max_size=1333)

with `scales = 480, 512, ..., 800`. Every size is a field of `AugmentConfig`, so small recipes use
small images (`AugmentConfig().scaled(0.25)`). Randomness comes only from the `np.random.Generator`
passed in, so an example's augmentation is reproducible from its seed.

A sample is a dict: `image (height, width, 3)` uint8, `boxes (n, 4)` float32 cxcywh normalised to
the image, `labels (n,)`, and optionally `masks (n, height, width)` bool, which follow the image
through every geometric step (the tests use them to check that boxes stay on their objects). Other
keys pass through unchanged. Resizing keeps normalised boxes as they are; flipping mirrors them;
cropping clips them and drops those left with no area, as DETR's `crop` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import PIL.Image

from deformable_detr_jax.box_format import cxcywh_to_xyxy, xyxy_to_cxcywh
from deformable_detr_jax.processing import resize as resize_lib

DETR_SCALES = tuple(range(480, 801, 32))

Sample = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Sizes and probabilities of the DETR augmentations (defaults: the paper's COCO recipe).

    `scales`: shortest-edge sizes of the final random resize, longest edge capped at `max_size`.
    `crop_prob`: probability of the crop branch (resize to one of `crop_resize_scales`, crop a
    random `crop_size[0]..crop_size[1]` region, then the final random resize).
    `eval_size` / `eval_max_size`: the single evaluation resize.
    `resize_backend`: "pil" (as DETR's transforms on PIL images; fast) or "torchvision".
    """

    scales: tuple[int, ...] = DETR_SCALES
    max_size: int = 1333
    flip_prob: float = 0.5
    crop_prob: float = 0.5
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)
    eval_size: int = 800
    eval_max_size: int = 1333
    resize_backend: str = "pil"

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("scales", "crop_resize_scales", "crop_size"):
            fix(name, tuple(int(v) for v in getattr(self, name)))
        sizes = {
            "scales": self.scales,
            "crop_resize_scales": self.crop_resize_scales,
            "crop_size": self.crop_size,
            "max_size": (self.max_size,),
            "eval_size": (self.eval_size,),
            "eval_max_size": (self.eval_max_size,),
        }
        for name, values in sizes.items():
            if not values or min(values) < 1:
                raise ValueError(f"AugmentConfig.{name} must be positive sizes, got {values}")
        if len(self.crop_size) != 2 or self.crop_size[0] > self.crop_size[1]:
            raise ValueError(f"AugmentConfig.crop_size is (min, max), got {self.crop_size}")
        for name in ("flip_prob", "crop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"AugmentConfig.{name} must lie in [0, 1], got {getattr(self, name)}"
                )
        if self.resize_backend not in resize_lib.BACKENDS:
            raise ValueError(
                f"AugmentConfig.resize_backend must be one of {resize_lib.BACKENDS}, "
                f"got {self.resize_backend!r}"
            )

    @property
    def max_side(self) -> int:
        """The longest side any transform here can output (buckets must reach it)."""
        return max(self.max_size, self.eval_max_size)

    def scaled(self, factor: float, step: int = 8) -> AugmentConfig:
        """Every size times `factor`, rounded to a multiple of `step`: `scaled(0.25)` gives
        scales 120..200, max 333, crops 96..150 of 104/128/152, eval 200 / 333."""

        def size(value: int) -> int:
            return max(step, int(round(value * factor / step)) * step)

        return dataclasses.replace(
            self,
            scales=tuple(sorted({size(s) for s in self.scales})),
            max_size=max(1, int(round(self.max_size * factor))),
            crop_resize_scales=tuple(sorted({size(s) for s in self.crop_resize_scales})),
            crop_size=(size(self.crop_size[0]), size(self.crop_size[1])),
            eval_size=size(self.eval_size),
            eval_max_size=max(1, int(round(self.eval_max_size * factor))),
        )


# ----------------------------------------------------------------------------- geometric steps


def hflip(sample: Sample) -> dict[str, Any]:
    """Mirror left-right: image columns reversed, box centres at 1 - cx."""
    out = dict(sample)
    out["image"] = np.ascontiguousarray(sample["image"][:, ::-1])
    boxes = np.array(sample["boxes"], dtype=np.float32).reshape(-1, 4)
    boxes[:, 0] = 1.0 - boxes[:, 0]
    out["boxes"] = boxes
    if "masks" in sample:
        out["masks"] = np.ascontiguousarray(sample["masks"][:, :, ::-1])
    return out


def _resize_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """`(n, h, w)` bool -> `(n, height, width)` bool: bilinear on 0/255, thresholded at half."""
    out = np.zeros((masks.shape[0], height, width), dtype=bool)
    for i, mask in enumerate(masks):
        pil = PIL.Image.fromarray(mask.astype(np.uint8) * 255)
        out[i] = np.asarray(pil.resize((width, height), PIL.Image.Resampling.BILINEAR)) >= 128
    return out


def resize(sample: Sample, height: int, width: int, *, backend: str = "pil") -> dict[str, Any]:
    """Resize to exactly (height, width); normalised boxes are unchanged."""
    out = dict(sample)
    image = sample["image"]
    if image.shape[:2] != (height, width):
        out["image"] = resize_lib.resize(image, height, width, backend=backend)
        if "masks" in sample:
            out["masks"] = _resize_masks(sample["masks"], height, width)
    return out


def resize_shortest_edge(
    sample: Sample, size: int, max_size: int | None = None, *, backend: str = "pil"
) -> dict[str, Any]:
    """Shortest edge to `size`, longest edge at most `max_size` (DETR's `resize`)."""
    image_size = sample["image"].shape[:2]
    height, width = resize_lib.size_for_shortest_longest(image_size, size, max_size)
    return resize(sample, height, width, backend=backend)


def crop(sample: Sample, top: int, left: int, height: int, width: int) -> dict[str, Any]:
    """Cut the region `[top, top + height) x [left, left + width)`; boxes are clipped to it and
    those with no area left are dropped (with their labels and masks)."""
    out = dict(sample)
    image = sample["image"]
    image_height, image_width = image.shape[:2]
    if not (
        0 <= top and 0 <= left and top + height <= image_height and left + width <= image_width
    ):
        raise ValueError(
            f"crop region top={top}, left={left}, height={height}, width={width} is outside the "
            f"{image_height} x {image_width} image"
        )
    out["image"] = image[top : top + height, left : left + width]
    boxes = np.asarray(sample["boxes"], dtype=np.float32).reshape(-1, 4)
    scale = np.asarray([image_width, image_height] * 2, dtype=np.float32)
    # (n, 4) cxcywh normalised -> x0, y0, x1, y1 pixels of the crop
    xyxy = cxcywh_to_xyxy(boxes)
    xyxy = xyxy * scale - np.asarray([left, top, left, top], dtype=np.float32)
    xyxy = np.clip(xyxy, 0, np.asarray([width, height, width, height], dtype=np.float32))
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    xyxy = xyxy[keep]
    new_scale = np.asarray([width, height] * 2, dtype=np.float32)
    out["boxes"] = (xyxy_to_cxcywh(xyxy) / new_scale).astype(np.float32)
    out["labels"] = np.asarray(sample["labels"])[keep]
    if "masks" in sample:
        out["masks"] = sample["masks"][keep, top : top + height, left : left + width]
    return out


# ----------------------------------------------------------------------------- random steps


def random_resize(
    sample: Sample,
    rng: np.random.Generator,
    scales: tuple[int, ...],
    max_size: int | None = None,
    *,
    backend: str = "pil",
) -> dict[str, Any]:
    """Shortest edge to a size drawn uniformly from `scales` (DETR's `RandomResize`)."""
    size = scales[int(rng.integers(len(scales)))]
    return resize_shortest_edge(sample, size, max_size, backend=backend)


def random_size_crop(
    sample: Sample, rng: np.random.Generator, min_size: int, max_size: int
) -> dict[str, Any]:
    """A random crop of width and height in `min_size..max_size` (DETR's `RandomSizeCrop`);
    sides are capped at the image's, so a small image is cropped to at most itself."""
    image_height, image_width = sample["image"].shape[:2]
    width = int(rng.integers(min(min_size, image_width), min(image_width, max_size) + 1))
    height = int(rng.integers(min(min_size, image_height), min(image_height, max_size) + 1))
    top = int(rng.integers(0, image_height - height + 1))
    left = int(rng.integers(0, image_width - width + 1))
    return crop(sample, top, left, height, width)


def train_transform(
    sample: Sample, rng: np.random.Generator, config: AugmentConfig = AugmentConfig()
) -> dict[str, Any]:
    """DETR's training augmentation: flip, then multi-scale resize or resize + crop + resize."""
    backend = config.resize_backend
    if rng.random() < config.flip_prob:
        sample = hflip(sample)
    if rng.random() < config.crop_prob:
        sample = random_resize(sample, rng, config.crop_resize_scales, backend=backend)
        sample = random_size_crop(sample, rng, *config.crop_size)
    return random_resize(sample, rng, config.scales, config.max_size, backend=backend)


def eval_transform(sample: Sample, config: AugmentConfig = AugmentConfig()) -> dict[str, Any]:
    """The evaluation resize: shortest edge `eval_size`, longest at most `eval_max_size`."""
    return resize_shortest_edge(
        sample, config.eval_size, config.eval_max_size, backend=config.resize_backend
    )
