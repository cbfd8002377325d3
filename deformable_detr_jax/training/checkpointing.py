"""Training checkpoints: `ocp.CheckpointManager` over the train state, the data position and the config.

    workdir/checkpoints/<step>/
      state/   ocp.args.StandardSave(TrainState): step, trained params, optimizer state, frozen
      data/    ocp.args.JsonSave: {"processes": [iterator state of process 0, 1, ...]}
      meta/    ocp.args.JsonSave: {"step", "config" (the run's ConfigDict as JSON), ...,
               "integrity": checksums of every state array, of data and of meta (`integrity.py`)}

Saves are asynchronous (the arrays are copied off the device, then written by a background
thread while training goes on); a step directory appears only once complete, so a run killed
mid-save resumes from the previous one (the half-written `<step>.orbax-checkpoint-tmp*` folder is
removed when the next run starts). `max_to_keep` old checkpoints are kept. Every process takes part
in every save; the data positions of all processes are gathered first so that the JSON item
(written by the primary process) holds each one's position, and each process resumes from its own.
A save that fails in the background (disk full, ...) is reported by the next `check()`, `save()`
or `wait()` as a `CheckpointWriteError` naming the last checkpoint that is intact.

Restoring reads a step on each process by itself (no collective inside orbax, so one process's
failure cannot leave the others waiting) into host arrays, checks the checksums, then places the
arrays on the mesh. `restore_latest` tries the newest step first; a step that fails to read or to
verify on any process is moved aside by the primary process (`<step>` -> `corrupt-<step>`, with
`CORRUPT.txt` saying why; nothing is deleted), logged, and the previous step is tried, so every
process resumes from the same step. A checkpoint whose arrays have other names or shapes than this
run's state (another model, another version of this package) is not corruption: it raises
`CheckpointMismatchError` and nothing is moved.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from deformable_detr_jax.cli import exits
from deformable_detr_jax.training import integrity
from deformable_detr_jax.training import mesh as mesh_lib
from deformable_detr_jax.training.setup import ConfigError
from deformable_detr_jax.training.train_state import TrainState

logger = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta")
CORRUPT_PREFIX = "corrupt-"  # orbax takes "<name>_<digits>" for a step, never "<name>-<digits>"
REASON_FILE = "CORRUPT.txt"


class CheckpointCorruptError(RuntimeError):
    """One checkpoint cannot be read back as it was written (unreadable, truncated, missing a file,
    or failing its checksums). `reason` is one line; `details` the full traceback, if any."""

    def __init__(self, step: int, directory: str, reason: str, details: str = ""):
        super().__init__(f"checkpoint {step} in {directory} does not restore: {reason}")
        self.step, self.directory, self.reason, self.details = step, directory, reason, details


class CheckpointMismatchError(ConfigError):
    """A checkpoint holds another train state than this run builds (not corruption)."""


class NoCheckpointRestoresError(RuntimeError):
    """Checkpoints exist but none restores; each was moved aside. `details`: full tracebacks."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions, ...); `step` is the one that
    failed, `intact` the newest one on disk (None: none). Training stops."""

    def __init__(
        self, step: int | None, directory: str, reason: str, intact: int | None, details: str = ""
    ):
        kept = (
            f"checkpoint {intact} is intact; fix that (e.g. free disk space), then rerun the same "
            "command to resume from it"
            if intact is not None
            else "no earlier checkpoint exists; fix that (e.g. free disk space) and rerun"
        )
        what = f"checkpoint {step}" if step is not None else "a checkpoint"
        super().__init__(f"writing {what} to {directory} failed: {reason}; {kept}")
        self.step, self.directory, self.reason, self.intact = step, directory, reason, intact
        self.details = details


def short_reason(err: BaseException) -> str:
    """The most specific message in an exception chain (orbax wraps tensorstore's errors), as one
    line of at most 300 characters (its start and its end, where tensorstore puts the OS error)."""
    seen, chain = set(), [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if id(nxt) in seen:
            break
        seen.add(id(nxt))
        chain.append(nxt)
    for candidate in reversed(chain):  # innermost first
        text = " ".join(str(candidate).split())
        if text:
            text = f"{type(candidate).__name__}: {text}"
            return text if len(text) <= 300 else f"{text[:180]} ... {text[-115:]}"
    return type(err).__name__


def _full_traceback(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))


def _numpy_target(abstract: Any) -> Any:
    return jax.tree.map(lambda s: np.empty(s.shape, s.dtype), abstract)


def _structure(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        integrity.path_name(p): (tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype).name)
        for p, leaf in leaves
    }


class Checkpoints:
    """Save / restore of the train state, the data iterator positions and run metadata.

    Args:
      directory: where the numbered step folders go (created).
      max_to_keep: how many checkpoints to keep (oldest deleted first); None keeps all.
      async_saves: write in a background thread (`wait()` blocks until written).
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_saves: bool = True
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        exits.closed_loop_callbacks.install()  # orbax's noise after a failed save or read
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_saves,
            cleanup_tmp_directories=True,  # half-written saves of a killed run
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._pending: int | None = None  # the step of the save that may still be running
        self._closed = False

    # ------------------------------------------------------------------------- listing

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self.manager.all_steps())

    def corrupt_folders(self) -> list[str]:
        """Names of the folders moved aside by earlier restores (`corrupt-<step>`)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(n for n in os.listdir(self.directory) if n.startswith(CORRUPT_PREFIX))

    # ------------------------------------------------------------------------- saving

    def _write_error(self, err: BaseException, step: int | None) -> CheckpointWriteError:
        failed = self._pending if step is None else step
        self._pending = None
        try:
            self.manager.reload()  # the failed step is not a checkpoint
        except Exception:  # noqa: S110 (the listing below is then orbax's last one)
            pass
        intact = [s for s in self.all_steps() if s != failed]
        return CheckpointWriteError(
            failed,
            self.directory,
            short_reason(err),
            intact[-1] if intact else None,
            _full_traceback(err),
        )

    def check(self) -> None:
        """Raises `CheckpointWriteError` if the last background save has failed; never waits for
        one still running."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()  # finished: returns at once, or raises what the writer raised

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
        consumed (None when the data cannot resume). Raises `CheckpointWriteError` when this
        save, or the previous one still running, cannot be written.
        """
        step = int(jax.device_get(state.step)) if step is None else int(step)
        self.wait()  # orbax waits for the previous save anyway; its failure is its own
        if step in self.manager.all_steps():
            return False
        data = {"processes": mesh_lib.all_gather_json(data_state)}
        sealed = integrity.seal({**meta, "step": step}, state, data)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave(sealed),
        )
        try:
            saved = self.manager.save(step, args=args, force=True)
        except Exception as err:
            raise self._write_error(err, step) from err
        if saved:
            self._pending = step
            logger.info("checkpoint of step %d started (%s)", step, self.directory)
        return saved

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is on disk (`CheckpointWriteError` if not)."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as err:  # what the writer raised: OSError, ValueError from tensorstore
            raise self._write_error(err, None) from err
        self._pending = None

    def close(self) -> None:
        """Waits for the pending save and releases orbax's threads, on every path: an error of the
        pending save is raised (as `CheckpointWriteError`) only after everything is closed."""
        if self._closed:
            return
        self._closed = True
        error = None
        try:
            self.wait()
        except CheckpointWriteError as err:
            error = err
        try:
            self.manager.close()
        except Exception:  # noqa: S110 (the failed save once more: it is `error`)
            pass
        if error is not None:
            raise error

    # ------------------------------------------------------------------------- restoring

    def read_meta(self, step: int) -> dict[str, Any] | None:
        """The meta item of `step` (not verified), or None when it cannot be read."""
        return read_meta(self.directory, step)

    def read(self, step: int, abstract_state: Any = None) -> tuple[Any, dict, dict]:
        """`read_step` of this directory."""
        return read_step(self.directory, step, abstract_state)

    def restore(
        self, abstract_state: TrainState, step: int | None = None
    ) -> tuple[TrainState, Any, dict[str, Any]]:
        """`(state, this process's data position, meta)` of `step` (default: the latest).

        Args:
          abstract_state: shapes, dtypes and shardings to restore into
            (`train_state.abstract_train_state`).

        Raises:
          CheckpointCorruptError: it does not read back as written (nothing is moved here).
          CheckpointMismatchError: it holds another state, or was written by another number of
            processes.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        host, data, meta = self.read(step, abstract_state)
        state = jax.tree.map(
            lambda a, s: jax.make_array_from_callback(a.shape, s.sharding, lambda i: a[i]),
            host,
            abstract_state,
        )
        positions = data.get("processes") or []
        if positions and len(positions) != jax.process_count():
            raise CheckpointMismatchError(
                f"checkpoint {step} in {self.directory} was written by {len(positions)} processes "
                f"and this run has {jax.process_count()}; the data positions cannot be mapped. "
                "Resume with the same number of processes (or start a new workdir from its "
                "weights)"
            )
        position = positions[jax.process_index()] if positions else None
        return state, position, meta

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, Any, dict] | None:
        """The newest checkpoint that restores on every process, or None when there is none and
        none was ever moved aside. Failing ones are moved aside (module docstring).

        Raises:
          NoCheckpointRestoresError: checkpoints exist (or were moved aside before) but none
            restores.
          CheckpointMismatchError: see `restore`.
        """
        failures: list[tuple[int, str, str]] = []  # (step, moved to, reason)
        details = []
        for step in reversed(self._agreed_steps()):
            outcome, result, detail = {}, None, ""
            try:
                result = self.restore(abstract_state, step)
            except CheckpointCorruptError as err:
                outcome = {"corrupt": err.reason}
                detail = f"checkpoint {step}:\n{err.details or err.reason}\n"
                details.append(detail)
            except CheckpointMismatchError as err:
                outcome = {"mismatch": str(err)}
            # every process decides on the same outcomes (a collective: all of them get here)
            outcomes = mesh_lib.all_gather_json(outcome)
            mismatch = [o["mismatch"] for o in outcomes if "mismatch" in o]
            if mismatch:
                raise CheckpointMismatchError(mismatch[0])
            bad = [(i, o["corrupt"]) for i, o in enumerate(outcomes) if "corrupt" in o]
            if not bad:
                return result
            index, reason = bad[0]
            if jax.process_count() > 1:
                reason = f"{reason} (on process {index})"
            moved = self._move_aside(step, reason, detail)
            failures.append((step, moved, reason))
            logger.warning(
                "checkpoint %d in %s does not restore (%s); moved it to %s, nothing deleted; "
                "trying the previous one",
                step,
                self.directory,
                reason,
                moved,
            )
        if not failures and not self.corrupt_folders():
            return None
        lines = [f"  {os.path.basename(moved)}: {reason}" for _, moved, reason in failures]
        earlier = [
            n
            for n in self.corrupt_folders()
            if n not in {os.path.basename(m) for _, m, _ in failures}
        ]
        if earlier:
            lines.append(f"  moved aside by earlier runs: {', '.join(earlier)} (see CORRUPT.txt)")
        raise NoCheckpointRestoresError(
            f"no checkpoint in {self.directory} restores; each was moved aside (nothing "
            "deleted):\n" + "\n".join(lines) + "\nIf a failure was passing (a network disk), "
            "rename a folder back to its step number and rerun; to start over, use another "
            "--workdir (or remove the checkpoints folder)",
            "\n".join(details),
        )

    def _agreed_steps(self) -> list[int]:
        """The steps every process sees, ascending."""
        listed = mesh_lib.all_gather_json(self.all_steps())
        common = set(listed[0]).intersection(*map(set, listed[1:]))
        return sorted(common)

    def _move_aside(self, step: int, reason: str, details: str) -> str:
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, f"{CORRUPT_PREFIX}{step}")
        if jax.process_index() == 0:
            n = 1
            while os.path.exists(target):
                n += 1
                target = os.path.join(self.directory, f"{CORRUPT_PREFIX}{step}.{n}")
            os.rename(source, target)
            try:
                with open(os.path.join(target, REASON_FILE), "w") as f:
                    f.write(f"checkpoint {step} did not restore: {reason}\n\n{details}")
            except OSError as err:  # a full disk: the folder is moved, the note is optional
                logger.warning("could not write %s in %s: %s", REASON_FILE, target, err)
        if jax.process_count() > 1:
            target = mesh_lib.all_gather_json(target)[0]
            multihost_utils.sync_global_devices(f"checkpoints: moved {step} aside")
        self.manager.reload()
        return target


