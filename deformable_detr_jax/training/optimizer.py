"""Parameter groups, learning-rate schedule and the optax optimizer of Deformable DETR.

Follows fundamentalvision/Deformable-DETR `main.py`: AdamW over three groups,

    default       every trained parameter not below              lr            (2e-4)
    backbone      names matching `lr_backbone_names` (backbone)  lr_backbone   (2e-5)
    linear_proj   names containing `sampling_offsets` or         lr * lr_linear_proj_mult (0.1)
                  `reference_points`

one weight decay for all (1e-4), gradients clipped to a global norm (`clip_max_norm` 0.1) over
everything trained, and `StepLR(lr_drop)`: every rate times 0.1 from epoch `lr_drop` (40 of 50).

As torch does it: clipping is `torch.nn.utils.clip_grad_norm_` (`g * min(1, max_norm / (norm +
1e-6))`), and a parameter the loss never reaches (torch: `grad is None`, e.g. a two-stage model's
encoder heads trained without the encoder loss) is not decayed: `decayed` names the parameters
that are (`reach.reached_parameters` finds them).
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
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from deformable_detr_jax.training.settings import OptimizerSettings

GROUPS = ("default", "backbone", "linear_proj")
FROZEN = "frozen"
TORCH_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def param_group(name: str, settings: OptimizerSettings) -> str:
    """`"frozen"`, `"linear_proj"`, `"backbone"` or `"default"` for a parameter name."""
    if _matches(name, settings.frozen):
        return FROZEN
    if _matches(name, settings.linear_proj_names):
        return "linear_proj"
    if _matches(name, settings.backbone_names):
        return "backbone"
    return "default"


def group_learning_rates(settings: OptimizerSettings) -> dict[str, float]:
    """Peak learning rate of each trained group."""
    return {
        "default": settings.lr,
        "backbone": settings.lr_backbone,
        "linear_proj": settings.lr * settings.lr_linear_proj_mult,
    }


def learning_rate_schedule(
    peak: float, settings: OptimizerSettings, steps_per_epoch: int
) -> optax.Schedule:
    """Optional linear warm-up, then `peak` times `lr_drop_factor` at each epoch of `lr_drop_epochs`.

    Epoch boundaries are converted to optimizer steps with `steps_per_epoch` (images per epoch
    divided by the total batch size).
    """
    drops = sorted(settings.lr_drop_epochs)
    boundaries = {max(e * steps_per_epoch, 1): settings.lr_drop_factor for e in drops}
    schedule = optax.piecewise_constant_schedule(peak, boundaries)
    warmup = settings.warmup_steps
    if warmup > 0:
        ramp = optax.linear_schedule(peak * 1e-3, peak, warmup)
        schedule = optax.join_schedules([ramp, schedule], [warmup])
    return schedule


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
    """`torch.nn.utils.clip_grad_norm_`: every gradient times `min(1, max_norm / (norm + 1e-6))`,
    `norm` the global L2 norm. Stateless (`optax.EmptyState`, as `optax.clip_by_global_norm`)."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        factor = jnp.minimum(1.0, max_norm / (norm + TORCH_CLIP_EPS))
        return jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_weights(weight_decay: float, decayed: Callable[[str], bool]):
    """`optax.add_decayed_weights` over a flat `{name: array}` tree, only where `decayed(name)`;
    its state stays `optax.EmptyState` (checkpoints written before keep restoring)."""

    def update(updates, state, params):
        def one(path, update_, param):
            return update_ + weight_decay * param if decayed(path[0].key) else update_

        return jax.tree_util.tree_map_with_path(one, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adamw(schedule: optax.Schedule, settings: OptimizerSettings, decayed: Callable[[str], bool]):
    """`optax.adamw` (same state layout) with the decay limited to `decayed` parameters."""
    return optax.chain(
        optax.scale_by_adam(b1=settings.b1, b2=settings.b2, eps=settings.eps),
        decay_weights(settings.weight_decay, decayed),
        optax.scale_by_learning_rate(schedule),
    )


class Optimizer(NamedTuple):
    """The optimizer of a run: `tx` and each group's learning-rate schedule (for logging)."""

    tx: optax.GradientTransformation
    schedules: dict[str, optax.Schedule]


def build_optimizer(
    settings: OptimizerSettings,
    labels: Mapping[str, str],
    steps_per_epoch: int,
    decayed: Collection[str] | None = None,
) -> Optimizer:
    """The optimizer over a flat `{name: array}` tree of trained parameters.

    Args:
      settings: the `optimizer` settings.
      labels: `{name: group}` for every trained parameter (no `"frozen"` entries).
      steps_per_epoch: optimizer steps per epoch, for `lr_drop_epochs`.
      decayed: the parameters weight decay applies to (default: all); those the loss does not
        reach are left out, as torch's AdamW skips a parameter without a gradient.
    """
    if any(group == FROZEN for group in labels.values()):
        raise ValueError("frozen parameters must be split off before building the optimizer")
    schedules = {
        group: learning_rate_schedule(peak, settings, steps_per_epoch)
        for group, peak in group_learning_rates(settings).items()
    }
    is_decayed = (lambda name: True) if decayed is None else frozenset(decayed).__contains__
    transforms = {
        group: adamw(schedule, settings, is_decayed) for group, schedule in schedules.items()
    }
    # identity when not clipping: the same state structure either way, so a run may change
    # clip_max_norm when it resumes
    clip = settings.clip_max_norm
    clipping = clip_grad_norm(clip) if clip > 0 else optax.identity()
    return Optimizer(
        optax.chain(clipping, optax.multi_transform(transforms, dict(labels))), schedules
    )
