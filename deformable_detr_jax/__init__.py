"""Deformable DETR in JAX: Flax NNX model, Pallas deformable attention, checkpoint import."""

from deformable_detr_jax.config import PRESETS, DeformableDetrConfig, preset
from deformable_detr_jax.convert.state_dict import convert_state_dict, export_state_dict
from deformable_detr_jax.modeling import (
    DeformableDetrForObjectDetection,
    DeformableDetrModel,
    DeformableDetrObjectDetectionOutput,
)

__all__ = [
    "PRESETS",
    "DeformableDetrConfig",
    "DeformableDetrForObjectDetection",
    "DeformableDetrModel",
    "DeformableDetrObjectDetectionOutput",
    "convert_state_dict",
    "export_state_dict",
    "preset",
]
