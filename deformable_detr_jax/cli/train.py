"""Train Deformable DETR from a recipe: a thin command line over `deformable_detr_jax.training`.

    python train.py ...   (or `deformable-detr-train ...`, `python -m deformable_detr_jax.cli.train ...`)

    python train.py --config configs/shapes_tiny.py --workdir runs/shapes_tiny
    python train.py --config configs/two_stage_r50_coco.py --workdir runs/two_stage \
        --config.data.coco_json.train_images=/data/coco/train2017 --config.train.num_epochs=50

Every `--config.group.key=value` must name a setting of `deformable_detr_jax.training.settings`;
a misspelt, mistyped or ineffective one (`--config.model.bbox_loss_coefficient`: the loss reads
`model.loss.bbox_loss_coefficient`) is one `error:` line naming it and the nearest valid one,
exit 2. A workdir that holds checkpoints is resumed. Several hosts: run the same command on every host;
on a cluster JAX detects (TPU pods, SLURM) add `--distributed`, elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.

Exit statuses: the table in `deformable_detr_jax/cli/exits.py`.
"""

from __future__ import annotations

import functools
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from deformable_detr_jax.cli import exits

PROG = "train.py"

config_flags.DEFINE_config_file(
    "config", None, "a recipe: configs/<name>.py (get_config())", lock_config=True
)
flags.DEFINE_string("workdir", None, "checkpoints, metrics and the final model go here")
flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with cluster auto-detection")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs)")
flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv) -> int:
    if len(argv) > 1:
        return exits.report(PROG, f"unexpected arguments: {argv[1:]}", exits.BAD_INPUT)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
    # for the whole process: orbax's background threads may log a failure's aftermath at exit
    captured = exits.quiet_orbax()
    code = exits.guarded(PROG, lambda: _train(captured))
    if code != exits.OK:
        exits.mute_teardown()
    return code


def _train(captured: exits.CapturedLogs) -> int:
    from deformable_detr_jax import training
    from deformable_detr_jax.data import DataError
    from deformable_detr_jax.training import cpu

    workdir = FLAGS.workdir
    report = functools.partial(exits.report, PROG, folder=workdir)
    try:
        training.initialize_distributed(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            auto=FLAGS.distributed,
        )
        cpu.configure_process()  # process-wide settings: once, here (on a CPU host only)
        result = training.train(FLAGS.config, workdir)
    except training.ConfigError as err:
        return report(f"configuration: {err}", exits.BAD_INPUT)
    except DataError as err:
        return report(f"data: {err}", exits.BAD_INPUT)
    except training.NonFiniteLossError as err:
        return report(str(err), exits.NON_FINITE)
    except training.NoCheckpointRestoresError as err:
        return report(str(err), exits.NO_CHECKPOINT, details=err.details, logs=captured.records)
    except training.CheckpointWriteError as err:
        return report(str(err), exits.WRITE_FAILED, details=err.details, logs=captured.records)
    except OSError as err:
        if err.errno in exits.WRITE_ERRNOS:
            return report(
                f"cannot write {err.filename or 'a file'}: {err.strerror}; what was "
                "written before is intact",
                exits.WRITE_FAILED,
                error=err,
                logs=captured.records,
            )
        return exits.internal_error(PROG, err, folder=workdir, logs=captured.records)
    except Exception as err:
        return exits.internal_error(PROG, err, folder=workdir, logs=captured.records)
    if result.stopped == "preempted":
        print(
            f"{PROG}: stopped at step {result.step} on SIGTERM; checkpoint saved, rerun the "
            "same command to resume",
            file=sys.stderr,
        )
    elif result.eval_metrics:
        metrics = " ".join(f"{k} {v:.3f}" for k, v in result.eval_metrics.items())
        print(f"{PROG}: step {result.step}: {metrics}")
    return exits.OK


def check_overrides(argv) -> None:
    """Each `--config.group.key=value` must name a setting: else one error line naming it and
    the nearest one (or where a model loss field belongs), exit 2."""
    from deformable_detr_jax.training import settings

    for arg in argv[1:]:
        if arg.startswith("--config."):
            name = arg[len("--config.") :].split("=", 1)[0]
            try:
                settings.check_name(name)
            except settings.ConfigError as err:
                exits.report(PROG, f"configuration: {err}", exits.BAD_INPUT)
                sys.exit(exits.BAD_INPUT)


def parse_flags(argv):
    """absl parsing, with a one-line error for an override of a setting the recipe lacks."""
    check_overrides(argv)
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        text = str(err).replace("\\n", " ").replace("\n", " ").replace("\\'", "").strip("'\"")
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        exits.report(
            PROG,
            f"bad command line: {text} (config overrides given: {overrides}; each must "
            "name an existing setting of the recipe, e.g. --config.train.num_steps=100)",
            exits.BAD_INPUT,
        )
        sys.exit(exits.BAD_INPUT)


def run() -> None:
    """The console script `deformable-detr-train` and `python train.py`."""
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
