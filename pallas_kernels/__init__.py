"""Pallas kernels used by deformable_detr_jax, each beside a pure-XLA implementation and a plain
jnp reference (the correctness oracle)."""

# Importing the package checks the Python/jax/jaxlib/flax versions (one clear error).
import deformable_detr_jax  # noqa: F401
from pallas_kernels.ms_deform_attn import ms_deform_attn

__all__ = ["ms_deform_attn"]
