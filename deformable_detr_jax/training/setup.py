"""From a recipe's ConfigDict to the objects a run needs, with every check done before compiling.

A recipe (`configs/<name>.py`, `get_config()`) has four groups:

    model       every `DeformableDetrConfig` field, plus `init_from`, `backbone_weights` and
                `loss` (every `LossConfig` field but `num_labels`)
    data        `source` ("shapes" | "coco_json" | "yolo" | "tfds") with one sub-group per kind,
                `batch_size` (images per optimizer step, all devices and hosts together),
                `eval_batch_size`, `max_boxes`, `augment` (`AugmentConfig` fields), `pad_to`, ...
    optimizer   see `optimizer.py`
    train       steps or epochs, accumulation, dtype, logging / checkpoint / eval intervals

`ConfigError` (a ValueError) names the setting and what to do. Data sources are opened here,
so a missing path, a json with unknown image ids or categories, a label count that does not fit
the model, or a batch size the devices cannot split fails before any compilation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.criterion.loss import LossConfig

logger = logging.getLogger(__name__)

GROUPS = ("model", "data", "optimizer", "train")
SOURCES = ("shapes", "coco_json", "yolo", "tfds")
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
# model.* entries that are not DeformableDetrConfig fields
MODEL_EXTRAS = ("init_from", "backbone_weights", "loss")
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(DeformableDetrConfig))


class ConfigError(ValueError):
    """A setting of the run's config is wrong; the message names it and says what to do."""


def _get(group: Mapping[str, Any], key: str, default: Any = None) -> Any:
    try:
        return group[key]
    except (KeyError, AttributeError):
        return default


# ----------------------------------------------------------------------------- checks


def check_groups(config: Mapping[str, Any]) -> None:
    missing = [g for g in GROUPS if g not in config]
    if missing:
        raise ConfigError(f"the config has no {missing} group(s); a recipe needs {GROUPS}")
    unknown = [k for k in config["model"] if k not in MODEL_FIELDS and k not in MODEL_EXTRAS]
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]} is not a DeformableDetrConfig field (nor one of {MODEL_EXTRAS}); "
            f"check the spelling (fields: {', '.join(MODEL_FIELDS)})"
        )


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How the total batch splits: `accum` micro-batches of `micro` images, `per_process` of
    them loaded by each process, `per_device` on each device."""

    total: int
    accum: int
    micro: int
    per_process: int
    per_device: int
    eval_per_process: int


def batch_layout(config: Mapping[str, Any], num_devices: int, num_processes: int) -> BatchLayout:
    """Checks `data.batch_size`, `train.grad_accum_steps`, `data.eval_batch_size` against the
    devices; raises ConfigError naming the setting."""
    data, train = config["data"], config["train"]
    total, accum = int(data["batch_size"]), int(_get(train, "grad_accum_steps", 1))
    if total < 1:
        raise ConfigError(f"data.batch_size must be positive, got {total}")
    if accum < 1:
        raise ConfigError(f"train.grad_accum_steps must be >= 1, got {accum}")
    if total % accum:
        raise ConfigError(
            f"data.batch_size={total} is not divisible by train.grad_accum_steps={accum}; set "
            f"data.batch_size to a multiple of {accum}"
        )
    micro = total // accum
    if micro % num_devices:
        good = num_devices * accum * max(1, round(micro / num_devices))
        raise ConfigError(
            f"data.batch_size={total} (with train.grad_accum_steps={accum}: {micro} images per "
            f"micro-batch) cannot be split evenly over the {num_devices} devices; set "
            f"data.batch_size to a multiple of {num_devices * accum} (e.g. {good}), or change "
            "train.grad_accum_steps"
        )
    eval_total = int(_get(data, "eval_batch_size", 0) or micro)
    if eval_total % num_devices:
        raise ConfigError(
            f"data.eval_batch_size={eval_total} cannot be split evenly over the {num_devices} "
            f"devices; set it to a multiple of {num_devices}"
        )
    return BatchLayout(
        total=total,
        accum=accum,
        micro=micro,
        per_process=micro // num_processes,
        per_device=micro // num_devices,
        eval_per_process=eval_total // num_processes,
    )


def compute_dtype(config: Mapping[str, Any]):
    name = str(_get(config["train"], "compute_dtype", "float32"))
    if name not in COMPUTE_DTYPES:
        raise ConfigError(
            f"train.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}"
        )
    return COMPUTE_DTYPES[name]


def param_dtype(config: Mapping[str, Any]):
    """`train.param_dtype`: the stored dtype of weights and optimizer state ("float32", or
    "float64" under `jax_enable_x64` for exact equivalence checks)."""
    import jax

    name = str(_get(config["train"], "param_dtype", "float32"))
    if name == "float32":
        return None
    if name == "float64":
        if not jax.config.jax_enable_x64:
            raise ConfigError(
                "train.param_dtype='float64' needs jax_enable_x64 (JAX_ENABLE_X64=1 in the "
                "environment); or use float32"
            )
        return jnp.float64
    raise ConfigError(f"train.param_dtype must be 'float32' or 'float64', got {name!r}")


# ----------------------------------------------------------------------------- data


def make_source(config: Mapping[str, Any], split: str):
    """The data source of `split` ("train" or "eval") that `data.source` names."""
    from deformable_detr_jax import data as data_lib

    data = config["data"]
    kind = str(data["source"])
    if kind not in SOURCES:
        raise ConfigError(f"data.source must be one of {SOURCES}, got {kind!r}")
    group = data[kind]
    where = f"data.{kind}"
    strict = bool(_get(data, "strict", False))  # invalid boxes: errors, not dropped and counted
    try:
        if kind == "shapes":
            count = int(group["num_train" if split == "train" else "num_eval"])
            seed = int(group["seed"]) + (0 if split == "train" else 1_000_003)
            return data_lib.ShapesSource(
                count,
                image_size=tuple(group["image_size"]),
                seed=seed,
                min_objects=int(group["min_objects"]),
                max_objects=int(group["max_objects"]),
                min_object_size=float(group["min_object_size"]),
                max_object_size=float(group["max_object_size"]),
            )
        if kind == "coco_json":
            images, annotations = group[f"{split}_images"], group[f"{split}_annotations"]
            if not images or not annotations:
                raise ConfigError(
                    f"{where}.{split}_images and {where}.{split}_annotations must be set (a "
                    "folder of images and its COCO instances json)"
                )
            return data_lib.CocoJsonSource(
                images, annotations, label_mode=group["label_mode"], strict=strict
            )
        if kind == "yolo":
            if not group["folder"]:
                raise ConfigError(f"{where}.folder must be set (images/<split>, labels/<split>)")
            names = tuple(group["names"]) if group["names"] else None
            return data_lib.YoloFolderSource(
                group["folder"], group[f"{split}_split"], names=names, strict=strict
            )
        return data_lib.TfdsCocoSource(
            group[f"{split}_split"],
            group["data_dir"] or None,
            label_mode=group["label_mode"],
            strict=strict,
        )
    except ConfigError:
        raise
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, ImportError) as err:
        raise ConfigError(f"{where} ({split} split): {err}") from err


def augment_config(config: Mapping[str, Any]):
    from deformable_detr_jax.data import AugmentConfig

    group = dict(config["data"]["augment"])
    scale = float(group.pop("scale", 1.0))
    try:
        augment = AugmentConfig(**group)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"data.augment: {err}") from err
    return augment if scale == 1.0 else augment.scaled(scale)


def make_batches(
    config: Mapping[str, Any],
    source,
    *,
    train: bool,
    batch_size: int,
    num_labels: int,
    state: Any = None,
):
    """`data.make_batches` with the recipe's settings, for this process."""
    from deformable_detr_jax import data as data_lib

    data = config["data"]
    pad_to = _get(data, "pad_to")
    buckets = _get(data, "buckets")
    try:
        return data_lib.make_batches(
            source,
            batch_size=batch_size,
            train=train,
            seed=int(data["seed"]),
            augment=augment_config(config),
            max_boxes=int(data["max_boxes"]),
            buckets=tuple(buckets) if buckets else None,
            pad_to=tuple(pad_to) if pad_to else None,
            num_labels=num_labels,
            num_threads=_get(data, "num_threads"),
            backend=str(_get(data, "backend", "auto")),
            state=state,
        )
    except ValueError as err:
        raise ConfigError(f"data: {err}") from err


