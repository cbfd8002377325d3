"""Two-stage Deformable DETR (with box refinement), Swin-T backbone, COCO 2017.

The backbone is transformers' `SwinBackbone` of `microsoft/swin-tiny-patch4-window7-224`
(embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7; stages 2..4 and one extra stride-2 level),
started from those ImageNet weights, which `model.backbone_weights` downloads from the hub by id
(or give a local file or folder). The transformer is the `SenseTime/deformable-detr-with-box-
refine-two-stage` architecture. The optimisation follows H-Deformable-DETR's Swin-T Deformable
DETR baseline (HDETR/H-Deformable-DETR, configs/two_stage/deformable-detr-baseline/12eps/swin/
swin_tiny_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh with main.py's
defaults; its backbone freezes nothing):

- AdamW, lr 2e-4, backbone 2e-5 (DINO's Swin recipes keep the same 0.1 ratio at 1e-4 / 1e-5),
  sampling_offsets and reference_points x0.1, weight decay 1e-4 on every parameter (neither
  H-DETR nor DINO exempts norms or the relative position bias tables), gradient clipping 0.1;
- drop path 0.2 (H-DETR's `--drop_path_rate` default, and the default of DINO's Swin);
- nothing frozen (`optimizer.frozen=()`: H-DETR's and DINO's Swin backbones train every
  parameter; the default patterns are the ResNet's);
- total batch 16 (8 GPUs x 2), 12 epochs with every rate x0.1 from epoch 11, DETR augmentations.

What H-DETR changes beyond the backbone (feed-forward 2048 instead of 1024) is not taken: the
model stays the transformers architecture. On GPUs with less memory, recompute the backbone's
stages in the backward pass: `--config.model.backbone_remat="(True,True,True,True)"` (one flag
per stage; BENCHMARKS.md has the memory per setting).

    python train.py --config configs/two_stage_swin_t_coco.py --workdir runs/two_stage_swin_t \
        --config.data.coco_json.train_images=/data/coco/train2017 \
        --config.data.coco_json.train_annotations=/data/coco/annotations/instances_train2017.json \
        --config.data.coco_json.eval_images=/data/coco/val2017 \
        --config.data.coco_json.eval_annotations=/data/coco/annotations/instances_val2017.json

On several hosts add `--distributed` (or `--coordinator_address/--num_processes/--process_id`).
"""

from deformable_detr_jax.config import SWIN_TINY, preset
from deformable_detr_jax.training.recipes import two_stage_backbone_coco

VARIANT = "deformable-detr-with-box-refine-two-stage"


def get_config():
    model = preset(VARIANT, **SWIN_TINY).replace(backbone_drop_path_rate=0.2)
    return two_stage_backbone_coco(model)
