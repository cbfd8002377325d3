"""Deformable DETR in JAX: Flax NNX model, Pallas deformable attention, checkpoint import."""

from deformable_detr_jax.config import PRESETS, DeformableDetrConfig, preset
from deformable_detr_jax.convert.state_dict import convert_state_dict, export_state_dict
from deformable_detr_jax.modeling import (
    DeformableDetrForObjectDetection,
    DeformableDetrModel,
    DeformableDetrObjectDetectionOutput,
)
from deformable_detr_jax.postprocessing import post_process_object_detection
from deformable_detr_jax.processing import (
    ImageError,
    ImageProcessor,
    bucket_sizes,
    convert_coco_detection_annotation,
)

__all__ = [
    "ImageError",
    "ImageProcessor",
    "PRESETS",
    "DeformableDetrConfig",
    "DeformableDetrForObjectDetection",
    "DeformableDetrModel",
    "DeformableDetrObjectDetectionOutput",
    "bucket_sizes",
    "convert_coco_detection_annotation",
    "convert_state_dict",
    "export_state_dict",
    "post_process_object_detection",
    "preset",
]
