"""The training loop: `train(config, workdir)`.

    setup (no compilation): config groups, batch layout vs devices, data sources, model and loss
      configs, optimizer groups          -> ConfigError naming the setting on bad input
    workdir: a workdir with checkpoints must have been trained with the same settings
      (`resume.py`: one ConfigError listing every difference); it remembers them in config.json
    state: resume the newest checkpoint in workdir/checkpoints that restores (a corrupt one is
      moved aside, see `checkpointing.py`), else initialise (random, ImageNet backbone, or a
      detection checkpoint) replicated on the mesh
    loop: `accum` batches per step from this process's stream -> one global (accum, bs, ...)
      array split over "data" -> jitted `train_step` (donated state) -> metrics every
      `log_every` steps (JSONL, TensorBoard, progress line), async checkpoints every
      `checkpoint_every`, COCO evaluation every `eval_every`
    end: final checkpoint, final evaluation, `save_pretrained` of the model to workdir/model

Stops: SIGTERM (or, on several hosts, JAX's preemption notice) saves a checkpoint at the
current step and returns `stopped="preempted"`; a non-finite loss raises `NonFiniteLossError`
without saving, so the last checkpoint is the last good state (the step itself never applies a
non-finite update: see `step.py`); a checkpoint that cannot be written (disk full) raises
`CheckpointWriteError` naming the last intact one. The checkpoint manager is closed on every path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from deformable_detr_jax import compile_cache
from deformable_detr_jax.training import mesh as mesh_lib
from deformable_detr_jax.training import optimizer as optimizer_lib
from deformable_detr_jax.training import resume, setup
from deformable_detr_jax.training import train_state as state_lib
from deformable_detr_jax.training.checkpointing import Checkpoints, CheckpointWriteError
from deformable_detr_jax.training.cpu.host_memory import retained_host_memory
from deformable_detr_jax.training.metrics import MetricsWriter, ProgressBar, format_duration
from deformable_detr_jax.training.step import TRAIN_KEYS, make_eval_step, make_train_step

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the message names the step and the last checkpoint."""


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


# ----------------------------------------------------------------------------- batches


