"""Deformable DETR in JAX: Flax NNX model, Pallas deformable attention, checkpoint import.

The public names below are imported lazily (PEP 562), so that `import deformable_detr_jax`
is cheap for data-loading worker processes that need none of jax/flax.
"""

from __future__ import annotations

import importlib

from deformable_detr_jax import _versions

_versions.check()

# public name -> module that defines it
_EXPORTS = {
    "DeformableDetrConfig": "config",
    "PRESETS": "config",
    "preset": "config",
    "convert_state_dict": "convert.state_dict",
    "export_state_dict": "convert.state_dict",
    "load_pytorch_checkpoint": "convert.loading",
    "import_pytorch_checkpoint": "convert.loading",
    "save_pytorch_checkpoint": "convert.loading",
    "load_pretrained": "checkpoint",
    "save_pretrained": "checkpoint",
    "DeformableDetrForObjectDetection": "modeling",
    "DeformableDetrModel": "modeling",
    "DeformableDetrObjectDetectionOutput": "modeling",
    "Detections": "inference.detections",
    "Detector": "inference.detector",
    "draw_detections": "inference.detections",
    "ImageError": "processing.image_processor",
    "ImageProcessor": "processing.image_processor",
    "bucket_sizes": "processing.image_processor",
    "convert_coco_detection_annotation": "processing.image_processor",
    "post_process_object_detection": "processing.postprocessing",
    "LossConfig": "criterion.loss",
    "loss_from_outputs": "criterion.loss",
    "set_criterion": "criterion.loss",
    "validate_targets": "criterion.loss",
    "hungarian_match": "criterion.matcher",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deformable_detr_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"deformable_detr_jax.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
