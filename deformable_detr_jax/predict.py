"""`python -m deformable_detr_jax.predict`: the command line is `deformable_detr_jax.cli.predict`."""

from deformable_detr_jax.cli.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
