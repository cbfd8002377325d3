"""The set criterion: Hungarian matching (`matcher`) and the losses over matched pairs (`loss`)."""

from deformable_detr_jax.criterion.loss import (
    LossConfig,
    loss_from_outputs,
    set_criterion,
    validate_targets,
)
from deformable_detr_jax.criterion.matcher import hungarian_match

__all__ = [
    "LossConfig",
    "hungarian_match",
    "loss_from_outputs",
    "set_criterion",
    "validate_targets",
]
