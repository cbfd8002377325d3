"""The typed settings of a training run: one frozen dataclass per recipe group.

Each field's default is the single default of that setting (`recipes.py` builds the recipe's
ConfigDict from them; recipes override values). Field metadata says what a resumed run may change
(`may_change`) and, for a setting with a fixed set of values, which (`choices`). The model's
architecture, the loss and the augmentation fields are taken from the dataclasses that own them
(`DeformableDetrConfig`, `LossConfig`, `AugmentConfig`), defaults included.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.criterion.loss import LossConfig
from deformable_detr_jax.data import AugmentConfig

# `DeformableDetrConfig` fields kept only for `from_hf` / `to_hf` round trips: the loss reads
# `model.loss.*`, so these are no settings of a run.
MODEL_LOSS_FIELDS = (
    "auxiliary_loss",
    "class_cost",
    "bbox_cost",
    "giou_cost",
    "bbox_loss_coefficient",
    "giou_loss_coefficient",
    "eos_coefficient",
    "focal_alpha",
)
COCO_DIR = "data/coco"


def setting(default: Any, *, may_change: bool = False, choices: tuple = (), doc: str = ""):
    """A settings field: `may_change` on resume, allowed `choices`, a one-line `doc`."""
    metadata = {"may_change": may_change, "choices": choices, "doc": doc}
    if isinstance(default, (list, dict, set)):
        raise TypeError("settings defaults are immutable (tuples)")
    return dataclasses.field(default=default, metadata=metadata)


def _derived(name: str, owner: type, *, skip: tuple = (), may_change: tuple = (), extra=()):
    """A frozen settings dataclass with `owner`'s fields and defaults (minus `skip`), plus
    `extra` `(name, type, field)` entries."""
    fields = []
    for field in dataclasses.fields(owner):
        if field.name in skip:
            continue
        default = field.default
        if default is dataclasses.MISSING:
            default = field.default_factory()  # type: ignore[misc]
        fields.append(
            (field.name, field.type, setting(default, may_change=field.name in may_change))
        )
    return dataclasses.make_dataclass(name, fields + list(extra), frozen=True)


# model.loss: every `LossConfig` field but num_labels (from the model); defaults: "original"
LossSettings = _derived("LossSettings", LossConfig, skip=("num_labels",))
# data.augment: every `AugmentConfig` field, and `scale` (`AugmentConfig.scaled`, applied after)
AugmentSettings = _derived(
    "AugmentSettings",
    AugmentConfig,
    extra=[("scale", float, setting(1.0, doc="every size times this (AugmentConfig.scaled)"))],
)
# model: the architecture (`DeformableDetrConfig` but its loss fields), the starting weights and
# the loss. num_labels / id2label None: from the data.
ModelSettings = _derived(
    "ModelSettings",
    DeformableDetrConfig,
    skip=MODEL_LOSS_FIELDS + ("num_labels", "id2label"),
    may_change=("msda_implementation", "backbone_remat"),
    extra=[
        ("num_labels", "int | None", setting(None, doc="None: the data's class count")),
        ("id2label", "tuple | None", setting(None, doc="None: the data's label names")),
        (
            "init_from",
            str,
            setting(
                "", may_change=True, doc="a detection checkpoint: folder, weights file or hub id"
            ),
        ),
        (
            "backbone_weights",
            str,
            setting(
                "",
                may_change=True,
                doc="an ImageNet backbone: a weights file, its folder or a hub id; ResNet, "
                "ConvNeXt or Swin (timm, torchvision or transformers names)",
            ),
        ),
        ("loss", LossSettings, dataclasses.field(default_factory=LossSettings)),
    ],
)


def architecture(model: Any) -> dict[str, Any]:
    """The `DeformableDetrConfig` fields of a `ModelSettings` (loss fields at their defaults)."""
    names = {f.name for f in dataclasses.fields(DeformableDetrConfig)} - set(MODEL_LOSS_FIELDS)
    return {name: getattr(model, name) for name in names}


@dataclasses.dataclass(frozen=True)
class ShapesSettings:
    """data.shapes: the embedded synthetic shapes (`data.ShapesSource`)."""

    num_train: int = 2000
    num_eval: int = setting(200, may_change=True)
    image_size: tuple[int, int] = (128, 128)
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 3
    min_object_size: float = 0.15
    max_object_size: float = 0.4


LABEL_MODES = ("category_id", "contiguous")


@dataclasses.dataclass(frozen=True)
class CocoJsonSettings:
    """data.coco_json: a folder of images and its COCO instances json per split."""

    train_images: str = setting(f"{COCO_DIR}/train2017", may_change=True)
    train_annotations: str = setting(
        f"{COCO_DIR}/annotations/instances_train2017.json", may_change=True
    )
    eval_images: str = setting(f"{COCO_DIR}/val2017", may_change=True)
    eval_annotations: str = setting(
        f"{COCO_DIR}/annotations/instances_val2017.json", may_change=True
    )
    # 91 labels as the published checkpoints; or "contiguous"
    label_mode: str = setting("category_id", choices=LABEL_MODES)


@dataclasses.dataclass(frozen=True)
class YoloSettings:
    """data.yolo: images/<split>, labels/<split> under `folder`."""

    folder: str = setting("", may_change=True)
    train_split: str = "train2017"
    eval_split: str = setting("val2017", may_change=True)
    names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TfdsSettings:
    """data.tfds: TensorFlow Datasets' coco/2017."""

    data_dir: str = setting("", may_change=True)
    train_split: str = "train"
    eval_split: str = setting("validation", may_change=True)
    label_mode: str = setting("category_id", choices=LABEL_MODES)


