"""Pre-processing for Deformable DETR: images -> `pixel_values` + `pixel_mask` (+ training labels).

Equivalent to transformers 5's `DeformableDetrImageProcessor` (`models/deformable_detr/
image_processing_deformable_detr.py`, torchvision backend, the default) and to its PIL twin
`DeformableDetrImageProcessorPil` (`resize_backend="pil"`): resize (shortest/longest edge, exact
height/width, or max height/width), rescale by 1/255, normalise with the ImageNet mean/std, pad
bottom-right with zeros and return a mask that is True on real pixels.
`ImageProcessor.from_pretrained` reads a hub `preprocessor_config.json`, legacy forms
(`"size": 800` + `"max_size"`, `"pad_and_return_pixel_mask"`) included.

Differences from transformers, on purpose:
- Output is NHWC numpy: `pixel_values [bs, height, width, 3]` float32, `pixel_mask [bs, height,
  width]` bool.
- Grayscale and RGBA inputs are always converted to RGB (transformers needs `do_convert_rgb=True`).
- Shape buckets: with `buckets` set, the padded height and width are each rounded up to the next
  allowed size, so a stream of differently sized images compiles a handful of programs. Padding is
  zeros under a False mask, so the model's output does not depend on the bucket.
- Label boxes stay normalised to the resized, unpadded image (as in the original Deformable DETR
  and this package's model); transformers re-normalises them to the padded batch size, which would
  make labels depend on the bucket and on the other images of the batch. `labels[i]["size"]` is the
  unpadded size for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deformable_detr_jax.processing import resize as resize_lib
from deformable_detr_jax.processing.annotations import convert_coco_detection_annotation
from deformable_detr_jax.processing.images import (
    ImageError,
    ImageLike,
    as_image_list,
    describe_image,
    to_rgb_array,
)
from deformable_detr_jax.processing.postprocessing import post_process_object_detection

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
CONFIG_NAME = "preprocessor_config.json"
# The smallest input side the model takes: one cell of the backbone's stride-32 level. Smaller
# images are padded up to it (mask False) by `Detector` and the training batches; exports refuse
# smaller sizes.
MIN_SIDE = 32


# Keys a hub preprocessor_config.json may carry that mean nothing here (or are always on here).
_IGNORED_CONFIG_KEYS = frozenset(
    {
        "image_processor_type",
        "feature_extractor_type",
        "processor_class",
        "_processor_class",
        "do_convert_rgb",
        "return_segmentation_masks",
        "data_format",
        "input_data_format",
        "device",
        "disable_grouping",
        "return_tensors",
        "default_to_square",
        "max_size",
        "pad_and_return_pixel_mask",
    }
)
_SIZE_KEY_SETS = (
    frozenset({"shortest_edge", "longest_edge"}),
    frozenset({"height", "width"}),
    frozenset({"max_height", "max_width"}),
)


# ----------------------------------------------------------------------------- settings helpers


def _size_dict(size: Any, max_size: int | None = None) -> dict[str, int]:
    """A transformers `size` (dict, legacy int + `max_size`, or (height, width)) as a dict."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        out = {"shortest_edge": int(size), "longest_edge": int(max_size if max_size else 1333)}
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        out = {"height": int(size[0]), "width": int(size[1])}
    elif isinstance(size, Mapping):
        out = {str(k): int(v) for k, v in size.items()}
    else:
        raise ValueError(f"size must be a dict, an int or (height, width), got {size!r}")
    if frozenset(out) not in _SIZE_KEY_SETS:
        raise ValueError(
            f"size {out} has keys {sorted(out)}; expected one of "
            "{'shortest_edge', 'longest_edge'}, {'height', 'width'} or {'max_height', 'max_width'}"
        )
    if any(v < 1 for v in out.values()):
        raise ValueError(f"size values must be positive, got {out}")
    return out


def _per_channel(value: Any, name: str) -> tuple[float, float, float]:
    values = (
        np.broadcast_to(np.asarray(value, dtype=np.float64), (3,)) if np.ndim(value) == 0 else value
    )
    if len(values) != 3:
        raise ValueError(f"{name} needs 1 or 3 values (one per RGB channel), got {value!r}")
    return tuple(float(v) for v in values)


def bucket_sizes(max_side: int, step: int = 128) -> tuple[int, ...]:
    """Allowed padded side lengths: the multiples of `step` below `max_side`, then `max_side`.

    `bucket_sizes(1333)` -> (128, 256, ..., 1280, 1333): a COCO photo resized to 800 x 1066 pads
    to 896 x 1152.
    """
    if step < 1 or max_side < 1:
        raise ValueError(
            f"step and max_side must be positive, got step={step}, max_side={max_side}"
        )
    return tuple(range(step, max_side, step)) + (max_side,)


def _round_up(side: int, buckets: tuple[int, ...] | None) -> int:
    """The smallest bucket >= `side`; `side` itself past the largest bucket (or without buckets)."""
    for bucket in buckets or ():
        if bucket >= side:
            return bucket
    return side


