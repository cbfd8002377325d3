"""Flax NNX modules of Deformable DETR, named after transformers' modules."""

from deformable_detr_jax.modeling.detector import (
    DeformableDetrForObjectDetection,
    DeformableDetrModel,
    DeformableDetrModelOutput,
    DeformableDetrObjectDetectionOutput,
)

__all__ = [
    "DeformableDetrForObjectDetection",
    "DeformableDetrModel",
    "DeformableDetrModelOutput",
    "DeformableDetrObjectDetectionOutput",
]
