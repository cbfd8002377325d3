"""Train Deformable DETR from a recipe: a thin command line over `deformable_detr_jax.training`.

    python train.py --config configs/shapes_tiny.py --workdir runs/shapes_tiny
    python train.py --config configs/two_stage_r50_coco.py --workdir runs/two_stage \
        --config.data.coco_json.train_images=/data/coco/train2017 --config.train.num_epochs=50

A workdir that holds checkpoints is resumed. Several hosts: run the same command on every host;
on a cluster JAX detects (TPU pods, SLURM) add `--distributed`, elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.

Exit status: 0 when training finished or stopped on SIGTERM with a checkpoint saved; 2 on a bad
setting (the message names it); 3 when the loss became NaN/inf (the last good checkpoint is kept).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

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
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
    from deformable_detr_jax import training

    training.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, auto=FLAGS.distributed
    )
    try:
        result = training.train(FLAGS.config, FLAGS.workdir)
    except training.ConfigError as err:
        print(f"train.py: configuration error: {err}", file=sys.stderr)
        return 2
    except training.NonFiniteLossError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 3
    if result.stopped == "preempted":
        print(f"train.py: stopped at step {result.step} on SIGTERM; checkpoint saved, rerun the "
              "same command to resume", file=sys.stderr)  # fmt: skip
    elif result.eval_metrics:
        metrics = " ".join(f"{k} {v:.3f}" for k, v in result.eval_metrics.items())
        print(f"train.py: step {result.step}: {metrics}")
    return 0


def parse_flags(argv):
    """absl parsing, with a one-line error for an override of a setting the recipe lacks."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        text = str(err).replace("\\n", " ").replace("\n", " ").replace("\\'", "").strip("'\"")
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        print(
            f"train.py: bad command line: {text}\n(config overrides given: {overrides}; each must "
            "name an existing setting of the recipe, e.g. --config.train.num_steps=100)",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
