"""Fine-tune a converted Deformable DETR checkpoint on your own COCO-json data.

Starts from a detection checkpoint (`model.init_from`: a Hugging Face hub id such as
SenseTime/deformable-detr, downloaded once into huggingface_hub's cache, a folder written by
`save_pretrained` or a hub-style folder, or a PyTorch .pth/.bin/.safetensors file). The
architecture is the checkpoint's; the class heads are re-initialised for the new label count,
which comes from the json's categories (numbered 0..K-1 in order of category id). Everything else
is copied. Lower learning rates than from scratch, 30 epochs with a drop at 20, batch 8:

    python train.py --config configs/finetune_coco_json.py --workdir runs/my_finetune \
        --config.model.init_from=SenseTime/deformable-detr \
        --config.data.coco_json.train_images=my_data/train \
        --config.data.coco_json.train_annotations=my_data/annotations/train.json \
        --config.data.coco_json.eval_images=my_data/val \
        --config.data.coco_json.eval_annotations=my_data/annotations/val.json
"""

from deformable_detr_jax.config import preset
from deformable_detr_jax.training.recipes import base_config


def get_config():
    config = base_config(preset("deformable-detr"))
    config.model.init_from = "SenseTime/deformable-detr"
    data = config.data
    data.source = "coco_json"
    data.batch_size = 8
    data.coco_json.train_images = "my_data/train"
    data.coco_json.train_annotations = "my_data/annotations/train.json"
    data.coco_json.eval_images = "my_data/val"
    data.coco_json.eval_annotations = "my_data/annotations/val.json"
    data.coco_json.label_mode = "contiguous"
    opt = config.optimizer
    opt.lr = 1e-4
    opt.lr_backbone = 1e-5
    opt.lr_drop_epochs = (20,)
    train = config.train
    train.num_epochs = 30.0
    train.checkpoint_every = 1000
    train.log_every = 50
    return config
