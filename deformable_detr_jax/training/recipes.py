"""The full default ConfigDict that every `configs/<recipe>.py` starts from and overrides.

Four groups (big_vision style): `model` (every `DeformableDetrConfig` field, `init_from`,
`backbone_weights`, `loss`), `data`, `optimizer`, `train`. Every key exists in the default, so
`--config.group.key=value` on the command line is checked: a key that is not here is an error
naming it. Values that may stay unset are typed placeholders (`model.num_labels`: None takes the
data's class count). The defaults are the paper's COCO recipe (fundamentalvision
Deformable-DETR `main.py`).
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.criterion.loss import LossConfig
from deformable_detr_jax.data import AugmentConfig
from deformable_detr_jax.training import optimizer as optimizer_lib

COCO_DIR = "data/coco"


def model_group(model: DeformableDetrConfig | None = None, *, loss_preset: str = "original"):
    model = DeformableDetrConfig() if model is None else model
    group = ml_collections.ConfigDict()
    for field in dataclasses.fields(DeformableDetrConfig):
        value = getattr(model, field.name)
        if field.name == "num_labels":
            value = config_dict.placeholder(int)  # None: from the data
        elif field.name == "id2label":
            value = config_dict.placeholder(tuple)  # None: the data's label names
        group[field.name] = value
    group.init_from = ""  # a detection checkpoint to fine-tune (folder or PyTorch file)
    group.backbone_weights = ""  # an ImageNet ResNet state dict (torchvision / timm)
    loss = dataclasses.asdict(LossConfig.preset(loss_preset, num_labels=1))
    loss.pop("num_labels")
    group.loss = ml_collections.ConfigDict(loss)
    return group


def data_group():
    group = ml_collections.ConfigDict()
    group.source = "coco_json"  # shapes | coco_json | yolo | tfds
    group.batch_size = 32  # images per optimizer step, all devices and hosts together
    group.eval_batch_size = 0  # 0: the training micro-batch
    group.max_boxes = 100
    group.seed = 0
    group.pad_to = config_dict.placeholder(tuple)  # (height, width): one compiled shape
    group.buckets = config_dict.placeholder(tuple)  # padded side lengths; default 128-steps
    group.num_threads = config_dict.placeholder(int)
    group.backend = "auto"  # grain | python | auto
    group.strict = False  # invalid boxes (NaN, no area, outside the image) are errors, not dropped
    augment = dataclasses.asdict(AugmentConfig())
    augment["scale"] = 1.0  # AugmentConfig.scaled(scale) applied after the fields
    group.augment = ml_collections.ConfigDict(augment)
    group.shapes = ml_collections.ConfigDict(
        dict(
            num_train=2000,
            num_eval=200,
            image_size=(128, 128),
            seed=0,
            min_objects=1,
            max_objects=3,
            min_object_size=0.15,
            max_object_size=0.4,
        )
    )
    group.coco_json = ml_collections.ConfigDict(
        dict(
            train_images=f"{COCO_DIR}/train2017",
            train_annotations=f"{COCO_DIR}/annotations/instances_train2017.json",
            eval_images=f"{COCO_DIR}/val2017",
            eval_annotations=f"{COCO_DIR}/annotations/instances_val2017.json",
            label_mode="category_id",  # 91 labels as the published checkpoints; or "contiguous"
        )
    )
    group.yolo = ml_collections.ConfigDict(
        dict(
            folder="",
            train_split="train2017",
            eval_split="val2017",
            names=(),
        )
    )
    group.tfds = ml_collections.ConfigDict(
        dict(
            data_dir="",
            train_split="train",
            eval_split="validation",
            label_mode="category_id",
        )
    )
    return group


def optimizer_group():
    group = ml_collections.ConfigDict()
    group.name = "adamw"
    group.lr = 2e-4
    group.lr_backbone = 2e-5
    group.lr_linear_proj_mult = 0.1
    group.weight_decay = 1e-4
    group.b1 = 0.9
    group.b2 = 0.999
    group.eps = 1e-8
    group.clip_max_norm = 0.1
    group.lr_drop_epochs = (40,)
    group.lr_drop_factor = 0.1
    group.warmup_steps = 0
    group.frozen = optimizer_lib.DEFAULT_FROZEN
    group.backbone_names = optimizer_lib.DEFAULT_BACKBONE
    group.linear_proj_names = optimizer_lib.DEFAULT_LINEAR_PROJ
    return group


def train_group():
    group = ml_collections.ConfigDict()
    group.num_steps = 0  # > 0 wins over num_epochs
    group.num_epochs = 50.0
    group.grad_accum_steps = 1
    group.compute_dtype = "float32"  # or "bfloat16"
    group.param_dtype = "float32"  # stored weights; "float64" with JAX_ENABLE_X64=1 (checks)
    group.seed = 42
    group.log_every = 50
    group.checkpoint_every = 2000
    group.keep_checkpoints = 3
    group.async_checkpoints = True
    group.eval_every = 0  # steps; 0: only at the end
    group.eval_at_end = True
    group.eval_top_k = 100
    group.save_model = True  # save_pretrained to workdir/model at the end
    group.tensorboard = True
    group.handle_sigterm = True
    # persistent XLA cache: "auto" = WORKDIR/compile_cache (or $DEFORMABLE_DETR_JAX_COMPILE_CACHE),
    # a directory, or "" (off); a resumed run reads its first step's programs back from it
    group.compilation_cache_dir = "auto"
    return group


def base_config(model: DeformableDetrConfig | None = None, *, loss_preset: str = "original"):
    """The paper's COCO recipe for `model` (default: `DeformableDetrConfig()`, ResNet-50)."""
    config = ml_collections.ConfigDict()
    config.model = model_group(model, loss_preset=loss_preset)
    config.data = data_group()
    config.optimizer = optimizer_group()
    config.train = train_group()
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
