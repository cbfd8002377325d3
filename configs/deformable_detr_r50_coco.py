"""Deformable DETR, ResNet-50, COCO 2017: the paper's recipe (Zhu et al., 2010.04159, Table 1).

AdamW, lr 2e-4, backbone 2e-5, sampling_offsets and reference_points x0.1, weight decay 1e-4,
gradient clipping 0.1, total batch 32, 50 epochs with lr x0.1 at epoch 40; ResNet stem + layer1
and every batch norm frozen; DETR augmentations (flip, multi-scale 480..800 / crop). 91 labels
(COCO category ids, as the published checkpoints). Start the backbone from ImageNet weights:

    python train.py --config configs/deformable_detr_r50_coco.py --workdir runs/ddetr_r50 \
        --config.model.backbone_weights=/path/to/resnet50-0676ba61.pth \
        --config.data.coco_json.train_images=/data/coco/train2017 \
        --config.data.coco_json.train_annotations=/data/coco/annotations/instances_train2017.json \
        --config.data.coco_json.eval_images=/data/coco/val2017 \
        --config.data.coco_json.eval_annotations=/data/coco/annotations/instances_val2017.json

On several hosts add `--distributed` (or `--coordinator_address/--num_processes/--process_id`).
"""

from deformable_detr_jax.config import preset
from deformable_detr_jax.training.recipes import base_config

VARIANT = "deformable-detr"


def get_config():
    config = base_config(preset(VARIANT))
    config.data.source = "coco_json"
    config.train.num_epochs = 50.0
    config.train.checkpoint_every = 2000
    config.train.log_every = 100
    return config
