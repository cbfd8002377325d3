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

from deformable_detr_jax.training import recipes


def get_config():
    config = recipes.finetune("coco_json")
    data = config.data.coco_json
    data.train_images = "my_data/train"
    data.train_annotations = "my_data/annotations/train.json"
    data.eval_images = "my_data/val"
    data.eval_annotations = "my_data/annotations/val.json"
    data.label_mode = "contiguous"
    return config
