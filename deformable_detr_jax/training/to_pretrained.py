"""A training checkpoint -> a `save_pretrained` folder (for `Detector.from_pretrained`).

    export_model("runs/ddetr_r50", "models/ddetr_r50")      # the latest checkpoint
    python -m deformable_detr_jax.training.to_pretrained runs/ddetr_r50 models/ddetr_r50 [--step N]

Runs in one process on any machine: the weights are read as host arrays, whatever mesh wrote
them, and checked against the checksums written with them (read-only: safe beside a running
job). The model config is the one the run stored in the checkpoint's `meta` item.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np

from deformable_detr_jax.cli import exits
from deformable_detr_jax.training.checkpointing import CheckpointCorruptError, read_step

PROG = "python -m deformable_detr_jax.training.to_pretrained"


def export_model(
    workdir: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    step: int | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes the model of checkpoint `step` (default: the latest) of `workdir` to `folder`."""
    from deformable_detr_jax.checkpoint import save_pretrained
    from deformable_detr_jax.config import DeformableDetrConfig
    from deformable_detr_jax.processing.image_processor import ImageProcessor
    from deformable_detr_jax.training.train_state import model_from_weights, model_spec

    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    steps = (
        sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit())
        if directory.is_dir()
        else []
    )
    if not steps:
        raise FileNotFoundError(f"no training checkpoint in {directory}")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; there are {steps}")
    state, _, meta = read_step(directory, step)  # checked against its checksums
    if "model_config" not in meta:
        raise ValueError(f"checkpoint {step} in {directory} does not record its model config")
    config = DeformableDetrConfig.from_hf(meta["model_config"])
    spec = model_spec(config, ())
    weights = {k: np.asarray(v) for k, v in {**state["params"], **state["frozen"]}.items()}
    model = model_from_weights(spec, weights)
    processor = meta.get("processor")
    processor = ImageProcessor.from_dict(processor) if processor else None
    return save_pretrained(model, folder, processor=processor, overwrite=overwrite)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="the training run's workdir (its checkpoints/ is read)")
    parser.add_argument(
        "folder", help="the model folder to write (Detector.from_pretrained reads it)"
    )
    parser.add_argument(
        "--step",
        type=int,
        default=None,
        metavar="N",
        help="the checkpoint of step N (default: the newest)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty FOLDER")
    args = parser.parse_args(argv)
    exits.quiet_orbax()
    return exits.guarded(PROG, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    try:
        path = export_model(args.workdir, args.folder, step=args.step, overwrite=args.overwrite)
    except CheckpointCorruptError as err:
        return exits.report(
            PROG, f"{err}; export another --step", exits.NO_CHECKPOINT, details=err.details
        )
    except OSError as err:
        code = exits.WRITE_FAILED if err.errno in exits.WRITE_ERRNOS else exits.BAD_INPUT
        return exits.report(PROG, str(err), code)
    except ValueError as err:
        return exits.report(PROG, str(err), exits.BAD_INPUT)
    print(f"saved {path}")
    return exits.OK


if __name__ == "__main__":
    raise SystemExit(main())
