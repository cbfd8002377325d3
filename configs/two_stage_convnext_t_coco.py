"""Two-stage Deformable DETR (with box refinement), ConvNeXt-T backbone, COCO 2017.

The backbone is transformers' `ConvNextBackbone` of `facebook/convnext-tiny-224` (depths
3-3-9-3, widths 96-192-384-768; stages 2..4 and one extra stride-2 level), started from those
ImageNet weights, which `model.backbone_weights` downloads from the hub by id (or give a local
file or folder). The transformer is the `SenseTime/deformable-detr-with-box-refine-two-stage`
architecture. Neither DINO nor H-Deformable-DETR publishes a ConvNeXt-T recipe; this one is the
Swin-T recipe (configs/two_stage_swin_t_coco.py, H-DETR's Deformable DETR baseline) with the
backbone settings of DINO's ConvNeXt recipes (IDEA-Research/detrex, projects/dino/configs/
models/dino_convnext.py and dino-convnext/dino_convnext_tiny_384_4scale_12ep.py):

- AdamW, lr 2e-4, backbone 2e-5 (DINO-ConvNeXt: 1e-4 and x0.1 for the backbone, the same
  ratio), sampling_offsets and reference_points x0.1, weight decay 1e-4 on every parameter (no
  exemption for norms or layer scale in either), gradient clipping 0.1;
- drop path 0.0 (DINO-ConvNeXt's `drop_path_rate=0.0`);
- nothing frozen (`optimizer.frozen=()`; the default patterns are the ResNet's and would freeze
  the first ConvNeXt stage);
- total batch 16, 12 epochs with every rate x0.1 from epoch 11, DETR augmentations.

On GPUs with less memory, recompute the backbone's stages in the backward pass:
`--config.model.backbone_remat="(True,True,True,True)"` (BENCHMARKS.md has the memory per
setting).

    python train.py --config configs/two_stage_convnext_t_coco.py --workdir runs/two_stage_convnext_t \
        --config.data.coco_json.train_images=/data/coco/train2017 \
        --config.data.coco_json.train_annotations=/data/coco/annotations/instances_train2017.json \
        --config.data.coco_json.eval_images=/data/coco/val2017 \
        --config.data.coco_json.eval_annotations=/data/coco/annotations/instances_val2017.json

On several hosts add `--distributed` (or `--coordinator_address/--num_processes/--process_id`).
"""

from deformable_detr_jax.config import CONVNEXT_TINY, preset
from deformable_detr_jax.training.recipes import two_stage_backbone_coco

VARIANT = "deformable-detr-with-box-refine-two-stage"


def get_config():
    model = preset(VARIANT, **CONVNEXT_TINY).replace(backbone_drop_path_rate=0.0)
    return two_stage_backbone_coco(model)
