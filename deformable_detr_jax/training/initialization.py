"""Where the first weights come from: random, an ImageNet backbone, or a detection checkpoint.

- Random (`model.init_from = ""`): `train_state.init_weights`, created replicated under `jit`.
- `model.backbone_weights`: a torchvision / timm ResNet state dict (`resnet50-*.pth`,
  `model.safetensors`; read without PyTorch by `convert.readers`), a folder holding one
  (`model.safetensors`, `pytorch_model.bin` or their shards), or a hub id of such a folder
  (`microsoft/swin-tiny-patch4-window7-224`, resolved as every model name is:
  `convert.hub.resolve_model`, an existing local path first), loaded into
  `model.backbone.model` (convolutions and frozen batch-norm statistics; `fc.*` ignored), as
  the paper starts from ImageNet weights. Every backbone weight must be found. For ConvNeXt and
  Swin: a transformers checkpoint of the classifier or the backbone alone
  (`facebook/convnext-tiny-224`'s, `microsoft/swin-tiny-patch4-window7-224`'s
  `model.safetensors`; its `convnext.` / `swin.` level dropped); the backbone's output norms
  (`hidden_states_norms`), which such files lack, keep their fresh initialisation, as in
  transformers. Or timm's ConvNeXt / Swin state dict (`convnext_tiny`'s,
  `swin_tiny_patch4_window7_224`'s `model.safetensors` or `pytorch_model.bin`; the
  facebookresearch ConvNeXt and Microsoft Swin `.pth` files too: `convert.timm_backbones`).
  With the model's config, the file's backbone (type, depths, widths, heads, window, patch
  size, ...) is read off its shapes first and a file of another backbone is one
  `ConfigMismatchError` naming both; a training run reads and checks the file before the
  model's initialisation is traced (`run.initial_weights`, which makes it a `ConfigError`).
- `model.init_from`: a detection checkpoint to fine-tune: a folder written by
  `checkpoint.save_pretrained`, a Hugging Face hub-style folder, a PyTorch file
  (`convert.load_pytorch_checkpoint`), or a hub id (`SenseTime/deformable-detr`, downloaded into
  huggingface_hub's cache; an existing local path wins: `convert.hub.resolve_model`). The
  architecture is the checkpoint's; `num_labels` (and
  `id2label`) come from the new data. Weights whose name and shape match are copied; the rest
  (the class heads when the label count changes) keep their fresh initialisation, and are
  reported.

Multi-host: every process reads the same files and places the same values
(`train_state.place_weights`).
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from deformable_detr_jax.config import DeformableDetrConfig

logger = logging.getLogger(__name__)

_BACKBONE = "model.backbone."
# Backbone parameters an ImageNet classifier's file lacks (new in the detector, as transformers'
# `load_backbone` makes them) or that nothing uses.
_NOT_IN_IMAGENET = re.compile(r"\.hidden_states_norms\.|\.swin\.layernorm\.")


def checkpoint_path(path: str | os.PathLike) -> pathlib.Path:
    """The local path of `model.init_from`: itself, or a hub id's snapshot folder (downloaded
    when not cached).

    Raises:
      FileNotFoundError, HubError: what `convert.hub.resolve_model` raises, the message
        starting with `model.init_from`.
    """
    from deformable_detr_jax.convert import HubError, resolve_model

    try:
        return resolve_model(path)
    except (FileNotFoundError, HubError) as err:
        raise type(err)(f"model.init_from: {err}") from None


def checkpoint_config(path: str | os.PathLike) -> DeformableDetrConfig:
    """The model config of a checkpoint to start from (see the module docstring)."""
    path = checkpoint_path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return DeformableDetrConfig.from_hf(path / "config.json")
    return load_checkpoint_model(path).config


def load_checkpoint_model(path: str | os.PathLike):
    """The `DeformableDetrForObjectDetection` a checkpoint holds (on the default device)."""
    from deformable_detr_jax.checkpoint import is_pretrained_folder, load_pretrained
    from deformable_detr_jax.convert import load_pytorch_checkpoint

    path = checkpoint_path(path)
    if path.is_dir() and is_pretrained_folder(path):
        return load_pretrained(path)
    return load_pytorch_checkpoint(path)


def transplant(
    target: Mapping[str, Any], source: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """`target` with every entry whose name and shape `source` shares replaced by the source's.

    Returns the merged dict and the names kept from `target` (not found or other shapes)."""
    merged, kept = dict(target), []
    for name, value in target.items():
        other = source.get(name)
        if other is not None and tuple(np.shape(other)) == tuple(np.shape(value)):
            merged[name] = np.asarray(other, dtype=np.asarray(value).dtype)
        else:
            kept.append(name)
    return merged, kept


def _imagenet_key(key: str) -> str:
    """A classifier's key without its wrapper levels (`module.`, `model.`, `convnext.`, `swin.`)."""
    for prefix in ("module.", "model.", "convnext.", "swin."):
        key = key.removeprefix(prefix)
    return key