# ----------------------------------------------------------------------------- images in


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Settings of the pre-processing, and `preprocess` / `post_process_object_detection`.

    Fields follow transformers' names (and `preprocessor_config.json` keys); `buckets` and
    `resize_backend` are this package's. `resize_backend="torchvision"` reproduces transformers'
    `DeformableDetrImageProcessor` as it runs with torchvision installed (its default); `"pil"`
    reproduces `DeformableDetrImageProcessorPil`, which is also what `DeformableDetrImageProcessor`
    falls back to without torchvision. They differ by one grey level on 0.1-1% of the values.
    """

    do_resize: bool = True
    size: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"shortest_edge": 800, "longest_edge": 1333}
    )
    resample: int = resize_lib.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    image_std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    do_pad: bool = True
    pad_size: tuple[int, int] | None = None
    do_convert_annotations: bool | None = None  # None: same as do_normalize, as in transformers
    format: str = "coco_detection"
    buckets: tuple[int, ...] | None = None
    resize_backend: str = "torchvision"

    def __hash__(self):  # `size` is a dict; hash the settings as they would be saved
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        fix("size", _size_dict(self.size))
        fix("resample", int(self.resample))
        fix("image_mean", _per_channel(self.image_mean, "image_mean"))
        fix("image_std", _per_channel(self.image_std, "image_std"))
        if self.do_convert_annotations is None:
            fix("do_convert_annotations", bool(self.do_normalize))
        if isinstance(self.pad_size, Mapping):
            fix("pad_size", (int(self.pad_size["height"]), int(self.pad_size["width"])))
        elif self.pad_size is not None:
            fix("pad_size", tuple(int(s) for s in self.pad_size))
        if self.buckets is not None:
            buckets = tuple(sorted({int(b) for b in self.buckets}))
            if not buckets or buckets[0] < 1:
                raise ValueError(f"buckets must be positive side lengths, got {self.buckets!r}")
            fix("buckets", buckets)
        if self.resize_backend not in resize_lib.BACKENDS:
            raise ValueError(
                f"resize_backend must be one of {resize_lib.BACKENDS}, got {self.resize_backend!r}"
            )
        if self.resize_backend == "torchvision" and self.resample != resize_lib.BILINEAR:
            raise ValueError(
                f"resample={self.resample}: resize_backend 'torchvision' is bilinear (resample=2) "
                "only; use resize_backend='pil' for other PIL filters"
            )
        if self.format not in ("coco_detection", "coco_panoptic"):
            raise ValueError(
                f"format must be 'coco_detection' or 'coco_panoptic', got {self.format!r}"
            )

    # ------------------------------------------------------------------ config files

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides: Any) -> ImageProcessor:
        """From a `preprocessor_config.json` dict, legacy keys included; `overrides` win."""
        # a None value means "the default", as in transformers
        config = {k: v for k, v in {**config, **overrides}.items() if v is not None}
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        if "size" in config:  # transformers applies max_size only next to an explicit size
            kwargs["size"] = _size_dict(config["size"], config.get("max_size"))
        if "do_pad" not in config and "pad_and_return_pixel_mask" in config:
            kwargs["do_pad"] = config["pad_and_return_pixel_mask"]
        unknown = sorted(set(config) - fields - _IGNORED_CONFIG_KEYS)
        if unknown:
            warnings.warn(
                f"ImageProcessor ignores unknown preprocessor config keys {unknown}", stacklevel=2
            )
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> ImageProcessor:
        """From a folder holding `preprocessor_config.json` (hub download or `save_pretrained`), or
        from the json file itself."""
        path = pathlib.Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no {CONFIG_NAME} at {file}; pass a folder holding one or the json file itself"
            )
        try:
            config = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from err
        return cls.from_dict(config, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """A `preprocessor_config.json` dict that transformers reads too (it ignores our extras)."""
        config = dataclasses.asdict(self)
        config["size"] = dict(self.size)
        config["image_mean"], config["image_std"] = list(self.image_mean), list(self.image_std)
        config["pad_size"] = (
            None
            if self.pad_size is None
            else {"height": self.pad_size[0], "width": self.pad_size[1]}
        )
        config["buckets"] = None if self.buckets is None else list(self.buckets)
        config["image_processor_type"] = "DeformableDetrImageProcessor"
        return config

    def save_pretrained(self, folder: str | os.PathLike) -> pathlib.Path:
        """Write `folder/preprocessor_config.json`; returns its path."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / CONFIG_NAME
        file.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return file

    def with_buckets(self, step: int = 128) -> ImageProcessor:
        """A copy that pads to `bucket_sizes(largest resized side, step)`."""
        if not self.do_resize:
            raise ValueError(
                "with_buckets() derives the buckets from `size`, unused with do_resize=False"
            )
        size = self.size
        max_side = size.get("longest_edge") or max(
            size.get("height", 0),
            size.get("width", 0),
            size.get("max_height", 0),
            size.get("max_width", 0),
        )
        return dataclasses.replace(self, buckets=bucket_sizes(max_side, step))

    # ------------------------------------------------------------------ pre-processing

    def resized_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) an image of `image_size` is resized to (itself with do_resize=False)."""
        if not self.do_resize:
            return tuple(image_size)
        return resize_lib.output_size(tuple(image_size), self.size)

    def padded_size(self, sizes: Sequence[tuple[int, int]], pad_to: tuple[int, int] | None = None):
        """(height, width) a batch of resized `sizes` is padded to: `pad_to`, else `pad_size`, else
        the batch maximum rounded up to `buckets`."""
        max_height = max(h for h, _ in sizes)
        max_width = max(w for _, w in sizes)
        target = pad_to if pad_to is not None else self.pad_size
        if target is None:
            return _round_up(max_height, self.buckets), _round_up(max_width, self.buckets)
        target = (int(target[0]), int(target[1]))
        for index, (h, w) in enumerate(sizes):
            if h > target[0] or w > target[1]:
                raise ValueError(
                    f"image {index} is {h} x {w} (height x width) after resizing, larger than the "
                    f"padded size {target[0]} x {target[1]}"
                )
        return target

    def load_image(self, image: ImageLike, index: int = 0) -> np.ndarray:
        """One input image (PIL, array or file path) as the checked `[height, width, 3]` RGB array
        `preprocess` starts from (uint8, or float for float input); `index` names it in errors."""
        return to_rgb_array(image, describe_image(index, image), self.resize_backend)

    def _normalize(self, image: np.ndarray) -> np.ndarray:
        """Rescale and normalise `[height, width, 3]` to float32 with the backend's float32 ops."""
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        if self.resize_backend == "torchvision":  # TorchvisionBackend.rescale_and_normalize (fused)
            if self.do_rescale and self.do_normalize:
                scale = np.float32(1.0 / self.rescale_factor)
                return (image.astype(np.float32) - mean * scale) / (std * scale)
            if self.do_rescale:
                return image.astype(np.float32) * np.float32(self.rescale_factor)
        elif self.do_rescale:  # image_transforms.rescale: float64 product, then float32
            image = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            return (image.astype(np.float32) - mean) / std
        return image.astype(np.float32)

    def preprocess(
        self,
        images: ImageLike | Sequence[ImageLike],
        annotations: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        *,
        pad_to: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """Images (PIL, uint8 or float arrays `[height, width(, 1|3|4)]`, or file paths; one or a
        list of mixed sizes) -> a batch.

        Returns `{"pixel_values": [bs, height, width, 3] float32, "pixel_mask": [bs, height, width]
        bool}` (True on real pixels), plus `"labels"` (one `convert_coco_detection_annotation` dict
        per image) when COCO detection `annotations` are given. `pad_to=(height, width)` overrides
        the padded size. Float arrays are taken as they are (rescaled by `rescale_factor` when
        `do_rescale`), as transformers does: pass `do_rescale=False` for floats already in [0, 1].
        """
        items = as_image_list(images)
        if annotations is not None:
            annotations = [annotations] if isinstance(annotations, Mapping) else list(annotations)
            if len(annotations) != len(items):
                raise ValueError(
                    f"got {len(items)} images but {len(annotations)} annotations; "
                    "pass one per image"
                )
            if self.format != "coco_detection":
                raise ValueError(f"annotations in format {self.format!r} are not supported")
        if pad_to is not None and not self.do_pad:
            raise ValueError("pad_to is given but do_pad is False")

        pixels, labels, sizes = [], [], []
        for index, item in enumerate(items):
            name = describe_image(index, item)
            image = self.load_image(item, index)
            image_size = image.shape[:2]
            try:
                new_size = self.resized_size(image_size)
                if self.do_resize:
                    image = resize_lib.resize(
                        image, *new_size, backend=self.resize_backend, resample=self.resample
                    )
            except ValueError as err:
                raise ImageError(f"{name}: {err}") from err
            pixels.append(self._normalize(image))
            sizes.append(new_size)
            if annotations is not None:
                labels.append(
                    convert_coco_detection_annotation(
                        annotations[index],
                        image_size,
                        resized_size=new_size if self.do_resize else None,
                        normalize=self.do_convert_annotations,
                    )
                )

        if self.do_pad:
            height, width = self.padded_size(sizes, pad_to)
        elif len(set(sizes)) > 1:
            raise ValueError(
                "do_pad=False needs equally sized images after resizing, "
                f"got (height, width) {sizes}"
            )
        else:
            height, width = sizes[0]
        # (bs, height, width, 3) zeros under the padding, as transformers pads after normalising
        pixel_values = np.zeros((len(pixels), height, width, 3), dtype=np.float32)
        pixel_mask = np.zeros((len(pixels), height, width), dtype=bool)
        for i, (image, (h, w)) in enumerate(zip(pixels, sizes, strict=True)):
            pixel_values[i, :h, :w] = image
            pixel_mask[i, :h, :w] = True
        batch = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        if annotations is not None:
            batch["labels"] = labels
        return batch

    __call__ = preprocess

    def post_process_object_detection(self, outputs, threshold=0.5, target_sizes=None, top_k=100):
        """`postprocessing.post_process_object_detection` (kept here as in transformers)."""
        return post_process_object_detection(
            outputs, threshold=threshold, target_sizes=target_sizes, top_k=top_k
        )
