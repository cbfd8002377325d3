"""Fine-tune a converted Deformable DETR checkpoint on a Hugging Face dataset: the layout of the
transformers object-detection guide (cppe-5), from the hub or a folder written by save_to_disk.

Each example has `image` and `objects` with `bbox` (COCO [x, y, width, height] pixels) and
`category` (ClassLabel: its names become the model's labels); `image_id`, `width` and `height`
are used where present. Needs `pip install "deformable_detr_jax[datasets]"`. The model starts
from a detection checkpoint (`model.init_from`, as in `finetune_coco_json.py`), class heads
re-initialised for the dataset's label count; the rates, epochs and batch of that recipe. cppe-5
(1000 training images, 29 test images, 5 labels) in one command line:

    python train.py --config configs/finetune_hf_datasets.py --workdir runs/cppe5 \
        --config.model.init_from=SenseTime/deformable-detr \
        --config.data.hf_datasets.path=cppe-5

A folder saved with `DatasetDict.save_to_disk` instead: `--config.data.hf_datasets.path=DIR`;
other splits: `--config.data.hf_datasets.train_split=...`, `...eval_split=...`; a hub id at a
branch, tag or commit: `--config.data.hf_datasets.revision=...`.
"""

from deformable_detr_jax.training import recipes


def get_config():
    config = recipes.finetune("hf_datasets")
    data = config.data.hf_datasets
    data.path = "cppe-5"
    data.train_split = "train"
    data.eval_split = "test"
    return config