@dataclasses.dataclass(frozen=True)
class HfDatasetsSettings:
    """data.hf_datasets: a Hugging Face `datasets` dataset in the transformers object-detection
    guide's layout (`image`, `objects` with COCO pixel `bbox` and ClassLabel `category`)."""

    path: str = setting("", may_change=True, doc="a save_to_disk folder or a hub id (cppe-5)")
    train_split: str = "train"
    eval_split: str = setting("test", may_change=True)
    revision: str = setting("", doc="a hub id's branch, tag or commit; '': the default")


SOURCES = ("shapes", "coco_json", "yolo", "tfds", "hf_datasets")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """data: which source, the batch (images per optimizer step, all devices and hosts
    together), padding, loading, augmentation."""

    source: str = setting("coco_json", choices=SOURCES)
    batch_size: int = 32
    eval_batch_size: int = setting(0, may_change=True, doc="0: the training micro-batch")
    max_boxes: int = 100
    seed: int = 0
    pad_to: tuple[int, int] | None = setting(None, doc="(height, width): one compiled shape")
    buckets: tuple[int, ...] | None = setting(None, doc="padded side lengths; default 128-steps")
    num_threads: int | None = setting(None, may_change=True)
    backend: str = setting("auto", may_change=True, choices=("auto", "grain", "python"))
    strict: bool = setting(False, may_change=True, doc="invalid boxes are errors, not dropped")
    augment: AugmentSettings = dataclasses.field(default_factory=AugmentSettings)
    shapes: ShapesSettings = dataclasses.field(default_factory=ShapesSettings)
    coco_json: CocoJsonSettings = dataclasses.field(default_factory=CocoJsonSettings)
    yolo: YoloSettings = dataclasses.field(default_factory=YoloSettings)
    tfds: TfdsSettings = dataclasses.field(default_factory=TfdsSettings)
    hf_datasets: HfDatasetsSettings = dataclasses.field(default_factory=HfDatasetsSettings)


# The paper's recipe (ResNet stem + layer1 frozen, as torchvision's resnet with
# train_backbone and return_interm_layers).
DEFAULT_FROZEN = (
    r"^model\.backbone\.model\.embedder\.",
    r"^model\.backbone\.model\.encoder\.stages\.0\.",
)
DEFAULT_BACKBONE = (r"^model\.backbone\.",)
DEFAULT_LINEAR_PROJ = (r"sampling_offsets", r"reference_points")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """optimizer: AdamW over three groups (see `optimizer.py`); the rates and the schedule may
    change on resume, the groups may not."""

    name: str = setting("adamw", choices=("adamw",))
    lr: float = setting(2e-4, may_change=True)
    lr_backbone: float = setting(2e-5, may_change=True)
    lr_linear_proj_mult: float = setting(0.1, may_change=True)
    weight_decay: float = setting(1e-4, may_change=True)
    b1: float = setting(0.9, may_change=True)
    b2: float = setting(0.999, may_change=True)
    eps: float = setting(1e-8, may_change=True)
    clip_max_norm: float = setting(0.1, may_change=True, doc="0: no clipping")
    lr_drop_epochs: tuple[int, ...] = setting((40,), may_change=True)
    lr_drop_factor: float = setting(0.1, may_change=True)
    warmup_steps: int = setting(0, may_change=True)
    frozen: tuple[str, ...] = DEFAULT_FROZEN
    backbone_names: tuple[str, ...] = DEFAULT_BACKBONE
    linear_proj_names: tuple[str, ...] = DEFAULT_LINEAR_PROJ


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """train: how long, the dtypes, the seed, and how often to log, checkpoint and evaluate."""

    num_steps: int = setting(0, may_change=True, doc="> 0 wins over num_epochs")
    num_epochs: float = setting(50.0, may_change=True)
    grad_accum_steps: int = 1
    compute_dtype: str = setting("float32", choices=("float32", "bfloat16"))
    # stored weights; "float64" with JAX_ENABLE_X64=1 (checks)
    param_dtype: str = setting("float32", choices=("float32", "float64"))
    seed: int = 42
    log_every: int = setting(50, may_change=True)
    checkpoint_every: int = setting(2000, may_change=True, doc="0: only at the end")
    keep_checkpoints: int = setting(3, may_change=True)
    async_checkpoints: bool = setting(True, may_change=True)
    eval_every: int = setting(0, may_change=True, doc="steps; 0: only at the end")
    eval_at_end: bool = setting(True, may_change=True)
    eval_top_k: int = setting(100, may_change=True)
    save_model: bool = setting(True, may_change=True, doc="save_pretrained to workdir/model")
    tensorboard: bool = setting(True, may_change=True)
    handle_sigterm: bool = setting(True, may_change=True)
    # persistent XLA cache: "auto" = WORKDIR/compile_cache (or $DEFORMABLE_DETR_JAX_COMPILE_CACHE),
    # a directory, or "" (off); a resumed run reads its first step's programs back from it
    compilation_cache_dir: str = setting("auto", may_change=True)


@dataclasses.dataclass(frozen=True)
class Settings:
    """A whole run: the four groups of a recipe."""

    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    optimizer: OptimizerSettings = dataclasses.field(default_factory=OptimizerSettings)
    train: TrainSettings = dataclasses.field(default_factory=TrainSettings)