# ----------------------------------------------------------------------------- reading one step


def _reader():
    """A checkpointer of this process alone: no barrier, so a failing read cannot hang others."""
    options = ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()}
    )
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=options)


def read_meta(directory: str | os.PathLike, step: int) -> dict[str, Any] | None:
    """The meta item of `directory/step` (not verified), or None when it cannot be read."""
    checkpointer = _reader()
    try:
        path = epath.Path(os.path.abspath(os.fspath(directory))) / str(int(step))
        meta = checkpointer.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(meta["meta"] or {})
    except Exception:  # corrupt: a full read says why
        return None
    finally:
        checkpointer.close()


def read_step(
    directory: str | os.PathLike, step: int, abstract_state: Any = None
) -> tuple[Any, dict, dict]:
    """`(state as host numpy arrays, data item, meta item)` of `directory/step`, read by this
    process alone (read-only: safe beside a running training job) and checked against the
    checksums written with it.

    `abstract_state` (shapes and dtypes) gives the tree to read into; None reads the tree the
    checkpoint holds (nested dicts). Raises `CheckpointCorruptError`, or
    `CheckpointMismatchError` when the checkpoint holds other arrays than `abstract_state`.
    """
    directory = os.path.abspath(os.fspath(directory))
    checkpointer = _reader()
    try:
        return _read(checkpointer, directory, int(step), abstract_state)
    finally:
        checkpointer.close()


