"""Typed, frozen settings of a training run, parsed once from a recipe (`parse`).

    from deformable_detr_jax.training import settings
    run = settings.parse(get_config())        # configs/<name>.py; ConfigError on a bad setting
    run.optimizer.lr, run.model.loss.bbox_loss_coefficient, run.data.augment.scales

Groups: `model` (`ModelSettings`: the architecture, `init_from`, `backbone_weights`, `loss`),
`data` (`DataSettings`, per-source sub-groups and `augment`), `optimizer`, `train`. One default
per setting: the field's. `field_of("train.seed").metadata["may_change"]` says whether a resumed
run may change it.
"""

from deformable_detr_jax.training.settings.errors import ConfigError
from deformable_detr_jax.training.settings.groups import (
    MODEL_LOSS_FIELDS,
    SOURCES,
    AugmentSettings,
    CocoJsonSettings,
    DataSettings,
    HfDatasetsSettings,
    LossSettings,
    ModelSettings,
    OptimizerSettings,
    Settings,
    ShapesSettings,
    TfdsSettings,
    TrainSettings,
    YoloSettings,
    architecture,
)
from deformable_detr_jax.training.settings.parsing import (
    as_dict,
    check_name,
    field_of,
    parse,
    parse_group,
    to_config_dict,
)

__all__ = [
    "MODEL_LOSS_FIELDS",
    "SOURCES",
    "AugmentSettings",
    "CocoJsonSettings",
    "ConfigError",
    "DataSettings",
    "HfDatasetsSettings",
    "LossSettings",
    "ModelSettings",
    "OptimizerSettings",
    "Settings",
    "ShapesSettings",
    "TfdsSettings",
    "TrainSettings",
    "YoloSettings",
    "architecture",
    "as_dict",
    "check_name",
    "field_of",
    "parse",
    "parse_group",
    "to_config_dict",
]
