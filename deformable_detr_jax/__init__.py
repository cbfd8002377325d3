"""Deformable DETR in JAX."""
