"""From the run's typed settings to the objects it needs, with every check done before compiling.

The settings (`settings.parse` of a recipe, see `settings/groups.py`) are checked for names,
types and choices when parsed; here the checks that need more: the batch against the devices, the
data sources (opened here, so a missing path, a json with unknown image ids or categories, a label
count that does not fit the model fail before any compilation), the model and the loss.
`ConfigError` (a ValueError) names the setting and what to do.
"""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.criterion.loss import LossConfig
from deformable_detr_jax.training import settings as settings_lib
from deformable_detr_jax.training.settings import (
    AugmentSettings,
    ConfigError,
    DataSettings,
    ModelSettings,
    TrainSettings,
)

logger = logging.getLogger(__name__)

__all__ = ["BatchLayout", "ConfigError", "batch_layout", "make_source", "model_config"]

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


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


def batch_layout(
    data: DataSettings, train: TrainSettings, num_devices: int, num_processes: int
) -> BatchLayout:
    """Checks `data.batch_size`, `train.grad_accum_steps`, `data.eval_batch_size` against the
    devices; raises ConfigError naming the setting."""
    total, accum = data.batch_size, train.grad_accum_steps
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
    eval_total = data.eval_batch_size or micro
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


def compute_dtype(train: TrainSettings):
    """`train.compute_dtype` as a dtype (None: float32)."""
    return COMPUTE_DTYPES[train.compute_dtype]


def param_dtype(train: TrainSettings):
    """`train.param_dtype`: the stored dtype of weights and optimizer state ("float32", or
    "float64" under `jax_enable_x64` for exact equivalence checks)."""
    import jax

    if train.param_dtype == "float32":
        return None
    if not jax.config.jax_enable_x64:
        raise ConfigError(
            "train.param_dtype='float64' needs jax_enable_x64 (JAX_ENABLE_X64=1 in the "
            "environment); or use float32"
        )
    return jnp.float64


# ----------------------------------------------------------------------------- data


def make_source(data: DataSettings, split: str):
    """The data source of `split` ("train" or "eval") that `data.source` names."""
    from deformable_detr_jax import data as data_lib

    kind = data.source
    group = getattr(data, kind)
    where = f"data.{kind}"
    strict = data.strict  # invalid boxes: errors, not dropped and counted
    try:
        if kind == "shapes":
            return data_lib.ShapesSource(
                group.num_train if split == "train" else group.num_eval,
                image_size=group.image_size,
                seed=group.seed + (0 if split == "train" else 1_000_003),
                min_objects=group.min_objects,
                max_objects=group.max_objects,
                min_object_size=group.min_object_size,
                max_object_size=group.max_object_size,
            )
        if kind == "coco_json":
            images = getattr(group, f"{split}_images")
            annotations = getattr(group, f"{split}_annotations")
            if not images or not annotations:
                raise ConfigError(
                    f"{where}.{split}_images and {where}.{split}_annotations must be set (a "
                    "folder of images and its COCO instances json)"
                )
            return data_lib.CocoJsonSource(
                images, annotations, label_mode=group.label_mode, strict=strict
            )
        split_name = getattr(group, f"{split}_split")
        if kind == "hf_datasets":
            return hf_datasets_source(group, split_name, strict, where)
        if kind == "yolo":
            if not group.folder:
                raise ConfigError(f"{where}.folder must be set (images/<split>, labels/<split>)")
            names = group.names or None
            return data_lib.YoloFolderSource(group.folder, split_name, names=names, strict=strict)
        return data_lib.TfdsCocoSource(
            split_name, group.data_dir or None, label_mode=group.label_mode, strict=strict
        )
    except ConfigError:
        raise
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, ImportError) as err:
        raise ConfigError(f"{where} ({split} split): {err}") from err


def hf_datasets_source(group, split_name: str, strict: bool, where: str):
    """`data.HfDatasetsSource` of `data.hf_datasets` (`group`) for the split `split_name`."""
    from deformable_detr_jax import data as data_lib

    if not group.path:
        raise ConfigError(
            f"{where}.path must be set: a folder written by save_to_disk or a Hugging Face Hub "
            "dataset id (e.g. cppe-5)"
        )
    return data_lib.HfDatasetsSource(
        group.path, split_name, revision=group.revision or None, strict=strict
    )


def augment_config(augment: AugmentSettings):
    """The `data.AugmentConfig` of `data.augment` (its `scale` applied)."""
    from deformable_detr_jax.data import AugmentConfig

    values = settings_lib.as_dict(augment)
    scale = values.pop("scale")
    try:
        config = AugmentConfig(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"data.augment: {err}") from err
    return config if scale == 1.0 else config.scaled(scale)


def make_batches(
    data: DataSettings,
    source,
    *,
    train: bool,
    batch_size: int,
    num_labels: int,
    state: dict | None = None,
):
    """`data.make_batches` with the run's data settings, for this process."""
    from deformable_detr_jax import data as data_lib

    try:
        return data_lib.make_batches(
            source,
            batch_size=batch_size,
            train=train,
            seed=data.seed,
            augment=augment_config(data.augment),
            max_boxes=data.max_boxes,
            buckets=data.buckets,
            pad_to=data.pad_to,
            num_labels=num_labels,
            num_threads=data.num_threads,
            backend=data.backend,
            state=state,
        )
    except ValueError as err:
        raise ConfigError(f"data: {err}") from err


# ----------------------------------------------------------------------------- model and loss


def model_config(model: ModelSettings, source) -> DeformableDetrConfig:
    """The model's config: the `model` fields (or the `model.init_from` checkpoint's), with
    `num_labels` from the data when `model.num_labels` is None."""
    from deformable_detr_jax.training.initialization import checkpoint_config

    data_labels = getattr(source, "num_labels", None)
    names = getattr(source, "label_names", None)
    num_labels = model.num_labels if model.num_labels is not None else data_labels
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
        if model.init_from:
            return checkpoint_config(model.init_from).replace(
                num_labels=int(num_labels),
                id2label=id2label,
                msda_implementation=model.msda_implementation,
                backbone_remat=model.backbone_remat,
            )
        fields = settings_lib.architecture(model)
        fields.update(num_labels=int(num_labels), id2label=id2label)
        return DeformableDetrConfig(**fields)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ConfigError(f"model: {err}") from err


def loss_config(model: ModelSettings, model_cfg: DeformableDetrConfig) -> LossConfig:
    """The criterion's config: `model.loss` with the model's label count."""
    try:
        return LossConfig(num_labels=model_cfg.num_labels, **settings_lib.as_dict(model.loss))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.loss: {err}") from err


def total_steps(train: TrainSettings, steps_per_epoch: int) -> int:
    """`train.num_steps`, else `train.num_epochs` epochs of `steps_per_epoch`."""
    steps = train.num_steps
    if steps <= 0:
        steps = int(round(train.num_epochs * steps_per_epoch))
    if steps <= 0:
        raise ConfigError("set train.num_steps or train.num_epochs to a positive number")
    return steps
