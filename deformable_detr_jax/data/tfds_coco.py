"""`TfdsCocoSource`: the prepared TFDS coco/2017 (ArrayRecord), read without TensorFlow (record
format and checks: `source_common.py`)."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from deformable_detr_jax.data.box_checks import InvalidBoxes, check_xyxy
from deformable_detr_jax.data.source_common import (
    COCO_CATEGORY_IDS,
    COCO_NAMES,
    LABEL_MODES,
    clip_normalised,
    require_dir,
)
from deformable_detr_jax.processing.image_processor import ImageError

logger = logging.getLogger(__name__)


class TfdsCocoSource:
    """`tfds.data_source("coco/2017:1.1.0")`: the prepared TFDS COCO (ArrayRecord), read without
    TensorFlow. The version is pinned on purpose: with a version, TFDS builds the reader from the
    prepared files' metadata; without one it runs the `coco` builder code, which imports TF.

    Prepare the data once where TensorFlow is installed: `tfds build coco/2017
    --file_format=array_record --data_dir=DIR`. Labels are TFDS's contiguous 0..79
    (`label_mode="contiguous"`) or the COCO category ids 1..90 (`"category_id"`, 91 labels, as the
    Hugging Face checkpoints). TFDS decodes the images (OpenCV when installed, else PIL); a record
    that fails to read or decode is an ImageError, so the pipeline skips it. Boxes are checked when
    a record is read (reading every record here would decode every image): an invalid one is
    dropped and logged with its record, image id and object index, counted in `invalid_boxes` of
    the process that read it, or an `InvalidBoxError` with `strict=True`.
    """

    def __init__(
        self,
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        *,
        name: str = "coco/2017:1.1.0",
        label_mode: str = "contiguous",
        strict: bool = False,
    ):
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if data_dir is not None and "://" not in str(data_dir):
            require_dir(data_dir, "data_dir", "the TFDS data folder holding coco/2017/1.1.0")
        import tensorflow_datasets as tfds

        self.split, self.data_dir, self.name = split, data_dir, name
        try:
            self._data = tfds.data_source(
                name,
                split=split,
                data_dir=None if data_dir is None else os.fspath(data_dir),
            )
        except Exception as err:  # DatasetNotFoundError, unknown split, missing files, ...
            raise FileNotFoundError(
                f"cannot open TFDS {name} split {split!r} in data_dir={data_dir!r} "
                f"({type(err).__name__}: {str(err)[:300]}); prepare it with `tfds build coco/2017 "
                "--file_format=array_record --data_dir=DIR` (needs TensorFlow there) or use "
                "CocoJsonSource on the COCO json and images"
            ) from err
        if label_mode == "contiguous":
            self.category_ids = COCO_CATEGORY_IDS
            self.label_names = COCO_NAMES
            self._labels = np.arange(len(COCO_NAMES), dtype=np.int32)
        else:
            self.category_ids = tuple(range(max(COCO_CATEGORY_IDS) + 1))
            names = dict(zip(COCO_CATEGORY_IDS, COCO_NAMES))
            self.label_names = tuple(names.get(c, "N/A") for c in self.category_ids)
            self._labels = np.asarray(COCO_CATEGORY_IDS, dtype=np.int32)
        self.num_labels = len(self.label_names)
        self.invalid_boxes = InvalidBoxes(f"TFDS {name} {split}", strict=strict)

    def __len__(self) -> int:
        return len(self._data)

    def describe(self, index: int) -> str:
        return f"TFDS {self.name} {self.split}[{index}]"

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            example = self._data[int(index)]
            objects = example["objects"]
            # TFDS gives sequences as lists of arrays; (n, 4) ymin, xmin, ymax, xmax normalised
            bbox = np.asarray(objects["bbox"], dtype=np.float32).reshape(-1, 4)
            label = np.asarray(objects["label"], dtype=np.int64).reshape(-1)
            crowd = np.asarray(objects["is_crowd"], dtype=bool).reshape(-1)
            image_id = int(np.asarray(example["image/id"]))
            data = example["image"]
        except Exception as err:  # an unreadable record is skipped like a corrupt image
            raise ImageError(f"{self.describe(index)}: unreadable record ({err})") from err
        if not len(bbox) == len(label) == len(crowd):
            raise ImageError(
                f"{self.describe(index)}: objects of unequal lengths (bbox {len(bbox)}, label "
                f"{len(label)}, is_crowd {len(crowd)})"
            )
        if label.size and (label.min() < 0 or label.max() >= len(self._labels)):
            raise ImageError(f"{self.describe(index)}: label outside 0..79: {label.tolist()}")
        image = np.asarray(data)
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
            raise ImageError(
                f"{self.describe(index)} (image id {image_id}): decoded to {image.dtype} "
                f"{image.shape}, not an image"
            )
        if image.ndim == 2:  # a grayscale JPEG stored as it was
            image = image[..., None]
        image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
        keep = ~crowd
        xyxy = bbox[:, [1, 0, 3, 2]]
        dropped = []
        for k in np.flatnonzero(keep):
            problem = check_xyxy(*(float(v) for v in xyxy[k]))
            if problem is not None:
                reason = f"{problem} (ymin, xmin, ymax, xmax {bbox[k].tolist()})"
                self.invalid_boxes.add(
                    f"{self.describe(index)} (image id {image_id}) object {k}", reason
                )
                dropped.append(f"object {k}: {reason}")
                keep[k] = False
        if dropped:
            logger.warning(
                "%s (image id %d): dropped %d invalid box(es), %d in this process so far "
                "(data.strict=True makes them errors): %s",
                self.describe(index),
                image_id,
                len(dropped),
                len(self.invalid_boxes),
                "; ".join(dropped),
            )
        boxes, valid = clip_normalised(xyxy[keep])
        labels = self._labels[label[keep][valid]]
        return {"image": image, "boxes": boxes, "labels": labels, "image_id": image_id}