def _check_backbone(
    path: str, renamed: Mapping[str, Any], naming: str, config: DeformableDetrConfig
) -> None:
    """Raises `ConfigMismatchError` when the file's backbone is not the config's."""
    from deformable_detr_jax.convert.backbone_variant import (
        backbone_file_fields,
        backbone_mismatches,
    )
    from deformable_detr_jax.convert.errors import ConfigMismatchError
    from deformable_detr_jax.convert.formats import transformers_to_hub

    shapes = {k: tuple(np.shape(v)) for k, v in transformers_to_hub(renamed).items()}
    fields = backbone_file_fields(shapes)
    if fields is None:
        raise ConfigMismatchError(
            f"model.backbone_weights={path!r} holds no ResNet, ConvNeXt or Swin backbone in a "
            "naming this reads (timm, torchvision, transformers; facebookresearch ConvNeXt, "
            f"Microsoft Swin); its first keys, renamed: {sorted(renamed)[:4]}"
        )
    problems = backbone_mismatches(fields, config)
    if problems:
        held = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        raise ConfigMismatchError(
            f"model.backbone_weights={path!r} holds a {fields['backbone_type']} backbone "
            f"({naming} names: {held}), not the model's: {'; '.join(problems)}. Point "
            "model.backbone_weights at an ImageNet checkpoint of the configured backbone, or "
            "set model.backbone_* to the file's"
        )


def _read_backbone_file(files: list[pathlib.Path]) -> tuple[dict[str, Any], str]:
    """The files' backbone in transformers' names (under `model.backbone.model.`), and what
    naming it came in."""
    from deformable_detr_jax.convert.formats import HUB_BACKBONE_PREFIX, hub_to_transformers
    from deformable_detr_jax.convert.readers import read_state_dict
    from deformable_detr_jax.convert.timm_backbones import NAMINGS, timm_naming, timm_to_hub

    state = {}
    for file in files:
        state.update({_imagenet_key(k): v for k, v in read_state_dict(file).items()})
    naming = timm_naming(state)
    if naming is not None:
        state = timm_to_hub(state, naming)
    renamed = hub_to_transformers({HUB_BACKBONE_PREFIX + k: v for k, v in state.items()})
    return renamed, NAMINGS.get(naming, "timm / torchvision / transformers")


def backbone_weights_files(name: str | os.PathLike) -> list[pathlib.Path]:
    """The weights file(s) `model.backbone_weights` names: a file, a folder's weights
    (`convert.loading.locate_weights`), or a hub id's (downloaded unless cached).

    Raises:
      FileNotFoundError: nothing there, and not a hub id.
      HubError (a ValueError): a hub id that cannot be had.
      CheckpointFormatError (a ValueError): a folder without weights.
    """
    from deformable_detr_jax.convert import HubError, resolve_model
    from deformable_detr_jax.convert.loading import locate_weights

    try:
        path = resolve_model(name)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"model.backbone_weights={os.fspath(name)!r} does not exist; point it at an ImageNet "
            "ResNet state dict (torchvision resnet50-*.pth or a timm model.safetensors), a "
            "transformers ConvNeXt / Swin model.safetensors, its folder, or its hub id "
            "(e.g. microsoft/swin-tiny-patch4-window7-224)"
        ) from None
    except HubError as err:
        raise type(err)(f"model.backbone_weights: {err}") from None
    return [pathlib.Path(file) for file in locate_weights(os.fspath(path))[0]]


def backbone_weights_from_resnet(
    path: str | os.PathLike,
    names_and_shapes: Mapping[str, tuple[int, ...]],
    config: DeformableDetrConfig | None = None,
) -> dict[str, np.ndarray]:
    """The backbone entries of `names_and_shapes` (NNX names under `model.backbone.`) read from
    an ImageNet backbone's state dict (see the module docstring), in NNX layout.

    Raises:
      FileNotFoundError, HubError, CheckpointFormatError: as `backbone_weights_files`.
      ConfigMismatchError: (with `config`) the file holds another backbone than the config's.
      CheckpointKeyError: a timm ConvNeXt / Swin file with keys of no backbone weight.
      ValueError: a backbone weight is missing from the file or has another shape.
    """
    from deformable_detr_jax.convert.state_dict import nnx_path_to_key, to_nnx_layout

    renamed, naming = _read_backbone_file(backbone_weights_files(path))
    if config is not None:
        _check_backbone(os.fspath(path), renamed, naming, config)
    out, missing, misshaped = {}, [], []
    for name, shape in names_and_shapes.items():
        if not name.startswith(_BACKBONE):
            continue
        key = nnx_path_to_key(name.split("."))
        if key not in renamed and _NOT_IN_IMAGENET.search(key):
            continue
        if key not in renamed:
            missing.append(key)
            continue
        array = to_nnx_layout(name.rsplit(".", 1)[-1], np.asarray(renamed[key], np.float32))
        if array.shape != tuple(shape):
            misshaped.append(f"{key}: file {array.shape}, model {tuple(shape)}")
            continue
        out[name] = array
    if missing or misshaped:
        raise ValueError(
            f"model.backbone_weights={str(path)!r} does not fit the backbone "
            f"(model.backbone_depths / backbone_hidden_sizes): {len(missing)} missing "
            f"{sorted(missing)[:5]}, {len(misshaped)} of another shape {misshaped[:3]}"
        )
    logger.info("loaded %d backbone weights (%s names) from %s", len(out), naming, path)
    return out
