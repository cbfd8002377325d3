"""One call from a PyTorch checkpoint to a JAX model, and a JAX model back to PyTorch.

`load_pytorch_checkpoint(path_or_folder)` reads, without PyTorch, any of:

- a file: `.safetensors`, a `torch.save` file (`.bin`, `.pth`, zip or legacy), including the
  fundamentalvision training checkpoints `{"model": ..., "args": Namespace, ...}`;
- a hub-style folder: `config.json` + `model.safetensors` (or `pytorch_model.bin`, or a
  sharded `*.index.json`), as downloaded from `SenseTime/deformable-detr*` or written by
  transformers' `save_pretrained`;
- a Hugging Face hub id (`SenseTime/deformable-detr`, with `revision=`, `cache_dir=`, `token=`),
  downloaded into huggingface_hub's cache by `hub.resolve_model` (an existing local path wins).

Key naming (hub, transformers 5, original) is recognised by `formats.detect_format`. The
config comes from, in order: the `config` argument, the folder's `config.json`, the
`args` of an original training checkpoint, the weights alone (`infer_variant`). Whatever
its source, it is checked against the architecture the weights hold, so a config that
contradicts them (e.g. `num_labels`) raises `ConfigMismatchError`. `import_pytorch_checkpoint`
also returns the folder's `preprocessor_config.json` as an `ImageProcessor` (`read_processor`).

`save_pytorch_checkpoint(model, folder)` writes `config.json` + `model.safetensors` with the
keys transformers 5 `save_pretrained` writes, so `DeformableDetrForObjectDetection.
from_pretrained(folder)` loads it (transformers 4 too), and `preprocessor_config.json` (the
`processor` given, else the default settings). Folders are written atomically:
into a temporary folder beside the destination, renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from deformable_detr_jax import file_modes
from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.convert.errors import (
    CheckpointError,
    CheckpointFormatError,
)
from deformable_detr_jax.convert.formats import detect_format, to_transformers
from deformable_detr_jax.convert.hub import (
    CONFIG_NAME,
    INDEX_NAMES,
    SAFETENSORS_NAME,
    WEIGHTS_NAMES,
    resolve_model,
)
from deformable_detr_jax.convert.readers import read_checkpoint
from deformable_detr_jax.convert.state_dict import convert_state_dict, export_state_dict
from deformable_detr_jax.convert.variant import (
    check_config_against_variant,
    infer_variant,
    variant_from_original_args,
)
from deformable_detr_jax.modeling import DeformableDetrForObjectDetection
from deformable_detr_jax.processing.image_processor import CONFIG_NAME as PREPROCESSOR_NAME
from deformable_detr_jax.processing.image_processor import ImageProcessor

_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(DeformableDetrConfig))


@dataclasses.dataclass(frozen=True)
class ImportedCheckpoint:
    """A converted model and how it was read.

    Attributes:
      model: the JAX model.
      format: the key naming of the weights: "hub", "transformers" or "original".
      files: the weights file(s) read.
      config_source: where the config came from: "argument", "config.json", "args" (of an
        original training checkpoint) or "weights" (inferred from the shapes alone).
      processor: the folder's `preprocessor_config.json`; None for a file, or a folder
        without one.
    """

    model: DeformableDetrForObjectDetection
    format: str
    files: tuple[str, ...]
    config_source: str
    processor: ImageProcessor | None = None


def load_pytorch_checkpoint(
    path_or_folder: str | os.PathLike,
    config: DeformableDetrConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    dtype=jnp.float32,
    num_heads: int | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> DeformableDetrForObjectDetection:
    """The JAX model holding a PyTorch checkpoint's weights (see the module docstring).

    Args:
      path_or_folder: a weights file, a hub-style folder (config.json + weights), or a hub id
        (`org/name`; an existing local path of that name wins).
      config: a `DeformableDetrConfig`, a dict (its fields, or a transformers config.json
        dict), or the path of a config.json (or of its folder). Default: the folder's
        config.json, else the checkpoint's `args`, else inferred from the weights.
      dtype: parameter dtype.
      num_heads: attention heads, when the config is inferred from the weights (shapes give
        only heads x points; default: the `args` of an original checkpoint, else 8, as in
        every published checkpoint).
      revision, cache_dir, token: for a hub id: the branch, tag or commit (default `main`),
        huggingface_hub's cache folder, and a token (default: `HF_TOKEN`, else the token file);
        see `convert.hub`.

    Raises:
      CheckpointFormatError: not a checkpoint, truncated, or an empty folder.
      UnsafeCheckpointError: a pickle that names a global outside the allow-list.
      CheckpointKeyError: missing, unexpected or mis-shaped keys (all listed).
      ConfigMismatchError: the config contradicts the weights.
      HubError: a hub id that cannot be resolved (no such repository, revision or file; the
        hub unreachable and the model not cached).
      FileNotFoundError: nothing at `path_or_folder`, and it is not a hub id.
    """
    return import_pytorch_checkpoint(
        path_or_folder,
        config,
        dtype=dtype,
        num_heads=num_heads,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
    ).model


def import_pytorch_checkpoint(
    path_or_folder: str | os.PathLike,
    config: DeformableDetrConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    dtype=jnp.float32,
    num_heads: int | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> ImportedCheckpoint:
    """`load_pytorch_checkpoint`, also saying which format, files and config source it used,
    with the folder's processor settings."""
    where = resolve_model(path_or_folder, revision=revision, cache_dir=cache_dir, token=token)
    path = os.fspath(where)
    files, folder_config = locate_weights(path)
    state_dict, metadata = _read_all(files)
    key_format = detect_format(state_dict)
    if config is not None:
        config, source = as_config(config), "argument"
    elif folder_config is not None:
        config, source = DeformableDetrConfig.from_hf(folder_config), "config.json"
    else:
        source = None

    if config is not None:
        # Heads and points are checked as their product, so any split of it will do.
        variant = infer_variant(state_dict, num_heads=1)
    else:
        args = metadata.get("args")
        args_fields = {}
        if args is not None:
            args_fields = {
                k: v for k, v in variant_from_original_args(args).items() if k in _CONFIG_FIELDS
            }
        heads = num_heads or args_fields.get("encoder_attention_heads") or 8
        variant = infer_variant(state_dict, num_heads=heads)
        source = "args" if args_fields else "weights"
        config = _config_from_weights(variant, args_fields, path)
    check_config_against_variant(config, variant)
    model = convert_state_dict(state_dict, config, dtype=dtype)
    return ImportedCheckpoint(model, key_format, tuple(files), source, read_processor(where))


