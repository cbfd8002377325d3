"""This package's pretrained folders: the config beside an orbax checkpoint of the weights.

    folder/
      config.json               `DeformableDetrConfig.to_hf()`: transformers' form, so hub
                                tooling (and `DeformableDetrConfig.from_hf`) reads it
      params/                   orbax `StandardCheckpointer` checkpoint of the nnx.Param and
                                nnx.BatchStat values (`nnx.to_pure_dict` tree)
      preprocessor_config.json  when `save_pretrained` is given an `ImageProcessor`

`save_pretrained` writes the folder atomically (a temporary folder beside it, renamed into
place); `load_pretrained` restores into the shapes the config.json gives, after checking
every saved key and shape against them, and starts fresh dropout RNG streams. Training
runs resume through `ocp.CheckpointManager` instead (see `training/`); this is the format
for finished models. Single-process: call it from one process (orbax syncs all of them).
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.convert.errors import CheckpointFormatError, CheckpointKeyError
from deformable_detr_jax.convert.loading import (
    CONFIG_NAME,
    write_folder_atomically,
)
from deformable_detr_jax.convert.state_dict import abstract_model, fresh_rng_value
from deformable_detr_jax.modeling import DeformableDetrForObjectDetection

PARAMS_NAME = "params"
_WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)


def is_pretrained_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` looks like a `save_pretrained` folder (config.json + params/)."""
    folder = pathlib.Path(folder)
    return (folder / CONFIG_NAME).is_file() and (folder / PARAMS_NAME).is_dir()


def save_pretrained(
    model: DeformableDetrForObjectDetection,
    folder: str | os.PathLike,
    *,
    processor=None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes the model (and `processor`'s preprocessor_config.json) to a new folder.

    Args:
      model: the model to save; parameters and frozen batch-norm statistics are stored in
        their dtype, the dropout RNG state is not.
      folder: the folder to create (see the module docstring for its layout).
      processor: an `ImageProcessor` (anything with `save_pretrained(folder)`), optional.
      overwrite: replace an existing non-empty `folder`.

    Raises:
      FileExistsError: `folder` exists and is not empty (unless `overwrite`).
    """
    weights = _string_keys(nnx.to_pure_dict(nnx.state(model, _WEIGHTS)))
    config = model.config.to_hf()
    with write_folder_atomically(folder, overwrite=overwrite) as tmp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_NAME, weights)
            checkpointer.wait_until_finished()
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if processor is not None:
            processor.save_pretrained(tmp)
    return pathlib.Path(folder)


def load_pretrained(folder: str | os.PathLike, *, dtype=None) -> DeformableDetrForObjectDetection:
    """The model a `save_pretrained` folder holds.

    Args:
      folder: a folder written by `save_pretrained`.
      dtype: cast floating parameters to this dtype; default: as saved.

    Raises:
      CheckpointFormatError: `folder` is not a `save_pretrained` folder.
      CheckpointKeyError: the saved parameters do not fit the config.json beside them
        (every missing, unexpected and mis-shaped key listed).
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder}")
    if not is_pretrained_folder(folder):
        raise CheckpointFormatError(
            f"{folder} is not a folder written by save_pretrained (it needs {CONFIG_NAME} and "
            f"an orbax checkpoint in {PARAMS_NAME}/); for PyTorch weights use "
            "load_pytorch_checkpoint"
        )
    config = DeformableDetrConfig.from_hf(folder / CONFIG_NAME)
    graphdef, state = nnx.split(abstract_model(config))
    flat = nnx.to_flat_state(state)
    expected = {_key(path): var for path, var in flat if not isinstance(var, nnx.RngState)}

    path = (folder / PARAMS_NAME).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            saved_tree = checkpointer.metadata(path).item_metadata.tree
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointFormatError(f"{path}: unreadable orbax checkpoint ({e})") from None
        saved = {_key(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
        _check_saved(saved, expected, path)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=device),
            saved_tree,
        )
        restored = checkpointer.restore(path, target)
    values = {_key(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}

    new_flat = []
    for index, (p, var) in enumerate(flat):
        if isinstance(var, nnx.RngState):
            new_flat.append((p, var.replace(fresh_rng_value(var, index))))
            continue
        value = values[_key(p)]
        if dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(dtype)
        new_flat.append((p, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _check_saved(saved: dict, expected: dict, path: pathlib.Path) -> None:
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    mis_shaped = [
        f"{k}: saved {tuple(saved[k].shape)}, config.json needs {tuple(expected[k].shape)}"
        for k in sorted(set(saved) & set(expected))
        if tuple(saved[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        raise CheckpointKeyError.from_problems(
            f"orbax checkpoint {path}",
            missing=missing,
            unexpected=unexpected,
            mis_shaped=mis_shaped,
            hint=f"The {CONFIG_NAME} beside it does not describe these parameters.",
        )


def _key(path) -> str:
    """Dot-joined path; orbax returns list indices as strings, nnx as ints."""
    parts = [getattr(p, "key", getattr(p, "idx", p)) for p in path]
    return ".".join(str(p) for p in parts)


def _string_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree
