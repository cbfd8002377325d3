"""Using a trained model: `Detector` (from a folder, jit per shape bucket, draw) and COCO
evaluation (`evaluation`, pycocotools mAP)."""

from deformable_detr_jax.inference.detections import Detections, draw_detections
from deformable_detr_jax.inference.detector import Detector

__all__ = ["Detections", "Detector", "draw_detections"]