def stack_micro_batches(
    batches: Sequence[Mapping[str, np.ndarray]], shape: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    """`accum` host batches -> one `(accum, bs, ...)` batch of `TRAIN_KEYS`, images zero-padded
    (mask False) to the largest height and width among them, or to `shape`."""
    height = max(b["pixel_values"].shape[1] for b in batches)
    width = max(b["pixel_values"].shape[2] for b in batches)
    if shape is not None:
        height, width = max(height, shape[0]), max(width, shape[1])
    out = {}
    for key in TRAIN_KEYS:
        arrays = []
        for b in batches:
            array = np.asarray(b[key])
            if key in ("pixel_values", "pixel_mask"):
                pad = [(0, 0), (0, height - array.shape[1]), (0, width - array.shape[2])]
                array = np.pad(array, pad + [(0, 0)] * (array.ndim - 3))
            arrays.append(array)
        out[key] = np.stack(arrays)
    return out


def pad_images(batch: Mapping[str, np.ndarray], height: int, width: int) -> dict[str, np.ndarray]:
    """`pixel_values (bs, h, w, 3)` / `pixel_mask (bs, h, w)` zero-padded (mask False) to
    `(height, width)`; other entries unchanged."""
    out = dict(batch)
    for key in ("pixel_values", "pixel_mask"):
        array = np.asarray(batch[key])
        pad = [(0, 0), (0, height - array.shape[1]), (0, width - array.shape[2])]
        out[key] = np.pad(array, pad + [(0, 0)] * (array.ndim - 3))
    return out


def global_eval_batch(local: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's evaluation batch -> global arrays (image sizes agreed across processes)."""
    if jax.process_count() > 1:
        height, width = mesh_lib.agree_on_max(local["pixel_values"].shape[1:3])
        local = pad_images(local, height, width)
    return mesh_lib.host_to_global(local, mesh)


def global_train_batch(batches: Sequence[Mapping[str, np.ndarray]], mesh) -> dict[str, jax.Array]:
    """This process's micro-batches -> the global `(accum, bs, ...)` batch on the mesh. With
    several processes the padded image size is agreed first (each pads to the largest)."""
    local = stack_micro_batches(batches)
    if jax.process_count() > 1:
        shape = mesh_lib.agree_on_max(local["pixel_values"].shape[2:4])
        local = stack_micro_batches(batches, shape)
    return mesh_lib.host_to_global(local, mesh, batch_axis=1)


# ----------------------------------------------------------------------------- preemption


class _Preemption:
    """SIGTERM -> a flag checked once per step (one process); JAX's preemption sync point on
    several (all processes stop at the same step)."""

    def __init__(self, enabled: bool = True):
        self.requested = False
        self._previous = None
        self._multi = jax.process_count() > 1
        if enabled and not self._multi:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True
        logger.warning("SIGTERM received: saving a checkpoint and stopping after this step")

    def reached(self, step: int) -> bool:
        if self._multi:
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # no preemption service
                return False
        return self.requested

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------- train


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
    values = jax.device_get(history)
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


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
      config: a recipe's ConfigDict (`configs/*.py`) or a mapping of the same groups.
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
    shown = os.fspath(workdir)
    workdir = os.path.abspath(shown)
    setup.check_groups(config)
    train_cfg, opt_cfg = config["train"], config["optimizer"]
    mesh = mesh_lib.make_data_mesh() if mesh is None else mesh
    primary = jax.process_index() == 0
    # WORKDIR/compile_cache (or a directory JAX was pointed at from outside, kept as it is), or
    # off: by the setting, or for several processes on CPU, where they cannot share it
    cache_dir, cache_off = compile_cache.training_cache(
        setup._get(train_cfg, "compilation_cache_dir", "auto"),
        workdir,
        jax.process_count(),
        mesh.devices.flat[0].platform,
    )
    if cache_off:  # on every process: each decides (the same way) for itself
        logger.info("compilation cache off: %s", cache_off)
    layout = setup.batch_layout(config, mesh.size, jax.process_count())
    dtype = setup.compute_dtype(config)
    param_dtype = setup.param_dtype(config)

    # ---- data sources and configs (every check before compiling)
    eval_every = int(setup._get(train_cfg, "eval_every", 0) or 0)
    eval_at_end = bool(setup._get(train_cfg, "eval_at_end", True))
    if train_data is None:
        train_source = setup.make_source(config, "train")
        eval_source = setup.make_source(config, "eval") if (eval_every or eval_at_end) else None
        model_cfg = setup.model_config(config, train_source)
        num_records = len(train_source)
    else:
        if model_config is None:
            raise setup.ConfigError("train(train_data=...) needs model_config=")
        train_source = eval_source = None
        model_cfg = model_config
        num_records = int(getattr(train_data, "num_records", layout.total))
    loss_cfg = setup.loss_config(config, model_cfg)
    spec = state_lib.model_spec(model_cfg, tuple(opt_cfg["frozen"]))
    labels = {name: optimizer_lib.param_group(name, opt_cfg) for name in spec.trainable}
    steps_per_epoch = max(num_records // layout.total, 1)
    total = setup.total_steps(config, steps_per_epoch)
    tx, schedules = optimizer_lib.make_optimizer(opt_cfg, labels, steps_per_epoch)
    if primary:
        groups = {g: sum(1 for v in labels.values() if v == g) for g in optimizer_lib.GROUPS}
        logger.info(
            "model %s, %d labels; %d trained tensors %s, %d frozen; %d steps (%d per epoch), "
            "batch %d = %d x %d micro-batches on %d devices / %d processes",
            model_cfg.variant,
            model_cfg.num_labels,
            len(spec.trainable),
            groups,
            len(spec.frozen),
            total,
            steps_per_epoch,
            layout.total,
            layout.accum,
            layout.micro,
            mesh.size,
            jax.process_count(),
        )

    # ---- the workdir's settings, then its newest checkpoint that restores
    checkpoints = Checkpoints(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=int(setup._get(train_cfg, "keep_checkpoints", 3)),
        async_saves=bool(setup._get(train_cfg, "async_checkpoints", True)),
    )
    settings = resume.payload(config, model_cfg)
    closers: list[Callable[[], None]] = []
    failed = False
    try:
        if checkpoints.all_steps() or checkpoints.corrupt_folders():
            recorded = os.path.isfile(os.path.join(workdir, resume.SETTINGS_FILE))
            fallback = None if recorded else _settings_from_checkpoints(checkpoints)
            resume.check_settings(workdir, settings, shown=shown, fallback=fallback)
        abstract = state_lib.abstract_train_state(spec, tx, mesh, param_dtype)
        restored = checkpoints.restore_latest(abstract)
        data_position = None
        if restored is not None:
            state, data_position, _ = restored
            logger.info("resumed from checkpoint %d in %s", int(state.step), checkpoints.directory)
        else:
            params, frozen = initial_weights(config, spec, mesh, param_dtype)
            state = state_lib.create_train_state(params, frozen, tx, mesh)

        if train_data is None:
            batches = setup.make_batches(
                config,
                train_source,
                train=True,
                batch_size=layout.per_process,
                num_labels=model_cfg.num_labels,
                state=data_position,
            )
        else:
            batches = train_data
            if data_position is not None:
                batches.restore(data_position)
        if getattr(batches, "close", None) is not None:
            closers.append(batches.close)

        train_step = make_train_step(
            spec, loss_cfg, tx, mesh, state, compute_dtype=dtype, schedules=schedules
        )
        seed = int(setup._get(train_cfg, "seed", 0))
        base_key = jax.jit(lambda: jax.random.key(seed), out_shardings=mesh_lib.replicated(mesh))()
        evaluate = None
        if eval_source is not None:
            evaluate = _make_evaluator(config, spec, mesh, eval_source, layout, model_cfg, dtype)

        writer = MetricsWriter(
            workdir, active=primary, tensorboard=bool(setup._get(train_cfg, "tensorboard", True))
        )
        closers.append(writer.close)
        meta = {
            "config": settings["config"],
            "total_steps": total,
            "num_processes": jax.process_count(),
            "model_config": model_cfg.to_hf(),
            "processor": processor_for(config).to_dict() if train_source is not None else None,
        }
        preemption = _Preemption(enabled=bool(setup._get(train_cfg, "handle_sigterm", True)))
        closers.append(preemption.restore)
        # on CPU each step reuses the host memory of the step before (host_memory)
        on_cpu = mesh.devices.flat[0].platform == "cpu"
        with retained_host_memory() if on_cpu else contextlib.nullcontext():
            state, step, stopped, eval_metrics = _loop(
                state,
                batches,
                train_step,
                base_key,
                checkpoints,
                writer,
                preemption,
                evaluate,
                workdir=workdir,
                settings=settings,
                meta=meta,
                layout=layout,
                mesh=mesh,
                total=total,
                log_every=max(int(setup._get(train_cfg, "log_every", 50)), 1),
                checkpoint_every=int(setup._get(train_cfg, "checkpoint_every", 0) or 0),
                eval_every=eval_every,
                eval_at_end=eval_at_end,
                on_step=on_step,
                cache_dir=cache_dir,
                cache_off=cache_off,
            )
    except BaseException:
        failed = True
        raise
    finally:
        for close in reversed(closers):
            close()
        try:
            checkpoints.close()
        except CheckpointWriteError:
            if not failed:  # else the error in flight is the one to report
                raise

    model_dir = None
    if stopped == "finished" and bool(setup._get(train_cfg, "save_model", True)):
        if jax.process_count() == 1:
            model_dir = save_model(config, spec, state, os.path.join(workdir, "model"))
        elif primary:
            logger.warning(
                "several processes: the model is in the last checkpoint of %s; export it from one "
                "process: python -m deformable_detr_jax.training.to_pretrained WORKDIR FOLDER",
                checkpoints.directory,
            )
    return TrainResult(state, spec, step, stopped, eval_metrics, model_dir)


def _settings_from_checkpoints(checkpoints: Checkpoints) -> dict[str, Any] | None:
    """The `resume.payload` of a workdir written before `config.json` existed, rebuilt from the
    newest checkpoint whose meta item reads."""
    from deformable_detr_jax.config import DeformableDetrConfig

    for step in reversed(checkpoints.all_steps()):
        meta = checkpoints.read_meta(step)
        if meta and "config" in meta and "model_config" in meta:
            model = DeformableDetrConfig.from_hf(meta["model_config"])
            return {
                "config": meta["config"],
                "model": json.loads(json.dumps(dataclasses.asdict(model))),
            }
    return None


def _log_first_step(seconds: float, before: tuple[int, float], cache_dir, cache_off=None) -> None:
    """How long the first step's compile took, and what the compilation cache gave it."""
    programs, saved = (now - then for now, then in zip(compile_cache.programs_read(), before))
    if cache_off:
        where = "no compilation cache (turned off at startup, see above)"
    elif cache_dir is None:
        where = "no compilation cache (train.compilation_cache_dir is off)"
    elif programs:
        plural = "s" if programs != 1 else ""
        where = (
            f"{programs} program{plural} read from the compilation cache in {cache_dir}, "
            f"{format_duration(saved)} of compiling saved"
        )
    else:
        where = f"the compiled programs go to the compilation cache in {cache_dir}"
    logger.info(
        "first training step traced and compiled in %s; %s", format_duration(seconds), where
    )


def _loop(
    state,
    batches,
    train_step,
    base_key,
    checkpoints: Checkpoints,
    writer: MetricsWriter,
    preemption: _Preemption,
    evaluate,
    *,
    workdir: str,
    settings: dict,
    meta: dict,
    layout: setup.BatchLayout,
    mesh,
    total: int,
    log_every: int,
    checkpoint_every: int,
    eval_every: int,
    eval_at_end: bool,
    on_step,
    cache_dir=None,
    cache_off=None,
):
    """The steps of `train`: returns `(state, step, stopped, eval_metrics)`."""
    primary = jax.process_index() == 0
    step = int(jax.device_get(state.step))
    progress = ProgressBar(total, layout.total, start_step=step, active=primary)
    history: list[dict[str, jax.Array]] = []
    eval_metrics, stopped = None, "finished"

    def check_finite(last_metrics=None):
        bad = int(jax.device_get(state.bad_step))
        if bad < 0:
            return
        checkpoints.wait()
        latest = checkpoints.latest_step()
        detail = ""
        if last_metrics is not None:
            values = jax.device_get(last_metrics)
            detail = (
                " ("
                + ", ".join(f"{k}={float(v):.4g}" for k, v in values.items() if not np.isfinite(v))
                + ")"
            )
        raise NonFiniteLossError(
            f"training stopped: the loss or its gradient was not finite (NaN or inf) at step "
            f"{bad}{detail}; no update was applied from that step on and no checkpoint of it "
            f"was written. The last good checkpoint is "
            f"{'step ' + str(latest) if latest is not None else 'none (none was written yet)'} in "
            f"{checkpoints.directory}. Lower optimizer.lr (or use train.compute_dtype='float32'), "
            "check the data for broken boxes or images, then rerun to resume from that checkpoint."
        )

    def save(position):
        # the settings go with the first checkpoint (replacing those of a run that wrote none)
        first = not checkpoints.all_steps()
        if primary and (first or not os.path.isfile(os.path.join(workdir, resume.SETTINGS_FILE))):
            try:
                resume.write_settings(workdir, settings)
            except OSError as err:
                raise CheckpointWriteError(
                    step, workdir, f"{resume.SETTINGS_FILE}: {err}", checkpoints.latest_step()
                ) from err
        checkpoints.save(state, position, meta)

    def check_writes():
        """Every process stops together when a background save failed on any of them."""
        try:
            checkpoints.check()
            error = None
        except CheckpointWriteError as err:
            error = err
        if mesh_lib.any_process(error is not None):
            if error is None:
                error = CheckpointWriteError(
                    None,
                    checkpoints.directory,
                    "failed on another process",
                    checkpoints.latest_step(),
                )
            raise error

    start_time = time.perf_counter()
    position = None
    first_step = True
    while step < total:
        micro = [next(batches) for _ in range(layout.accum)]
        position = batches.state() if hasattr(batches, "state") else None
        device_batch = global_train_batch(micro, mesh)
        if first_step:
            read_before = compile_cache.programs_read()
            compile_start = time.perf_counter()
        state, metrics = train_step(state, device_batch, base_key)
        if first_step:
            first_step = False
            if primary:
                _log_first_step(
                    time.perf_counter() - compile_start, read_before, cache_dir, cache_off
                )
        step += 1
        history.append(metrics)
        if on_step is not None:
            on_step(step, state)
        if step % log_every == 0 or step == total:
            check_finite(metrics)
            check_writes()
            values = _mean_metrics(history)
            history = []
            writer.write(step, values, split="train")
            progress.update(step, {"loss": values["loss"]})
        if preemption.reached(step):
            check_finite()
            save(position)
            checkpoints.wait()
            stopped = "preempted"
            logger.warning("stopped at step %d on SIGTERM; checkpoint saved", step)
            break
        if checkpoint_every and step % checkpoint_every == 0:
            check_finite()
            save(position)
        if evaluate is not None and eval_every and step % eval_every == 0 and step < total:
            check_finite()
            eval_metrics = evaluate(state)
            writer.write(step, eval_metrics or {}, split="eval")
    progress.close()
    check_finite()
    if stopped == "finished":
        if step not in checkpoints.all_steps():
            save(position)
        checkpoints.wait()
        if primary:
            logger.info(
                "trained %d steps in %s", step, format_duration(time.perf_counter() - start_time)
            )
        if evaluate is not None and eval_at_end:
            eval_metrics = evaluate(state)
            writer.write(step, eval_metrics or {}, split="eval")
            if primary and eval_metrics:
                logger.info(
                    "evaluation at step %d: AP %.3f AP50 %.3f AP75 %.3f",
                    step,
                    eval_metrics["AP"],
                    eval_metrics["AP50"],
                    eval_metrics["AP75"],
                )
    return state, step, stopped, eval_metrics


# ----------------------------------------------------------------------------- helpers


def initial_weights(config: Any, spec: state_lib.ModelSpec, mesh, dtype=None) -> tuple[dict, dict]:
    """`(params, frozen)` for a new run: random, then `model.init_from` and
    `model.backbone_weights` copied over (see `initialization.py`)."""
    from deformable_detr_jax.training import initialization

    model_cfg = config["model"]
    seed = int(setup._get(config["train"], "seed", 0))
    params, frozen = state_lib.init_weights(spec, seed, mesh, dtype)
    init_from = setup._get(model_cfg, "init_from")
    backbone = setup._get(model_cfg, "backbone_weights")
    if not init_from and not backbone:
        return params, frozen
    weights = {name: np.asarray(jax.device_get(v)) for name, v in {**params, **frozen}.items()}
    if init_from:
        source = state_lib.model_weights(initialization.load_checkpoint_model(init_from))
        weights, kept = initialization.transplant(weights, source)
        if jax.process_index() == 0:
            logger.info(
                "initialised from %s; %d tensors kept fresh: %s",
                init_from,
                len(kept),
                ", ".join(kept[:8]) + (" ..." if len(kept) > 8 else ""),
            )
    if backbone:
        shapes = {name: value.shape for name, value in weights.items()}
        try:
            weights.update(initialization.backbone_weights_from_resnet(backbone, shapes))
        except (FileNotFoundError, ValueError) as err:
            raise setup.ConfigError(str(err)) from err
    weights = state_lib.place_weights(weights, mesh)
    return state_lib.split_weights(spec, weights)


def _make_evaluator(config, spec, mesh, source, layout, model_cfg, dtype):
    """`evaluate(state) -> metrics | None` over the whole evaluation source (COCO mAP)."""
    from deformable_detr_jax.inference.evaluation import CocoEvaluator, coco_evaluate_stream

    top_k = int(setup._get(config["train"], "eval_top_k", 100))
    eval_step = make_eval_step(spec, mesh, top_k=top_k, compute_dtype=dtype)
    annotations = getattr(source, "annotations_json", None)

    def evaluate(state: state_lib.TrainState) -> dict[str, float] | None:
        start = time.perf_counter()
        batches = setup.make_batches(
            config,
            source,
            train=False,
            batch_size=layout.eval_per_process,
            num_labels=model_cfg.num_labels,
        )
        evaluator = CocoEvaluator(
            getattr(source, "category_ids", None),
            label_names=getattr(source, "label_names", None),
            ground_truth_json=None if annotations is None else os.fspath(annotations),
        )
        try:
            metrics = coco_evaluate_stream(
                lambda batch: eval_step(state.params, state.frozen, batch),
                batches,
                evaluator,
                to_device=lambda local: global_eval_batch(local, mesh),
                gather=mesh_lib.gather_to_host,
                is_primary=jax.process_index() == 0,
            )
        finally:
            batches.close()
        if metrics is not None:
            logger.info(
                "evaluated %d images in %.1f s", len(evaluator.images), time.perf_counter() - start
            )
        return metrics

    return evaluate


def processor_for(config: Any):
    """The `ImageProcessor` matching the recipe's evaluation transform (for `save_pretrained`)."""
    from deformable_detr_jax.processing.image_processor import ImageProcessor

    augment = setup.augment_config(config)
    return ImageProcessor(
        size={"shortest_edge": augment.eval_size, "longest_edge": augment.eval_max_size},
        resize_backend="pil",
    )


def save_model(
    config: Any, spec: state_lib.ModelSpec, state: state_lib.TrainState, folder: str
) -> str:
    """`checkpoint.save_pretrained` of the trained model (with its processor) to `folder`."""
    from deformable_detr_jax.checkpoint import save_pretrained

    model = state_lib.merged_model(spec, state)
    save_pretrained(model, folder, processor=processor_for(config), overwrite=True)
    if jax.process_index() == 0:
        logger.info("saved the model to %s", folder)
    return folder
