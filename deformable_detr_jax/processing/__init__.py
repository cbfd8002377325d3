"""Images in and detections out, as transformers' `DeformableDetrImageProcessor` does them.

`image_processor` (resize, rescale, normalise, pad to a bucket with a pixel mask; COCO
annotations), `resize` (transformers' two resizing backends, reproduced), `postprocessing`
(`post_process_object_detection`: the top-k decoding that `Detector` and evaluation share).
NumPy and PIL only: data-loading workers import this without jax.
"""

from deformable_detr_jax.processing.image_processor import (
    CONFIG_NAME,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageError,
    ImageProcessor,
    bucket_sizes,
    convert_coco_detection_annotation,
)
from deformable_detr_jax.processing.postprocessing import post_process_object_detection

__all__ = [
    "CONFIG_NAME",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "ImageError",
    "ImageProcessor",
    "bucket_sizes",
    "convert_coco_detection_annotation",
    "post_process_object_detection",
]