def read_processor(path: str | os.PathLike) -> ImageProcessor | None:
    """The `ImageProcessor` of a model folder's `preprocessor_config.json`; None for a file, or
    a folder without one."""
    file = pathlib.Path(path) / PREPROCESSOR_NAME
    return ImageProcessor.from_pretrained(file) if file.is_file() else None


def as_config(
    config: DeformableDetrConfig | Mapping[str, Any] | str | os.PathLike,
) -> DeformableDetrConfig:
    """A `DeformableDetrConfig` from itself, a dict of its fields, a transformers
    config.json dict, or the path of a config.json (or of the folder holding one)."""
    if isinstance(config, DeformableDetrConfig):
        return config
    if isinstance(config, Mapping):
        if set(config) <= _CONFIG_FIELDS:
            return DeformableDetrConfig(**config)
        return DeformableDetrConfig.from_hf(config)
    if isinstance(config, str | os.PathLike):
        return DeformableDetrConfig.from_hf(config)
    raise TypeError(
        f"config must be a DeformableDetrConfig, a dict or a path, got {type(config).__name__}"
    )


def _config_from_weights(
    variant: Mapping[str, Any], args_fields: Mapping[str, Any], path: str
) -> DeformableDetrConfig:
    try:
        config = DeformableDetrConfig(**{**variant, **args_fields})
    except ValueError as e:
        raise CheckpointError(
            f"{path}: the weights describe a model this package cannot build: {e}"
        ) from None
    if config.num_feature_levels == 1 and "dilation" not in args_fields:
        warnings.warn(
            f"{path}: a single-scale checkpoint without a config; the weights cannot tell "
            "whether it is DC5 (dilated last stage), assuming it is not. For "
            "deformable-detr-single-scale-dc5 pass config=preset('deformable-detr-single-"
            "scale-dc5') or its config.json.",
            stacklevel=3,
        )
    return config


def locate_weights(path: str) -> tuple[list[str], str | None]:
    """(weights files, config.json or None) of a file or a hub-style folder."""
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint file or folder at {path}")
        return [path], None
    config = os.path.join(path, CONFIG_NAME)
    config = config if os.path.isfile(config) else None
    for name in WEIGHTS_NAMES:
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)], config
    for name in INDEX_NAMES:
        index = os.path.join(path, name)
        if os.path.isfile(index):
            return _shards(index, path), config
    if os.path.isdir(os.path.join(path, "params")):  # checkpoint.PARAMS_NAME
        raise CheckpointFormatError(
            f"{path} is a folder written by save_pretrained (orbax), not PyTorch weights; "
            "load it with deformable_detr_jax.checkpoint.load_pretrained"
        )
    found = sorted(os.listdir(path))
    raise CheckpointFormatError(
        f"{path} holds no weights: expected {' or '.join(WEIGHTS_NAMES)} (or a sharded "
        f"*.index.json); found {found[:10] or 'nothing'}. Pass the weights file itself if it "
        "has another name."
    )


def _shards(index: str, folder: str) -> list[str]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointFormatError(f"{index}: not a sharded-checkpoint index ({e!r})") from None
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise CheckpointFormatError(f"{index} names shard(s) missing from {folder}: {missing}")
    return [os.path.join(folder, n) for n in names]


