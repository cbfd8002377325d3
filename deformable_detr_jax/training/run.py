"""A run built from its settings: everything `train()` needs, checked before any compilation.

`build_run` resolves the settings against the devices and the data (`setup.py`: batch layout,
data sources, model and loss configs), the optimizer (with the parameters the loss does not
reach left undecayed, `reach.py`) and the compilation cache. `restore_or_initialise` gives the
first state: the workdir's newest checkpoint that restores (after `resume.check_settings`), else
fresh weights (random, then `model.init_from` / `model.backbone_weights`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from deformable_detr_jax import compile_cache
from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.criterion.loss import LossConfig
from deformable_detr_jax.training import api, resume, setup
from deformable_detr_jax.training import batches as batches_lib
from deformable_detr_jax.training import mesh as mesh_lib
from deformable_detr_jax.training import optimizer as optimizer_lib
from deformable_detr_jax.training import train_state as state_lib
from deformable_detr_jax.training.checkpointing import Checkpoints
from deformable_detr_jax.training.metrics import EvalProgress
from deformable_detr_jax.training.settings import AugmentSettings, ConfigError, Settings

# the run is logged under the loop's name (one logger to follow a run by)
logger = logging.getLogger("deformable_detr_jax.training.loop")


@dataclasses.dataclass(frozen=True)
class Run:
    """A training run, resolved: settings, devices, data, model, loss, optimizer, length."""

    settings: Settings
    workdir: str  # absolute
    shown: str  # as the user wrote it, for messages
    mesh: jax.sharding.Mesh
    layout: setup.BatchLayout
    model: DeformableDetrConfig
    loss: LossConfig
    spec: state_lib.ModelSpec
    optimizer: optimizer_lib.Optimizer
    steps_per_epoch: int
    total_steps: int
    train_source: Any  # None when train() is given its batches
    eval_source: Any  # None without evaluation
    cache_dir: pathlib.Path | None
    cache_off: str | None  # why the compilation cache is off, or None

    @property
    def primary(self) -> bool:
        return jax.process_index() == 0

    @property
    def record(self) -> dict[str, Any]:
        """What the workdir's `config.json` holds (`resume.payload`)."""
        return resume.payload(self.settings, self.model)


def _sources(settings: Settings, train_data, model_config, total_batch: int):
    """`(train_source, eval_source, model_config, num_records)`."""
    train = settings.train
    if train_data is not None:
        if model_config is None:
            raise ConfigError("train(train_data=...) needs model_config=")
        return None, None, model_config, int(getattr(train_data, "num_records", total_batch))
    train_source = setup.make_source(settings.data, "train")
    evaluates = bool(train.eval_every) or train.eval_at_end
    eval_source = setup.make_source(settings.data, "eval") if evaluates else None
    model = setup.model_config(settings.model, train_source)
    return train_source, eval_source, model, len(train_source)


