"""The training loop: `train(config, workdir)`, a run told in four parts.

    settings   the recipe's ConfigDict parsed once into typed settings (`settings/`); a bad
               setting is a ConfigError naming it
    run        built from the settings (`run.py`, nothing compiled): batch layout vs devices,
               data sources, model and loss configs, the optimizer; the workdir's settings
               compared with this run's (`resume.py`)
    state      the newest checkpoint in workdir/checkpoints that restores (a corrupt one is moved
               aside, see `checkpointing.py`), else fresh weights, replicated on the mesh
    steps      `accum` batches of this process -> one global `(accum, bs, ...)` batch -> the
               jitted train step (donated state); between steps the periodic actions
               (`actions.py`): metrics every `log_every`, checkpoints every `checkpoint_every`,
               COCO evaluation every `eval_every`; then a final checkpoint, evaluation and
               `save_pretrained` of the model to workdir/model

Stops: SIGTERM (or, on several hosts, JAX's preemption notice) saves a checkpoint at the
current step and returns `stopped="preempted"`; a non-finite loss raises `NonFiniteLossError`
without saving, so the last checkpoint is the last good state (the step itself never applies a
non-finite update: see `step.py`); a checkpoint that cannot be written (disk full) raises
`CheckpointWriteError` naming the last intact one. The checkpoint manager is closed on every path.

Process-wide settings (glibc's malloc on CPU, `cli/train.py`) are the entry point's business, not
`train()`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from deformable_detr_jax import compile_cache
from deformable_detr_jax.training import mesh as mesh_lib
from deformable_detr_jax.training import run as run_lib
from deformable_detr_jax.training import settings as settings_lib
from deformable_detr_jax.training import setup
from deformable_detr_jax.training import train_state as state_lib
from deformable_detr_jax.training.actions import (
    Checkpointing,
    Evaluation,
    MetricsLog,
    NonFiniteLossError,
    Preemption,
    check_finite,
    logger,
)
from deformable_detr_jax.training.api import make_train_step
from deformable_detr_jax.training.batches import global_train_batch, stack_micro_batches
from deformable_detr_jax.training.checkpointing import Checkpoints, CheckpointWriteError
from deformable_detr_jax.training.metrics import MetricsWriter, ProgressBar, format_duration

__all__ = ["NonFiniteLossError", "TrainResult", "save_model", "stack_micro_batches", "train"]


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
      state: the final `TrainState` (replicated global arrays).
      spec: the `ModelSpec` (`train_state.merged_model(spec, state)` gives the model).
      step: optimizer steps taken in total.
      stopped: "finished" or "preempted" (SIGTERM: a checkpoint was saved, resume later).
      eval_metrics: the last COCO evaluation (process 0), or None.
      model_dir: the `save_pretrained` folder, or None.
    """

    state: state_lib.TrainState
    spec: state_lib.ModelSpec
    step: int
    stopped: str
    eval_metrics: dict[str, float] | None
    model_dir: str | None


@dataclasses.dataclass
class Actions:
    """The periodic actions of a run and its stop signal (`actions.py`)."""

    log: MetricsLog
    checkpoint: Checkpointing
    evaluation: Evaluation
    preemption: Preemption

    @property
    def checkpoints(self) -> Checkpoints:
        return self.checkpoint.checkpoints


