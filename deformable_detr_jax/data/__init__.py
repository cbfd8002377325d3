"""Training and evaluation data: sources, DETR augmentations, sharded resumable batches.

Example::

    source = ShapesSource(2000, image_size=128)  # or CocoJsonSource, YoloFolderSource,
    # TfdsCocoSource, HfDatasetsSource (pip install "deformable_detr_jax[datasets]")
    batches = make_batches(source, batch_size=8, augment=AugmentConfig().scaled(0.2))
    batch = next(batches)  # pixel_values, pixel_mask, labels, boxes, mask, image_id, size, ...
    saved = batches.state()  # later: make_batches(..., state=saved) continues after this batch
"""

from deformable_detr_jax.data.box_checks import DataError, InvalidBoxError
from deformable_detr_jax.data.coco_json import CocoJsonSource
from deformable_detr_jax.data.hf_datasets import HfDatasetsSource
from deformable_detr_jax.data.pipeline import Batches, collate, grain_available, make_batches
from deformable_detr_jax.data.shapes import BACKGROUNDS, SHAPE_NAMES, ShapesSource
from deformable_detr_jax.data.source_common import COCO_CATEGORY_IDS, COCO_NAMES, decode_image
from deformable_detr_jax.data.tfds_coco import TfdsCocoSource
from deformable_detr_jax.data.transforms import (
    DETR_SCALES,
    AugmentConfig,
    crop,
    eval_transform,
    hflip,
    random_resize,
    random_size_crop,
    resize,
    resize_shortest_edge,
    train_transform,
)
from deformable_detr_jax.data.yolo import YoloFolderSource

__all__ = [
    "BACKGROUNDS",
    "COCO_CATEGORY_IDS",
    "COCO_NAMES",
    "DETR_SCALES",
    "SHAPE_NAMES",
    "AugmentConfig",
    "Batches",
    "CocoJsonSource",
    "DataError",
    "HfDatasetsSource",
    "InvalidBoxError",
    "ShapesSource",
    "TfdsCocoSource",
    "YoloFolderSource",
    "collate",
    "crop",
    "decode_image",
    "eval_transform",
    "grain_available",
    "hflip",
    "make_batches",
    "random_resize",
    "random_size_crop",
    "resize",
    "resize_shortest_edge",
    "train_transform",
]
