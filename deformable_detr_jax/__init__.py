"""Deformable DETR in JAX: Flax NNX model, Pallas deformable attention, checkpoint import."""

from deformable_detr_jax.config import PRESETS, DeformableDetrConfig, preset
from deformable_detr_jax.convert.state_dict import convert_state_dict, export_state_dict
from deformable_detr_jax.loss import LossConfig, loss_from_outputs, set_criterion, validate_targets
from deformable_detr_jax.matcher import hungarian_match
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
    "LossConfig",
    "PRESETS",
    "DeformableDetrConfig",
    "DeformableDetrForObjectDetection",
    "DeformableDetrModel",
    "DeformableDetrObjectDetectionOutput",
    "bucket_sizes",
    "convert_coco_detection_annotation",
    "convert_state_dict",
    "export_state_dict",
    "hungarian_match",
    "loss_from_outputs",
    "post_process_object_detection",
    "preset",
    "set_criterion",
    "validate_targets",
]
