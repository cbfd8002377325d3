"""Images in and detections out, as transformers' `DeformableDetrImageProcessor` does them.

`image_processor` (resize, rescale, normalise, pad to a bucket with a pixel mask), `images`
(any image in, RGB uint8 out, or one `ImageError`), `annotations` (COCO targets), `resize` (transformers' two resizing backends, reproduced), `postprocessing`
(`post_process_object_detection`; its `top_k_detections` is the one top-k decoding, run by
`Detector` on the host and by the training evaluation step on the device).
NumPy and PIL only: data-loading workers import this without jax.
"""

from deformable_detr_jax.processing.image_processor import (
    CONFIG_NAME,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    MIN_SIDE,
    ImageError,
    ImageProcessor,
    bucket_sizes,
    convert_coco_detection_annotation,
)
from deformable_detr_jax.processing.postprocessing import (
    post_process_object_detection,
    top_k_detections,
)

__all__ = [
    "CONFIG_NAME",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "MIN_SIDE",
    "ImageError",
    "ImageProcessor",
    "bucket_sizes",
    "convert_coco_detection_annotation",
    "post_process_object_detection",
    "top_k_detections",
]
