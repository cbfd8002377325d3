"""shapes_tiny: a small Deformable DETR on the embedded synthetic shapes, trained on CPU.

The embedded default (`make demo`): no download, 2 CPU cores, 2 to 6 minutes on a quiet machine
(BENCHMARKS.md). Circles, squares and triangles (3 labels) on textured 96 x 96 backgrounds; a
ResNet-ish backbone with one basic block per stage, d_model 64, iterative box refinement, 2 + 2
layers, 16 queries.

    python train.py --config configs/shapes_tiny.py --workdir runs/shapes_tiny
    python train.py --config configs/shapes_tiny.py --workdir runs/quick --config.train.num_steps=50
"""

from deformable_detr_jax.training.recipes import shapes_tiny


def get_config():
    return shapes_tiny()
