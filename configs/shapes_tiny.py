"""shapes_tiny: a small Deformable DETR on the embedded synthetic shapes, trained on CPU.

The embedded default (`make demo`): no download, 2 CPU cores, 2 min 23 s for the whole demo on
an idle 2-core machine, about 4 minutes on a busy one (BENCHMARKS.md); AP50 0.895. Circles, squares and triangles (3 labels) on textured 96 x 96 backgrounds; a
ResNet-ish backbone with one basic block per stage, d_model 64, iterative box refinement, 2 + 2
layers, 16 queries.

    python train.py --config configs/shapes_tiny.py --workdir runs/shapes_tiny
    python train.py --config configs/shapes_tiny.py --workdir runs/quick --config.train.num_steps=50
"""

from deformable_detr_jax.training.recipes import shapes_tiny


def get_config():
    return shapes_tiny()
