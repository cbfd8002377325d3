"""The full default ConfigDict that every `configs/<recipe>.py` starts from and overrides.

Four groups (big_vision style): `model` (the `DeformableDetrConfig` fields but its loss fields,
`init_from`, `backbone_weights`, `loss`), `data`, `optimizer`, `train`. The ConfigDict is built
from the typed settings' defaults (`settings/groups.py`: one default per setting), so every key
exists and `--config.group.key=value` is checked: a key that is not here is an error naming it.
Values that may stay unset are typed placeholders (`model.num_labels`: None takes the data's
class count). The defaults are the paper's COCO recipe (fundamentalvision Deformable-DETR
`main.py`).
"""

from __future__ import annotations

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.criterion.loss import PRESETS
from deformable_detr_jax.training import settings as settings_lib


def model_settings(
    model: DeformableDetrConfig | None = None, *, loss_preset: str = "original"
) -> settings_lib.ModelSettings:
    """The `model` group of `model` (default: `DeformableDetrConfig()`, ResNet-50) with the loss
    of `loss_preset` ("original" or "transformers"); num_labels and id2label from the data."""
    model = DeformableDetrConfig() if model is None else model
    if loss_preset not in PRESETS:
        raise ValueError(f"unknown loss preset {loss_preset!r}; expected one of {tuple(PRESETS)}")
    loss = settings_lib.LossSettings(**PRESETS[loss_preset])
    values = settings_lib.architecture(model)
    values.update(num_labels=None, id2label=None)
    return settings_lib.ModelSettings(**values, loss=loss)


def model_group(model: DeformableDetrConfig | None = None, *, loss_preset: str = "original"):
    return settings_lib.to_config_dict(model_settings(model, loss_preset=loss_preset))


def data_group():
    return settings_lib.to_config_dict(settings_lib.DataSettings())


def optimizer_group():
    return settings_lib.to_config_dict(settings_lib.OptimizerSettings())


def train_group():
    return settings_lib.to_config_dict(settings_lib.TrainSettings())


def base_config(model: DeformableDetrConfig | None = None, *, loss_preset: str = "original"):
    """The paper's COCO recipe for `model` (default: `DeformableDetrConfig()`, ResNet-50)."""
    run = settings_lib.Settings(model=model_settings(model, loss_preset=loss_preset))
    return settings_lib.to_config_dict(run)


def finetune(source: str, init_from: str = "SenseTime/deformable-detr"):
    """The fine-tuning recipes (configs/finetune_*.py): the paper's model from a detection
    checkpoint (`init_from`, class heads re-initialised for the data's labels), on `source`, at
    batch 8, learning rates 1e-4 / 1e-5 (backbone) dropped at epoch 20 of 30."""
    config = base_config()
    config.model.init_from = init_from
    config.data.source = source
    config.data.batch_size = 8
    opt = config.optimizer
    opt.lr = 1e-4
    opt.lr_backbone = 1e-5
    opt.lr_drop_epochs = (20,)
    train = config.train
    train.num_epochs = 30.0
    train.checkpoint_every = 1000
    train.log_every = 50
    return config


# The ImageNet backbones the two-stage ConvNeXt-T / Swin-T recipes start from (hub ids).
IMAGENET_WEIGHTS = {
    "convnext": "facebook/convnext-tiny-224",
    "swin": "microsoft/swin-tiny-patch4-window7-224",
}


def two_stage_backbone_coco(model: DeformableDetrConfig):
    """configs/two_stage_{swin,convnext}_t_coco.py: two-stage Deformable DETR with box refinement
    on a ConvNeXt or Swin `model`, from its ImageNet weights (`IMAGENET_WEIGHTS`, a hub id), as
    H-Deformable-DETR trains its Swin-T Deformable DETR baseline (see the recipes' docstrings):
    AdamW lr 2e-4, backbone 2e-5, weight decay 1e-4 on every parameter, nothing frozen, total
    batch 16, 12 epochs with the rates x0.1 from epoch 11."""
    config = base_config(model)
    config.model.backbone_weights = IMAGENET_WEIGHTS[model.backbone_type]
    data = config.data
    data.source = "coco_json"
    data.batch_size = 16
    opt = config.optimizer
    opt.lr = 2e-4
    opt.lr_backbone = 2e-5
    opt.weight_decay = 1e-4
    opt.frozen = ()  # DINO and H-DETR train every backbone parameter (stem included)
    opt.lr_drop_epochs = (11,)
    train = config.train
    train.num_epochs = 12.0
    train.checkpoint_every = 2000
    train.log_every = 100
    return config


def shapes_tiny():
    """configs/shapes_tiny.py: the embedded default that `make demo` trains (see its docstring)."""
    model = DeformableDetrConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        dropout=0.0,
        num_queries=16,
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
        with_box_refine=True,
        backbone_layer_type="basic",
        backbone_depths=(1, 1, 1, 1),
        backbone_hidden_sizes=(32, 64, 128, 256),
        backbone_embedding_size=32,
    )
    config = base_config(model)
    data = config.data
    data.source = "shapes"
    data.batch_size = 8
    data.max_boxes = 8
    data.shapes.num_train = 4000
    data.shapes.num_eval = 200
    data.shapes.image_size = (96, 96)
    data.shapes.max_objects = 4
    data.pad_to = (96, 96)  # one compiled shape
    data.augment.scales = (96,)
    data.augment.max_size = 96
    data.augment.crop_prob = 0.0
    data.augment.eval_size = 96
    data.augment.eval_max_size = 96

    opt = config.optimizer
    opt.lr = 1e-3
    opt.lr_backbone = 1e-3  # no ImageNet weights: the backbone learns from scratch
    opt.frozen = ()  # nothing pretrained to keep
    opt.clip_max_norm = 1.0
    opt.lr_drop_epochs = ()
    opt.warmup_steps = 50

    train = config.train
    train.num_steps = 1500
    train.log_every = 50
    train.checkpoint_every = 500
    train.eval_every = 0
    return config
