"""Which trained parameters the loss reaches: those with a gradient path from the loss.

torch's AdamW skips a parameter whose `grad` is None (outside the loss's autograd graph): no
moment update and no weight decay. In JAX every parameter gets a gradient, zeros where the loss
never reaches it (e.g. a two-stage model's encoder heads without the encoder loss: the proposals
they choose are detached), and `optax.adamw` would still decay it. `reached_parameters` finds,
once and structurally, which gradients depend on the parameters at all: it traces the gradient
of the loss on abstract inputs (`jax.make_jaxpr`, nothing is computed) and follows the jaxpr's
data dependencies from the inputs to each gradient output; a gradient that is a constant (an
instantiated zero) is not reached. As in torch, a parameter inside the graph whose gradient is
zero by value (the earlier decoder layers' heads without the auxiliary loss: their outputs are
stacked, then only the last is used) counts as reached, and is decayed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.criterion.loss import LossConfig, loss_from_outputs
from deformable_detr_jax.training.train_state import ModelSpec, param_name

PROBE_BOXES = 2  # the traced batch: one square image with two boxes (shapes only)


def probe_side(config: DeformableDetrConfig) -> int:
    """A multiple of 64 whose stride-32 feature map alone has at least as many positions as a
    two-stage model takes proposals (tracing costs the same at any size)."""
    return 64 * max(1, math.ceil(math.sqrt(config.two_stage_num_proposals) / 2))


def _probe_batch(config: DeformableDetrConfig, dtype) -> dict[str, jax.ShapeDtypeStruct]:
    side = probe_side(config) if config.two_stage else 64
    size = (1, side, side)
    return {
        "pixel_values": jax.ShapeDtypeStruct((*size, 3), dtype),
        "pixel_mask": jax.ShapeDtypeStruct(size, jnp.bool_),
        "labels": jax.ShapeDtypeStruct((1, PROBE_BOXES), jnp.int32),
        "boxes": jax.ShapeDtypeStruct((1, PROBE_BOXES, 4), dtype),
        "mask": jax.ShapeDtypeStruct((1, PROBE_BOXES), jnp.bool_),
    }


def dependent_outputs(closed: jax.extend.core.ClosedJaxpr) -> list[bool]:
    """For each output of `closed`: whether it depends on any of its inputs (an equation's
    outputs depend on its inputs as a whole; constants and literals depend on none)."""
    jaxpr = closed.jaxpr
    live = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, jax.extend.core.Literal) and v in live for v in eqn.invars):
            live.update(eqn.outvars)
    return [not isinstance(v, jax.extend.core.Literal) and v in live for v in jaxpr.outvars]


_REACHED: dict[tuple, frozenset[str]] = {}  # one trace per model, loss and split in a process


def reached_parameters(spec: ModelSpec, loss_config: LossConfig) -> frozenset[str]:
    """The names of `spec.trainable` whose gradient the loss reaches (traced, not computed)."""
    key = (spec.config, loss_config, spec.trainable)
    if key not in _REACHED:
        _REACHED[key] = _trace_reached(spec, loss_config)
    return _REACHED[key]


def _trace_reached(spec: ModelSpec, loss_config: LossConfig) -> frozenset[str]:
    def loss(params, frozen, batch):
        model = spec.merge(params, frozen)
        outputs = model(batch["pixel_values"], batch["pixel_mask"], deterministic=True)
        total, _ = loss_from_outputs(
            outputs, batch["labels"], batch["boxes"], batch["mask"], loss_config
        )
        return total

    shapes = {
        param_name(path): jax.ShapeDtypeStruct(variable.shape, variable.dtype)
        for path, variable in spec.variables
        if not isinstance(variable, nnx.RngState)
    }
    params = {name: shapes[name] for name in spec.trainable}
    frozen = {name: shapes[name] for name in spec.frozen}
    dtype = next(iter(params.values())).dtype
    inputs = (params, frozen, _probe_batch(spec.config, dtype))
    closed, grads = jax.make_jaxpr(jax.grad(loss), return_shape=True)(*inputs)
    names = [path[0].key for path, _ in jax.tree_util.tree_flatten_with_path(grads)[0]]
    return frozenset(n for n, reached in zip(names, dependent_outputs(closed)) if reached)
