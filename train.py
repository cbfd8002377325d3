"""`python train.py --config configs/<recipe>.py --workdir DIR`: the command line is
`deformable_detr_jax/cli/train.py` (also installed as `deformable-detr-train`)."""

from deformable_detr_jax.cli.train import run

if __name__ == "__main__":
    run()
