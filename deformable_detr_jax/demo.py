"""`make demo`: train `configs/shapes_tiny.py` on CPU, evaluate, save, detect, draw.

See `deformable_detr_jax/cli/demo.py` for the steps; `--workdir` moves the output
(default `runs/demo`).
"""

from deformable_detr_jax.cli.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