def train(
    config: Any,
    workdir: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    train_data: Iterator[Mapping[str, np.ndarray]] | None = None,
    model_config: Any = None,
    on_step: Callable[[int, state_lib.TrainState], None] | None = None,
) -> TrainResult:
    """Trains (or resumes training) as `config` says, writing everything under `workdir`.

    Args:
      config: a recipe's ConfigDict (`configs/*.py`), a mapping of the same groups (missing keys
        take their defaults), or `settings.Settings`.
      workdir: checkpoints/, config.json, metrics.jsonl, tensorboard/, model/ go here; the newest
        checkpoint that restores is resumed (`checkpointing.Checkpoints.restore_latest`).
      mesh: default: every device of every process on one "data" axis.
      train_data: instead of the configured source: an iterator of this process's batches
        (numpy dicts with `TRAIN_KEYS`), with `state()` / `restore(state)` when resuming is to
        be exact; needs `model_config`.
      model_config: the `DeformableDetrConfig` when `train_data` is given.
      on_step: called as `on_step(step, state)` after each step is dispatched (tests, hooks).

    Raises:
      ConfigError: a setting is wrong, or differs from the one the workdir was trained with
        (`resume.py`), before any compilation.
      NonFiniteLossError: the loss became NaN/inf (no checkpoint of that state is written).
      NoCheckpointRestoresError: the workdir has checkpoints but none restores.
      CheckpointWriteError: a checkpoint could not be written (the previous one is intact).
    """
    settings = settings_lib.parse(config)
    run = run_lib.build_run(
        settings, workdir, mesh=mesh, train_data=train_data, model_config=model_config
    )
    run_lib.log_run(run)
    train = settings.train
    checkpoints = Checkpoints(
        os.path.join(run.workdir, "checkpoints"),
        max_to_keep=train.keep_checkpoints,
        async_saves=train.async_checkpoints,
    )
    with _closed_after(checkpoints) as closers:
        state, position = run_lib.restore_or_initialise(run, checkpoints)
        batches = run_lib.open_batches(run, train_data, position)
        if getattr(batches, "close", None) is not None:
            closers.append(batches.close)
        train_step = make_train_step(
            run.spec,
            run.loss,
            run.optimizer,
            run.mesh,
            state,
            compute_dtype=setup.compute_dtype(train),
        )
        actions = _actions(run, checkpoints, state, closers)
        state, step, stopped = _steps(run, state, batches, train_step, actions, on_step)
    model_dir = None
    if stopped == "finished" and train.save_model:
        model_dir = _save_final_model(run, state, checkpoints)
    return TrainResult(state, run.spec, step, stopped, actions.evaluation.last, model_dir)


@contextlib.contextmanager
def _closed_after(checkpoints: Checkpoints):
    """Yields a list of closers, called in reverse on the way out, then closes `checkpoints`
    (whose write error is raised unless another error is already on its way)."""
    closers: list[Callable[[], None]] = []
    failed = False
    try:
        yield closers
    except BaseException:
        failed = True
        raise
    finally:
        for close in reversed(closers):
            close()
        try:
            checkpoints.close()
        except CheckpointWriteError:
            if not failed:
                raise


def _actions(run: run_lib.Run, checkpoints: Checkpoints, state, closers: list) -> Actions:
    train = run.settings.train
    writer = MetricsWriter(run.workdir, active=run.primary, tensorboard=train.tensorboard)
    closers.append(writer.close)
    preemption = Preemption(enabled=train.handle_sigterm)
    closers.append(preemption.restore)
    start = int(jax.device_get(state.step))
    progress = ProgressBar(run.total_steps, run.layout.total, start_step=start, active=run.primary)
    return Actions(
        log=MetricsLog(writer, progress, train.log_every, run.total_steps),
        checkpoint=Checkpointing(
            checkpoints,
            run.workdir,
            run.record,
            run_lib.checkpoint_meta(run),
            train.checkpoint_every,
        ),
        evaluation=Evaluation(
            run_lib.make_evaluator(run), writer, train.eval_every, train.eval_at_end
        ),
        preemption=preemption,
    )


def _steps(run: run_lib.Run, state, batches, train_step, actions: Actions, on_step):
    """The loop, then the end of the run: `(state, step, stopped)`."""
    seed = run.settings.train.seed
    key = jax.jit(lambda: jax.random.key(seed), out_shardings=mesh_lib.replicated(run.mesh))()
    step = first = int(jax.device_get(state.step))
    first_step = FirstStepLog(run)
    start_time, position, stopped = time.perf_counter(), None, "finished"
    while step < run.total_steps:
        micro = [next(batches) for _ in range(run.layout.accum)]
        position = batches.state() if hasattr(batches, "state") else None
        device_batch = global_train_batch(micro, run.mesh)
        with first_step:
            state, metrics = train_step(state, device_batch, key)
        step += 1
        if step == first + 1:  # compiled: the progress line's rate counts steps from here
            actions.log.progress.restart(step)
        actions.log.record(metrics)
        if on_step is not None:
            on_step(step, state)
        if _between_steps(run, step, state, metrics, position, actions):
            stopped = "preempted"
            break
    actions.log.progress.close()
    check_finite(state, actions.checkpoints)
    if stopped == "finished":
        _finish(run, (first, step), state, position, actions, time.perf_counter() - start_time)
    return state, step, stopped


