"""Pallas kernels used by deformable_detr_jax, each beside its pure-XLA reference."""

from pallas_kernels.ms_deform_attn import ms_deform_attn

__all__ = ["ms_deform_attn"]
