"""The set criterion: Hungarian matching (`matcher`) and the losses over matched pairs (`loss`);
contrastive denoising groups (`denoising`) and their losses (`denoising_loss`)."""

from deformable_detr_jax.criterion.denoising import (
    DenoisingDraws,
    DenoisingGroups,
    build_denoising_groups,
    contrastive_denoising_groups,
    denoising_capacity,
)
from deformable_detr_jax.criterion.denoising_loss import denoising_criterion
from deformable_detr_jax.criterion.loss import (
    LossConfig,
    loss_from_outputs,
    set_criterion,
    validate_targets,
)
from deformable_detr_jax.criterion.matcher import hungarian_match

__all__ = [
    "DenoisingDraws",
    "DenoisingGroups",
    "LossConfig",
    "build_denoising_groups",
    "contrastive_denoising_groups",
    "denoising_capacity",
    "denoising_criterion",
    "hungarian_match",
    "loss_from_outputs",
    "set_criterion",
    "validate_targets",
]