# ----------------------------------------------------------------------------- model and loss


def model_config(config: Mapping[str, Any], source) -> DeformableDetrConfig:
    """The model's config: the `model` fields (or the `model.init_from` checkpoint's), with
    `num_labels` from the data when `model.num_labels` is None."""
    from deformable_detr_jax.training.initialization import checkpoint_config

    group = config["model"]
    data_labels = getattr(source, "num_labels", None)
    names = getattr(source, "label_names", None)
    num_labels = group["num_labels"] if group["num_labels"] is not None else data_labels
    if num_labels is None:
        raise ConfigError("model.num_labels is None and the data source does not say its classes")
    if data_labels is not None and int(num_labels) < int(data_labels):
        raise ConfigError(
            f"model.num_labels={num_labels} but the training data has {data_labels} classes; "
            f"set model.num_labels to {data_labels} (or None to take it from the data)"
        )
    id2label = None
    if names is not None and len(names) == int(num_labels):
        id2label = tuple(enumerate(str(n) for n in names))
    try:
        if _get(group, "init_from"):
            base = checkpoint_config(group["init_from"])
            return base.replace(
                num_labels=int(num_labels),
                id2label=id2label,
                msda_implementation=group["msda_implementation"],
            )
        fields = {k: group[k] for k in MODEL_FIELDS if k in group}
        fields.update(num_labels=int(num_labels), id2label=id2label)
        for key in ("backbone_depths", "backbone_hidden_sizes"):
            fields[key] = tuple(fields[key])
        return DeformableDetrConfig(**fields)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ConfigError(f"model: {err}") from err


def loss_config(config: Mapping[str, Any], model: DeformableDetrConfig) -> LossConfig:
    group = dict(config["model"]["loss"])
    known = {f.name for f in dataclasses.fields(LossConfig)} - {"num_labels"}
    unknown = sorted(set(group) - known)
    if unknown:
        raise ConfigError(f"model.loss.{unknown[0]} is not a LossConfig field ({sorted(known)})")
    try:
        return LossConfig(num_labels=model.num_labels, **group)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.loss: {err}") from err


def total_steps(config: Mapping[str, Any], steps_per_epoch: int) -> int:
    train = config["train"]
    steps = int(_get(train, "num_steps", 0) or 0)
    if steps <= 0:
        epochs = float(_get(train, "num_epochs", 0) or 0)
        steps = int(round(epochs * steps_per_epoch))
    if steps <= 0:
        raise ConfigError("set train.num_steps or train.num_epochs to a positive number")
    return steps