def _between_steps(run: run_lib.Run, step: int, state, metrics, position, actions) -> bool:
    """The periodic actions due after `step`; True when the run is to stop (preempted)."""
    checkpoints = actions.checkpoints
    if actions.log.due(step):
        check_finite(state, checkpoints, metrics)
        actions.checkpoint.check_writes()
        actions.log(step)
    if actions.preemption.reached(step):
        check_finite(state, checkpoints)
        actions.checkpoint(step, state, position)
        checkpoints.wait()
        logger.warning("stopped at step %d on SIGTERM; checkpoint saved", step)
        return True
    if actions.checkpoint.due(step):
        check_finite(state, checkpoints)
        actions.checkpoint(step, state, position)
    if actions.evaluation.due(step, run.total_steps):
        check_finite(state, checkpoints)
        actions.evaluation(step, state)
    return False


def _finish(run: run_lib.Run, steps, state, position, actions: Actions, seconds: float):
    """The final checkpoint (unless this step has one) and the final evaluation; `steps`: the
    first and the last step of this process's part of the run."""
    first, step = steps
    if step not in actions.checkpoints.all_steps():
        actions.checkpoint(step, state, position)
    actions.checkpoints.wait()
    if run.primary and first == step:
        logger.info("the run was complete already (step %d): nothing to train", step)
    elif run.primary:
        resumed = f" (steps {first + 1} to {step})" if first else ""
        logger.info("trained %d steps%s in %s", step - first, resumed, format_duration(seconds))
    actions.evaluation.final(step, state)


class FirstStepLog:
    """Times the first training step (its trace and compile) and logs what the compilation
    cache gave it; later steps pass through."""

    def __init__(self, run: run_lib.Run):
        self.run, self.done = run, False
        self.before: tuple[int, float] = (0, 0.0)
        self.start = 0.0

    def __enter__(self):
        if not self.done:
            if self.run.primary:
                logger.info("compiling the train step (the first step)...")
            self.before, self.start = compile_cache.programs_read(), time.perf_counter()

    def __exit__(self, *exc_info):
        if self.done or exc_info[0] is not None:
            return
        self.done = True
        if self.run.primary:
            seconds = time.perf_counter() - self.start
            logger.info(
                "first training step traced and compiled in %s; %s",
                format_duration(seconds),
                self.cache_effect(),
            )

    def cache_effect(self) -> str:
        programs, saved = (
            now - then for now, then in zip(compile_cache.programs_read(), self.before)
        )
        cache_dir = self.run.cache_dir
        if self.run.cache_off:
            return "no compilation cache (turned off at startup, see above)"
        if cache_dir is None:
            return "no compilation cache (train.compilation_cache_dir is off)"
        if programs:
            plural = "s" if programs != 1 else ""
            return (
                f"{programs} program{plural} read from the compilation cache in {cache_dir}, "
                f"{format_duration(saved)} of compiling saved"
            )
        return f"the compiled programs go to the compilation cache in {cache_dir}"


def _save_final_model(run: run_lib.Run, state, checkpoints: Checkpoints) -> str | None:
    if jax.process_count() == 1:
        return save_model(run.settings, run.spec, state, os.path.join(run.workdir, "model"))
    if run.primary:
        logger.warning(
            "several processes: the model is in the last checkpoint of %s; export it from one "
            "process: python -m deformable_detr_jax.training.to_pretrained WORKDIR FOLDER",
            checkpoints.directory,
        )
    return None


def save_model(
    config: Any, spec: state_lib.ModelSpec, state: state_lib.TrainState, folder: str
) -> str:
    """`checkpoint.save_pretrained` of the trained model (with the processor of the run's
    evaluation transform) to `folder`. `config`: the run's settings or recipe."""
    from deformable_detr_jax.checkpoint import save_pretrained

    settings = settings_lib.parse(config)
    model = state_lib.merged_model(spec, state)
    processor = run_lib.processor_for(settings.data.augment)
    save_pretrained(model, folder, processor=processor, overwrite=True)
    if jax.process_index() == 0:
        logger.info("saved the model to %s", folder)
    return folder
