"""Rematerialisation of backbone stages (`DeformableDetrConfig.backbone_remat`).

A stage called through `call_stage(stage, True, ...)` runs under `nnx.remat` (`jax.checkpoint`):
when it is differentiated, only its inputs are kept for the backward pass and its activations are
recomputed there, trading one more forward of the stage for the memory of its activations (what
the Swin and ConvNeXt backbones of DINO and H-Deformable-DETR call `use_checkpoint`). Without
differentiation the stage is inlined as it is: evaluation and inference compute exactly what they
compute without it. The ResNet, ConvNeXt and Swin encoders call each of their stages this way.
"""

from __future__ import annotations

from typing import Any

from flax import nnx


def stage_flags(remat: tuple[bool, ...], num_stages: int) -> tuple[bool, ...]:
    """One flag per stage: `remat` itself, or all False when it is `()`."""
    return tuple(remat) if remat else (False,) * num_stages


def call_stage(stage: nnx.Module, remat: bool, *inputs: Any, **static: Any) -> Any:
    """`stage(*inputs, **static)`, under `nnx.remat` when `remat`.

    `inputs` are arrays or pytrees of arrays (None allowed): what the recomputation starts from;
    `static` are Python values (sizes, `deterministic`) fixed at trace time. The stage's variables
    (its dropout streams' counters included) go in and out as `nnx.remat` passes them, so a
    recomputed drop path draws the same masks as the forward pass did.
    """
    if not remat:
        return stage(*inputs, **static)
    return nnx.remat(lambda module, *args: module(*args, **static))(stage, *inputs)
