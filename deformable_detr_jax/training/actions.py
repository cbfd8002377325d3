"""What the training loop does between steps: periodic actions and the stop conditions.

Each periodic action has `due(step)` and is called with the state: `MetricsLog` (JSONL,
TensorBoard, progress line every `train.log_every` steps), `Checkpointing` (every
`train.checkpoint_every`, with the workdir's `config.json` written beside the first checkpoint),
`Evaluation` (COCO mAP every `train.eval_every`). `check_finite` raises `NonFiniteLossError`
once the step recorded a non-finite loss; `Preemption` turns SIGTERM (or JAX's preemption
notice on several hosts) into a stop at the next step.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from deformable_detr_jax.training import mesh as mesh_lib
from deformable_detr_jax.training import resume
from deformable_detr_jax.training.checkpointing import Checkpoints, CheckpointWriteError
from deformable_detr_jax.training.metrics import MetricsWriter, ProgressBar
from deformable_detr_jax.training.train_state import TrainState

# the run is logged under the loop's name (one logger to follow a run by)
logger = logging.getLogger("deformable_detr_jax.training.loop")


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the message names the step and the last checkpoint."""


def check_finite(
    state: TrainState, checkpoints: Checkpoints, metrics: dict[str, jax.Array] | None = None
) -> None:
    """Raises `NonFiniteLossError` if a step of `state` was not finite (naming the metrics that
    were not, and the last good checkpoint)."""
    bad = int(jax.device_get(state.bad_step))
    if bad < 0:
        return
    checkpoints.wait()
    latest = checkpoints.latest_step()
    detail = ""
    if metrics is not None:
        values = jax.device_get(metrics)
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in values.items() if not np.isfinite(v))
        detail = f" ({shown})"
    last = f"step {latest}" if latest is not None else "none (none was written yet)"
    raise NonFiniteLossError(
        f"training stopped: the loss or its gradient was not finite (NaN or inf) at step "
        f"{bad}{detail}; no update was applied from that step on and no checkpoint of it "
        f"was written. The last good checkpoint is {last} in "
        f"{checkpoints.directory}. Lower optimizer.lr (or use train.compute_dtype='float32'), "
        "check the data for broken boxes or images, then rerun to resume from that checkpoint."
    )


class Preemption:
    """SIGTERM -> a flag checked once per step (one process); JAX's preemption sync point on
    several (all processes stop at the same step). `restore()` puts the old handler back."""

    def __init__(self, enabled: bool = True):
        self.requested = False
        self.previous = None
        self.multi = jax.process_count() > 1
        if enabled and not self.multi:
            try:
                self.previous = signal.signal(signal.SIGTERM, self.handle)
            except ValueError:  # not the main thread: leave signals alone
                self.previous = None

    def handle(self, signum, frame):
        del signum, frame
        self.requested = True
        logger.warning("SIGTERM received: saving a checkpoint and stopping after this step")

    def reached(self, step: int) -> bool:
        if self.multi:
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # no preemption service
                return False
        return self.requested

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


class MetricsLog:
    """Every `every` steps (and at `total`): the mean of the steps' metrics since the last line
    to the metrics files and the progress line."""

    def __init__(self, writer: MetricsWriter, progress: ProgressBar, every: int, total: int):
        self.writer, self.progress = writer, progress
        self.every, self.total = max(every, 1), total
        self.history: list[dict[str, jax.Array]] = []

    def record(self, metrics: dict[str, jax.Array]) -> None:
        self.history.append(metrics)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def __call__(self, step: int) -> None:
        values = jax.device_get(self.history)
        means = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
        self.history = []
        self.writer.write(step, means, split="train")
        self.progress.update(step, {"loss": means["loss"]})


class Checkpointing:
    """Every `every` steps (0: never but at the end and on SIGTERM): a checkpoint of the state
    and the data position; the workdir's `config.json` (`record`) goes with the first one."""

    def __init__(self, checkpoints: Checkpoints, workdir: str, record: dict, meta: dict, every):
        self.checkpoints, self.workdir = checkpoints, workdir
        self.record, self.meta, self.every = record, meta, every
        self.primary = jax.process_index() == 0

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def __call__(self, step: int, state: TrainState, position: Any) -> None:
        # the settings go with the first checkpoint (replacing those of a run that wrote none)
        first = not self.checkpoints.all_steps()
        settings_file = os.path.join(self.workdir, resume.SETTINGS_FILE)
        if self.primary and (first or not os.path.isfile(settings_file)):
            try:
                resume.write_settings(self.workdir, self.record)
            except OSError as err:
                latest = self.checkpoints.latest_step()
                raise CheckpointWriteError(
                    step, self.workdir, f"{resume.SETTINGS_FILE}: {err}", latest
                ) from err
        self.checkpoints.save(state, position, self.meta)

    def check_writes(self) -> None:
        """Every process stops together when a background save failed on any of them."""
        try:
            self.checkpoints.check()
            error = None
        except CheckpointWriteError as err:
            error = err
        if mesh_lib.any_process(error is not None):
            if error is None:
                error = CheckpointWriteError(
                    None,
                    self.checkpoints.directory,
                    "failed on another process",
                    self.checkpoints.latest_step(),
                )
            raise error


class Evaluation:
    """Every `every` steps before the last (0: never), and at the end when `at_end`: COCO mAP
    of the state, written to the metrics files."""

    def __init__(self, evaluate: Callable | None, writer: MetricsWriter, every: int, at_end: bool):
        self.evaluate, self.writer = evaluate, writer
        self.every, self.at_end = every, at_end
        self.last: dict[str, float] | None = None

    def due(self, step: int, total: int) -> bool:
        periodic = bool(self.every) and step % self.every == 0
        return self.evaluate is not None and periodic and step < total

    def __call__(self, step: int, state: TrainState) -> dict[str, float] | None:
        self.last = self.evaluate(state)
        self.writer.write(step, self.last or {}, split="eval")
        return self.last

    def final(self, step: int, state: TrainState) -> None:
        if self.evaluate is None or not self.at_end:
            return
        metrics = self(step, state)
        if jax.process_index() == 0 and metrics:
            logger.info(
                "evaluation at step %d: AP %.3f AP50 %.3f AP75 %.3f",
                step,
                metrics["AP"],
                metrics["AP50"],
                metrics["AP75"],
            )
