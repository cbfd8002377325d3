"""The pieces of `train()` for people who write their own loop (see the package docstring).

optimizer = make_optimizer(spec, settings.optimizer, steps_per_epoch, loss=loss)
state = init_state(spec, optimizer, mesh, seed=settings.train.seed)
step = make_train_step(spec, loss, optimizer, mesh, state)
state, metrics = step(state, make_batch([next(batches)], mesh), key)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.criterion.loss import LossConfig
from deformable_detr_jax.training import batches as batches_lib
from deformable_detr_jax.training import setup
from deformable_detr_jax.training import step as step_lib
from deformable_detr_jax.training import train_state as state_lib
from deformable_detr_jax.training.optimizer import Optimizer, build_optimizer, param_group
from deformable_detr_jax.training.reach import reached_parameters
from deformable_detr_jax.training.settings import DataSettings, OptimizerSettings, Settings

TrainStep = Callable[
    [state_lib.TrainState, dict[str, jax.Array], jax.Array], tuple[state_lib.TrainState, dict]
]


def make_model_config(settings: Settings, source: Any = None) -> DeformableDetrConfig:
    """The `DeformableDetrConfig` of the run's `model` settings; `num_labels` (when None) and the
    label names from `source` (default: the training source `settings.data` names)."""
    source = setup.make_source(settings.data, "train") if source is None else source
    return setup.model_config(settings.model, source)


def make_loss_config(settings: Settings, model: DeformableDetrConfig) -> LossConfig:
    """The criterion's config: the run's `model.loss` settings for `model`'s labels."""
    return setup.loss_config(settings.model, model)


def spec_of(
    model: state_lib.ModelSpec | DeformableDetrConfig, settings: OptimizerSettings
) -> state_lib.ModelSpec:
    """`model` as a `ModelSpec` (a config is split with `settings.frozen`)."""
    if isinstance(model, state_lib.ModelSpec):
        return model
    return state_lib.model_spec(model, settings.frozen)


def make_optimizer(
    model: state_lib.ModelSpec | DeformableDetrConfig,
    settings: OptimizerSettings | None = None,
    steps_per_epoch: int = 1,
    *,
    loss: LossConfig | None = None,
) -> Optimizer:
    """The paper's optimizer for `model`: AdamW over the parameter groups of `settings`
    (`optimizer.py`), the learning rate dropped at `settings.lr_drop_epochs` epochs of
    `steps_per_epoch` steps, gradients clipped as `torch.nn.utils.clip_grad_norm_`. Given the
    `loss`, a parameter it does not reach is not decayed (as torch's AdamW leaves a parameter
    without a gradient alone)."""
    settings = OptimizerSettings() if settings is None else settings
    spec = spec_of(model, settings)
    labels = {name: param_group(name, settings) for name in spec.trainable}
    decayed = None if loss is None else reached_parameters(spec, loss)
    return build_optimizer(settings, labels, steps_per_epoch, decayed)


def init_state(
    spec: state_lib.ModelSpec,
    optimizer: Optimizer,
    mesh: jax.sharding.Mesh,
    *,
    seed: int = 42,
    dtype: Any = None,
) -> state_lib.TrainState:
    """A fresh train state (random weights of `seed`), replicated on `mesh`."""
    params, frozen = state_lib.init_weights(spec, seed, mesh, dtype)
    return state_lib.create_train_state(params, frozen, optimizer.tx, mesh)


def make_train_step(
    spec: state_lib.ModelSpec,
    loss: LossConfig,
    optimizer: Optimizer,
    mesh: jax.sharding.Mesh,
    state: state_lib.TrainState,
    *,
    compute_dtype: Any = None,
) -> TrainStep:
    """`step(state, batch, key) -> (state, metrics)`: one jitted optimizer step (state donated)
    over a `make_batch` batch; `key` seeds dropout (folded with the step)."""
    return step_lib.make_train_step(
        spec,
        loss,
        optimizer.tx,
        mesh,
        state,
        compute_dtype=compute_dtype,
        schedules=optimizer.schedules,
    )


def make_batches(
    data: DataSettings,
    *,
    batch_size: int,
    num_labels: int,
    split: str = "train",
    source: Any = None,
    state: dict | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's host batches of `split` (`source`: default, the one `data.source` names),
    augmented for training, padded as `data` says; `.state()` / `restore()` for resuming."""
    source = setup.make_source(data, split) if source is None else source
    return setup.make_batches(
        data,
        source,
        train=split == "train",
        batch_size=batch_size,
        num_labels=num_labels,
        state=state,
    )


def make_batch(
    micro_batches: Sequence[Mapping[str, np.ndarray]], mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
    """`accum` host batches of this process -> the global `(accum, bs, ...)` train-step batch."""
    return batches_lib.global_train_batch(micro_batches, mesh)