def _read(checkpointer, directory: str, step: int, abstract_state: Any):
    path = epath.Path(directory) / str(step)

    def corrupt(what: str, err: BaseException | None = None) -> CheckpointCorruptError:
        reason = what if err is None else f"{what}: {short_reason(err)}"
        details = "" if err is None else _full_traceback(err)
        return CheckpointCorruptError(step, directory, reason, details)

    if not os.path.isdir(path):
        raise corrupt(f"{path} is missing")
    try:
        meta = checkpointer.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = dict(meta["meta"] or {})
    except Exception as err:
        raise corrupt("its meta item cannot be read", err) from err
    try:
        tree = ocp.StandardCheckpointHandler().metadata(path / "state")
        saved = getattr(tree, "tree", tree)
    except Exception as err:
        raise corrupt("its state metadata cannot be read", err) from err
    if abstract_state is not None:
        _check_structure(directory, step, _structure(saved), _structure(abstract_state))
        target = _numpy_target(abstract_state)
    else:
        target = _numpy_target(saved)
    try:
        restored = checkpointer.restore(
            path,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
            ),
        )
    except Exception as err:
        raise corrupt("its arrays cannot be read", err) from err
    state, data = restored["state"], dict(restored["data"] or {})
    found = integrity.problems(meta, state, data)
    if found is None:
        logger.warning(
            "checkpoint %d in %s has no checksums (written by an older version): restored "
            "without verifying its values",
            step,
            directory,
        )
    elif found:
        raise corrupt("; ".join(found))
    return state, data, meta


def _check_structure(directory: str, step: int, saved: dict, wanted: dict) -> None:
    if saved == wanted:
        return
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    shaped = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    parts = []
    for what, names in (
        ("missing", missing),
        ("not in this run's state", extra),
        ("of another shape or dtype", shaped),
    ):
        if names:
            parts.append(f"{len(names)} {what} (e.g. {', '.join(names[:2])})")
    raise CheckpointMismatchError(
        f"checkpoint {step} in {directory} holds another train state than this run builds: "
        f"arrays {'; '.join(parts)}. It was written by another model or another version of "
        "deformable_detr_jax; nothing was moved. Use another --workdir, or the version and "
        "settings that wrote it"
    )
