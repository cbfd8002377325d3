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

import difflib
import functools
import logging
import os
import re
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from deformable_detr_jax.cli import exits, logs

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


def config_argument(argv) -> str | None:
    """The value of `--config` (`--config PATH`, `--config=PATH`, one dash too), or None."""
    args = list(argv[1:])
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg in ("--config", "-config") and index + 1 < len(args):
            return args[index + 1]
        for prefix in ("--config=", "-config="):
            if arg.startswith(prefix):
                return arg[len(prefix) :]
    return None


def nearest_recipe(path: str) -> str:
    """`; did you mean configs/x.py?` for the recipe nearest `path`'s name in its folder (or in
    `configs/`), the recipes there when none is near, else nothing."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.isdir(folder or "."):
        folder = "configs" if os.path.isdir("configs") else None
    if folder is None:
        return ""
    names = sorted(
        n for n in os.listdir(folder or ".") if n.endswith(".py") and not n.startswith("_")
    )
    close = difflib.get_close_matches(os.path.basename(path), names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {os.path.join(folder, close[0])}?"
    if names:
        return f" (the recipes in {os.path.join(folder or '.', '')}: {', '.join(names)})"
    return ""


def check_config_file(argv) -> None:
    """`--config PATH` must name a file (after `:` come the recipe's arguments): else one error
    line naming it and the nearest recipe, exit 2, before anything is loaded or written."""
    value = config_argument(argv)
    if value is None or os.path.isfile(value):
        return
    path = value.split(":", 1)[0]
    if os.path.isfile(path):
        return
    what = "is a folder, not a recipe file" if os.path.isdir(path) else "no such file"
    exits.report(PROG, f"--config {path}: {what}{nearest_recipe(path)}", exits.BAD_INPUT)
    sys.exit(exits.BAD_INPUT)


# absl's words for an override whose value does not convert: `flag --config.NAME=VALUE: why`
_BAD_VALUE = re.compile(r"flag --config\.([\w.]+)=(.*?): ", re.DOTALL)
_KINDS = {"int": "a whole number", "float": "a number", "bool": "True or False", "str": "text"}
_EXAMPLES = {"int": 10, "float": 0.5, "bool": True, "str": "name"}


def _kind(hint) -> str:
    """A field's annotation (`"int"`, `"tuple[int, ...] | None"`, `int`) without `| None`."""
    hint = hint if isinstance(hint, str) else getattr(hint, "__name__", str(hint))
    parts = [p.strip() for p in hint.split("|") if p.strip() != "None"]
    return " | ".join(parts)


def _recipe_value(name: str):
    """The recipe's value of the setting `name` when the recipe was loaded, else None."""
    try:
        value = FLAGS["config"].value
        for part in name.split("."):
            value = value[part]
        return value
    except Exception:  # not loaded, or not there: no example from the recipe
        return None


def bad_value_message(text: str) -> str | None:
    """One line for a `--config.NAME=VALUE` whose value is not of the setting's type: the
    setting, the value given, the type it takes and an example; None for any other error."""
    from deformable_detr_jax.training import settings

    match = _BAD_VALUE.match(text)
    field = settings.field_of(match.group(1)) if match else None
    if field is None:
        return None
    name, value = match.groups()
    kind = _kind(field.type)
    tuple_kind = kind.startswith("tuple")
    expected = "a tuple" if tuple_kind else _KINDS.get(kind, f"a {kind}")
    example = _recipe_value(name)
    if example is None or isinstance(example, bool) != (kind == "bool"):
        example = (1, 2) if tuple_kind else _EXAMPLES.get(kind)
    line = f"--config.{name}={value}: {name} takes {expected} ({kind}), not {value!r}"
    if example is None:
        return line
    shown = f"--config.{name}={example}"
    return f"{line}; e.g. {shlex.quote(shown) if isinstance(example, tuple) else shown}"


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
    """absl parsing, with a one-line error for a recipe file that is not there, an override of
    a setting the recipe lacks and a value of the wrong type."""
    check_config_file(argv)
    check_overrides(argv)
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        message = bad_value_message(str(err))
        if message is not None:
            exits.report(PROG, message, exits.BAD_INPUT)
            sys.exit(exits.BAD_INPUT)
        text = str(err).replace("\\n", " ").replace("\n", " ").replace("\\'", "").strip()
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
    logs.quiet_backend_discovery()
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
