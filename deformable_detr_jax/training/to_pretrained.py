"""A training checkpoint -> a `save_pretrained` folder (for `Detector.from_pretrained`).

    export_model("runs/ddetr_r50", "models/ddetr_r50")      # the latest checkpoint
    python -m deformable_detr_jax.training.to_pretrained runs/ddetr_r50 models/ddetr_r50 [--step N]

Runs in one process on any machine: the weights are read as host arrays, whatever mesh wrote
them. The model config is the one the run stored in the checkpoint's `meta` item.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np
import orbax.checkpoint as ocp


def export_model(workdir: str | os.PathLike, folder: str | os.PathLike, *,
                 step: int | None = None, overwrite: bool = False) -> pathlib.Path:  # fmt: skip
    """Writes the model of checkpoint `step` (default: the latest) of `workdir` to `folder`."""
    from deformable_detr_jax.checkpoint import save_pretrained
    from deformable_detr_jax.config import DeformableDetrConfig
    from deformable_detr_jax.processing import ImageProcessor
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
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
        meta = reader.restore(directory / str(step) / "meta")
    if "model_config" not in meta:
        raise ValueError(f"checkpoint {step} in {directory} does not record its model config")
    config = DeformableDetrConfig.from_hf(meta["model_config"])
    spec = model_spec(config, ())
    with ocp.StandardCheckpointer() as reader:
        state = reader.restore(directory / str(step) / "state")
    weights = {k: np.asarray(v) for k, v in {**state["params"], **state["frozen"]}.items()}
    model = model_from_weights(spec, weights)
    processor = meta.get("processor")
    processor = ImageProcessor.from_dict(processor) if processor else None
    return save_pretrained(model, folder, processor=processor, overwrite=overwrite)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("folder")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    path = export_model(args.workdir, args.folder, step=args.step, overwrite=args.overwrite)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
