"""Parameter groups, learning-rate schedule and the optax optimizer of Deformable DETR.

Follows fundamentalvision/Deformable-DETR `main.py`: AdamW over three groups,

    default       every trained parameter not below              lr            (2e-4)
    backbone      names matching `lr_backbone_names` (backbone)  lr_backbone   (2e-5)
    linear_proj   names containing `sampling_offsets` or         lr * lr_linear_proj_mult (0.1)
                  `reference_points`

one weight decay for all (1e-4), gradients clipped to a global norm (`clip_max_norm` 0.1) over
everything trained, and `StepLR(lr_drop)`: every rate times 0.1 from epoch `lr_drop` (40 of 50).
Frozen parameters (the ResNet stem and layer1, as torchvision's `IntermediateLayerGetter` with
`requires_grad_(False)`) are a fourth group that is not trained at all: the train state keeps
them apart from the trained ones (`train_state.split_model`), so they have no gradient, no
optimizer state and no weight decay. Batch-norm statistics are `nnx.BatchStat`, never trained.

Parameters are named by their dot-joined NNX path, e.g.
`model.encoder.layers.0.self_attn.sampling_offsets.kernel`; the patterns are regular
expressions searched in that name (`re.search`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import optax

GROUPS = ("default", "backbone", "linear_proj")
FROZEN = "frozen"

# The paper's recipe (ResNet stem + layer1 frozen, as torchvision's resnet with
# train_backbone and return_interm_layers).
DEFAULT_FROZEN = (
    r"^model\.backbone\.model\.embedder\.",
    r"^model\.backbone\.model\.encoder\.stages\.0\.",
)
DEFAULT_BACKBONE = (r"^model\.backbone\.",)
DEFAULT_LINEAR_PROJ = (r"sampling_offsets", r"reference_points")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def param_group(name: str, settings: Mapping[str, Any]) -> str:
    """`"frozen"`, `"linear_proj"`, `"backbone"` or `"default"` for a parameter name."""
    if _matches(name, settings.get("frozen", DEFAULT_FROZEN)):
        return FROZEN
    if _matches(name, settings.get("linear_proj_names", DEFAULT_LINEAR_PROJ)):
        return "linear_proj"
    if _matches(name, settings.get("backbone_names", DEFAULT_BACKBONE)):
        return "backbone"
    return "default"


def group_learning_rates(settings: Mapping[str, Any]) -> dict[str, float]:
    """Peak learning rate of each trained group."""
    lr = float(settings["lr"])
    return {
        "default": lr,
        "backbone": float(settings["lr_backbone"]),
        "linear_proj": lr * float(settings["lr_linear_proj_mult"]),
    }


def learning_rate_schedule(
    peak: float, settings: Mapping[str, Any], steps_per_epoch: int
) -> optax.Schedule:
    """Optional linear warm-up, then `peak` times `lr_drop_factor` at each epoch of `lr_drop_epochs`.

    Epoch boundaries are converted to optimizer steps with `steps_per_epoch` (images per epoch
    divided by the total batch size).
    """
    drops = sorted(int(e) for e in settings.get("lr_drop_epochs", ()))
    factor = float(settings.get("lr_drop_factor", 0.1))
    boundaries = {max(e * steps_per_epoch, 1): factor for e in drops}
    schedule = optax.piecewise_constant_schedule(peak, boundaries)
    warmup = int(settings.get("warmup_steps", 0))
    if warmup > 0:
        ramp = optax.linear_schedule(peak * 1e-3, peak, warmup)
        schedule = optax.join_schedules([ramp, schedule], [warmup])
    return schedule


def make_optimizer(
    settings: Mapping[str, Any],
    labels: Mapping[str, str],
    steps_per_epoch: int,
) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """The optimizer over a flat `{name: array}` tree of trained parameters.

    Args:
      settings: the `optimizer` config group (`lr`, `lr_backbone`, `lr_linear_proj_mult`,
        `weight_decay`, `b1`, `b2`, `eps`, `clip_max_norm`, `lr_drop_epochs`, ...).
      labels: `{name: group}` for every trained parameter (no `"frozen"` entries).
      steps_per_epoch: optimizer steps per epoch, for `lr_drop_epochs`.

    Returns:
      The transformation and each group's learning-rate schedule (for logging).
    """
    if any(group == FROZEN for group in labels.values()):
        raise ValueError("frozen parameters must be split off before building the optimizer")
    name = settings.get("name", "adamw")
    if name != "adamw":
        raise ValueError(f"optimizer.name must be 'adamw' (the paper's), got {name!r}")
    schedules = {
        group: learning_rate_schedule(peak, settings, steps_per_epoch)
        for group, peak in group_learning_rates(settings).items()
    }
    transforms = {
        group: optax.adamw(
            schedule,
            b1=float(settings.get("b1", 0.9)),
            b2=float(settings.get("b2", 0.999)),
            eps=float(settings.get("eps", 1e-8)),
            weight_decay=float(settings["weight_decay"]),
        )
        for group, schedule in schedules.items()
    }
    clip = float(settings.get("clip_max_norm", 0.0))
    # identity when not clipping: the same state structure either way, so a run may change
    # clip_max_norm when it resumes
    clipping = optax.clip_by_global_norm(clip) if clip > 0 else optax.identity()
    return optax.chain(clipping, optax.multi_transform(transforms, dict(labels))), schedules