def build_run(
    settings: Settings,
    workdir: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    train_data: Iterator[Mapping[str, np.ndarray]] | None = None,
    model_config: DeformableDetrConfig | None = None,
) -> Run:
    """Everything checked and resolved; nothing compiled. Raises ConfigError naming a setting."""
    shown = os.fspath(workdir)
    mesh = mesh_lib.make_data_mesh() if mesh is None else mesh
    # WORKDIR/compile_cache (or a directory JAX was pointed at from outside, kept as it is), or
    # off: by the setting, or for several processes on CPU, where they cannot share it
    cache_dir, cache_off = compile_cache.training_cache(
        settings.train.compilation_cache_dir,
        os.path.abspath(shown),
        jax.process_count(),
        mesh.devices.flat[0].platform,
    )
    if cache_off:  # on every process: each decides (the same way) for itself
        logger.info("compilation cache off: %s", cache_off)
    layout = setup.batch_layout(settings.data, settings.train, mesh.size, jax.process_count())
    train_source, eval_source, model, records = _sources(
        settings, train_data, model_config, layout.total
    )
    loss = setup.loss_config(settings.model, model)
    spec = api.spec_of(model, settings.optimizer)
    steps_per_epoch = max(records // layout.total, 1)
    total = setup.total_steps(settings.train, steps_per_epoch)
    # which parameters to decay only matters with a decay
    reach = loss if settings.optimizer.weight_decay else None
    optimizer = api.make_optimizer(spec, settings.optimizer, steps_per_epoch, loss=reach)
    return Run(
        settings=settings,
        workdir=os.path.abspath(shown),
        shown=shown,
        mesh=mesh,
        layout=layout,
        model=model,
        loss=loss,
        spec=spec,
        optimizer=optimizer,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        train_source=train_source,
        eval_source=eval_source,
        cache_dir=cache_dir,
        cache_off=cache_off,
    )


def log_run(run: Run) -> None:
    """One line: the model, its parameter groups, the length and the batch layout."""
    if not run.primary:
        return
    labels = [optimizer_lib.param_group(n, run.settings.optimizer) for n in run.spec.trainable]
    groups = {g: labels.count(g) for g in optimizer_lib.GROUPS}
    layout = run.layout
    logger.info(
        "model %s, %d labels; %d trained tensors %s, %d frozen; %d steps (%d per epoch), "
        "batch %d = %d x %d micro-batches on %d devices / %d processes",
        run.model.variant,
        run.model.num_labels,
        len(run.spec.trainable),
        groups,
        len(run.spec.frozen),
        run.total_steps,
        run.steps_per_epoch,
        layout.total,
        layout.accum,
        layout.micro,
        run.mesh.size,
        jax.process_count(),
    )


# ----------------------------------------------------------------------------- the first state


def restore_or_initialise(run: Run, checkpoints: Checkpoints) -> tuple[state_lib.TrainState, Any]:
    """`(state, data_position)`: the newest checkpoint that restores (its settings compared
    with this run's first), else fresh weights and no position."""
    if checkpoints.all_steps() or checkpoints.corrupt_folders():
        recorded = os.path.isfile(os.path.join(run.workdir, resume.SETTINGS_FILE))
        fallback = None if recorded else resume.settings_from_checkpoints(checkpoints)
        resume.check_settings(run.workdir, run.record, shown=run.shown, fallback=fallback)
    dtype = setup.param_dtype(run.settings.train)
    abstract = state_lib.abstract_train_state(run.spec, run.optimizer.tx, run.mesh, dtype)
    restored = checkpoints.restore_latest(abstract)
    if restored is not None:
        state, position, _ = restored
        logger.info("resumed from checkpoint %d in %s", int(state.step), checkpoints.directory)
        return state, position
    if run.primary:
        logger.info("initialising the weights (seed %d)...", run.settings.train.seed)
    params, frozen = initial_weights(run, dtype)
    return state_lib.create_train_state(params, frozen, run.optimizer.tx, run.mesh), None


def initial_weights(run: Run, dtype: Any = None) -> tuple[dict, dict]:
    """`(params, frozen)` for a new run: random, then `model.init_from` and
    `model.backbone_weights` copied over (see `initialization.py`)."""
    from deformable_detr_jax.training import initialization

    model = run.settings.model
    backbone = _imagenet_backbone(run) if model.backbone_weights else {}
    params, frozen = state_lib.init_weights(run.spec, run.settings.train.seed, run.mesh, dtype)
    if not model.init_from and not model.backbone_weights:
        return params, frozen
    weights = {name: np.asarray(jax.device_get(v)) for name, v in {**params, **frozen}.items()}
    if model.init_from:
        source = state_lib.model_weights(initialization.load_checkpoint_model(model.init_from))
        weights, kept = initialization.transplant(weights, source)
        if run.primary:
            logger.info(
                "initialised from %s; %d tensors kept fresh: %s",
                model.init_from,
                len(kept),
                ", ".join(kept[:8]) + (" ..." if len(kept) > 8 else ""),
            )
    weights.update(backbone)
    return state_lib.split_weights(run.spec, state_lib.place_weights(weights, run.mesh))


def _imagenet_backbone(run: Run) -> dict[str, np.ndarray]:
    """`model.backbone_weights` read and checked against the model (before anything is traced)."""
    from deformable_detr_jax.training import initialization

    shapes = {
        state_lib.param_name(path): tuple(variable.shape)
        for path, variable in run.spec.variables
        if not isinstance(variable, nnx.RngState)
    }
    try:
        return initialization.backbone_weights_from_resnet(
            run.settings.model.backbone_weights, shapes, run.model
        )
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err


def open_batches(run: Run, train_data, position: Any):
    """The training batches of this process, at `position` when resuming."""
    if train_data is not None:
        if position is not None:
            train_data.restore(position)
        return train_data
    return api.make_batches(
        run.settings.data,
        source=run.train_source,
        batch_size=run.layout.per_process,
        num_labels=run.model.num_labels,
        state=position,
    )


# ----------------------------------------------------------------------------- evaluation, export


def make_evaluator(run: Run) -> Callable[[state_lib.TrainState], dict[str, float] | None] | None:
    """`evaluate(state) -> metrics | None` over the whole evaluation source (COCO mAP), or None
    without one."""
    from deformable_detr_jax.inference.evaluation import CocoEvaluator, coco_evaluate_stream
    from deformable_detr_jax.training.step import make_eval_step

    source = run.eval_source
    if source is None:
        return None
    dtype = setup.compute_dtype(run.settings.train)
    top_k = run.settings.train.eval_top_k
    eval_step = make_eval_step(run.spec, run.mesh, top_k=top_k, compute_dtype=dtype)
    annotations = getattr(source, "annotations_json", None)

    def evaluate(state: state_lib.TrainState) -> dict[str, float] | None:
        start = time.perf_counter()
        batches = api.make_batches(
            run.settings.data,
            split="eval",
            source=source,
            batch_size=run.layout.eval_per_process,
            num_labels=run.model.num_labels,
        )
        evaluator = CocoEvaluator(
            getattr(source, "category_ids", None),
            label_names=getattr(source, "label_names", None),
            ground_truth_json=None if annotations is None else os.fspath(annotations),
        )
        progress = EvalProgress(
            len(source),
            run.layout.eval_per_process * jax.process_count(),
            logger.info if run.primary else None,
        )
        try:
            metrics = coco_evaluate_stream(
                lambda batch: eval_step(state.params, state.frozen, batch),
                progress.wrap(batches),
                evaluator,
                to_device=lambda local: batches_lib.global_eval_batch(local, run.mesh),
                gather=mesh_lib.gather_to_host,
                is_primary=run.primary,
            )
        finally:
            batches.close()
        if metrics is not None:
            seconds = time.perf_counter() - start
            logger.info("evaluated %d images in %.1f s", len(evaluator.images), seconds)
        return metrics

    return evaluate


def processor_for(augment: AugmentSettings):
    """The `ImageProcessor` matching the run's evaluation transform (for `save_pretrained`)."""
    from deformable_detr_jax.processing.image_processor import ImageProcessor

    config = setup.augment_config(augment)
    return ImageProcessor(
        size={"shortest_edge": config.eval_size, "longest_edge": config.eval_max_size},
        resize_backend="pil",
    )


def checkpoint_meta(run: Run) -> dict[str, Any]:
    """The meta item of every checkpoint (what `to_pretrained` and old workdirs read back)."""
    processor = run.train_source is not None
    return {
        "config": run.record["config"],
        "total_steps": run.total_steps,
        "num_processes": jax.process_count(),
        "model_config": run.model.to_hf(),
        "processor": processor_for(run.settings.data.augment).to_dict() if processor else None,
    }
