"""Training checkpoints: `ocp.CheckpointManager` over the train state, the data position and the config.

    workdir/checkpoints/<step>/
      state/   ocp.args.StandardSave(TrainState): step, trained params, optimizer state, frozen
      data/    ocp.args.JsonSave: {"processes": [iterator state of process 0, 1, ...]}
      meta/    ocp.args.JsonSave: {"step", "config" (the run's ConfigDict as JSON), ...}

Saves are asynchronous (the arrays are copied off the device, then written by a background
thread while training goes on); a step directory appears only once complete, so a run killed
mid-save resumes from the previous one. `max_to_keep` old checkpoints are kept. Every process
takes part in every save; the data positions of all processes are gathered first so that the
JSON item (written by the primary process) holds each one's position, and each process resumes
from its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from deformable_detr_jax.training import mesh as mesh_lib
from deformable_detr_jax.training.train_state import TrainState

logger = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta")


class Checkpoints:
    """Save / restore of the train state, the data iterator positions and run metadata.

    Args:
      directory: where the numbered step folders go (created).
      max_to_keep: how many checkpoints to keep (oldest deleted first); None keeps all.
      async_saves: write in a background thread (`wait()` blocks until written).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_saves: bool = True):  # fmt: skip
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_saves,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        state: TrainState,
        data_state: Mapping[str, Any] | None,
        meta: Mapping[str, Any],
        *,
        step: int | None = None,
    ) -> bool:
        """Starts saving `state` at `step` (default `state.step`); returns whether it saved.

        `data_state` is this process's iterator position after the last batch the state has
        consumed (None when the data cannot resume).
        """
        step = int(jax.device_get(state.step)) if step is None else int(step)
        if step in self.manager.all_steps():
            return False
        positions = mesh_lib.all_gather_json(data_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"processes": positions}),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        )
        saved = self.manager.save(step, args=args, force=True)
        if saved:
            logger.info("checkpoint of step %d started (%s)", step, self.directory)
        return saved

    def restore(
        self, abstract_state: TrainState, step: int | None = None
    ) -> tuple[TrainState, Any, dict[str, Any]]:
        """`(state, this process's data position, meta)` of `step` (default: the latest).

        Args:
          abstract_state: shapes, dtypes and shardings to restore into
            (`train_state.abstract_train_state`).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        positions = (restored["data"] or {}).get("processes") or []
        if positions and len(positions) != jax.process_count():
            raise ValueError(
                f"checkpoint {step} in {self.directory} was written by {len(positions)} processes "
                f"and this run has {jax.process_count()}; the data positions cannot be mapped. "
                "Resume with the same number of processes (or start a new workdir from its "
                "weights)"
            )
        position = positions[jax.process_index()] if positions else None
        return restored["state"], position, dict(restored["meta"] or {})

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