def _read_all(files: list[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    state_dict, metadata = {}, {}
    for file in files:
        part, meta = read_checkpoint(file)
        repeated = sorted(set(part) & set(state_dict))
        if repeated:
            raise CheckpointFormatError(f"{file} repeats keys of another shard: {repeated[:5]}")
        state_dict.update(part)
        metadata.update(meta)
    return state_dict, metadata


# ------------------------------------------------------------------------------------------
# Export.

# Tied head copies transformers 5 `save_pretrained` leaves out (they equal the key they
# copy, and `from_pretrained` ties them again): (condition, copy prefix, source prefix),
# `{i}` over all heads, `{n}` over heads 1..N. A copy that differs from its source (class
# heads fine-tuned apart with box refinement) is written; transformers then loads it untied.
_SAVED_TIES = (
    ("two_stage", "class_embed.{i}.", "model.decoder.class_embed.{i}."),
    ("two_stage", "bbox_embed.{i}.", "model.decoder.bbox_embed.{i}."),
    ("box_refine_only", "bbox_embed.{i}.", "model.decoder.bbox_embed.{i}."),
    ("box_refine_only", "class_embed.{n}.", "class_embed.0."),
    ("shared_heads", "class_embed.{n}.", "class_embed.0."),
    ("shared_heads", "bbox_embed.{n}.", "bbox_embed.0."),
)


def _drop_saved_ties(state_dict: dict[str, np.ndarray], config: DeformableDetrConfig) -> dict:
    conditions = {
        "two_stage": config.two_stage,
        "box_refine_only": config.with_box_refine and not config.two_stage,
        "shared_heads": not config.with_box_refine,
    }
    out = dict(state_dict)
    for condition, copy, source in _SAVED_TIES:
        if not conditions[condition]:
            continue
        for i in range(config.num_decoder_predictions):
            if "{n}" in copy and i == 0:
                continue
            copy_prefix, source_prefix = copy.format(i=i, n=i), source.format(i=i, n=i)
            keys = [k for k in out if k.startswith(copy_prefix)]
            sources = {k: source_prefix + k[len(copy_prefix) :] for k in keys}
            if keys and all(
                s in out and np.array_equal(out[k], out[s]) for k, s in sources.items()
            ):
                for k in keys:
                    del out[k]
    return out


def export_transformers_checkpoint(
    model: DeformableDetrForObjectDetection,
) -> dict[str, np.ndarray]:
    """The state dict transformers 5 `save_pretrained` would write for this model (numpy)."""
    saved = to_transformers(export_state_dict(model), saved_layout=True)
    saved = _drop_saved_ties(saved, model.config)
    return {k: np.ascontiguousarray(v) for k, v in saved.items()}


def save_pytorch_checkpoint(
    model: DeformableDetrForObjectDetection,
    folder: str | os.PathLike,
    *,
    processor=None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes `folder/config.json` + `folder/model.safetensors` + `preprocessor_config.json` for
    transformers.

    `transformers.DeformableDetrForObjectDetection.from_pretrained(folder)` loads it; this
    package's `load_pytorch_checkpoint(folder)` and `Detector.from_pretrained(folder)` too.
    `processor` (an `ImageProcessor`, e.g. `import_pytorch_checkpoint(...).processor`) gives the
    pre-processing settings; None writes the defaults (`ImageProcessor()`, transformers'
    `DeformableDetrImageProcessor` defaults). Returns the folder.

    Raises:
      FileExistsError: `folder` exists and is not empty (unless `overwrite`).
    """
    from safetensors.numpy import save

    arrays = export_transformers_checkpoint(model)
    config = model.config.to_hf()
    with write_folder_atomically(folder, overwrite=overwrite) as tmp:
        # written by open(), whose mode the umask sets (safetensors' save_file makes it 0600)
        (tmp / SAFETENSORS_NAME).write_bytes(save(arrays, metadata={"format": "pt"}))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (processor if processor is not None else ImageProcessor()).save_pretrained(tmp)
    return pathlib.Path(folder)


@contextlib.contextmanager
def write_folder_atomically(
    folder: str | os.PathLike, *, overwrite: bool = False
) -> Iterator[pathlib.Path]:
    """Yields a temporary folder beside `folder`; renames it to `folder` if the block succeeds.

    On any error the temporary folder (and any parent folder this created) is removed and
    `folder` is left as it was. An existing empty `folder` is replaced; a non-empty one only
    with `overwrite` (the old content is removed after the new one is in place).
    """
    folder = pathlib.Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is a file; give a folder path to write")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{folder} exists and is not empty; choose a new folder or pass overwrite=True"
        )
    created = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkdtemp: the folder keeps this mode, and it should be the umask's
    tmp = file_modes.temporary_folder(folder.parent, f".{folder.name}.", ".tmp")
    try:
        yield tmp
        if folder.exists():
            old = file_modes.temporary_folder(folder.parent, f".{folder.name}.", ".old")
            os.replace(folder, old)  # (onto the empty placeholder folder)
            try:
                os.replace(tmp, folder)
            except BaseException:
                os.replace(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
