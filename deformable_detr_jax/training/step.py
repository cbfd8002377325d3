"""The jitted training and evaluation steps.

`train_step(state, batch, base_key) -> (state, metrics)` is one optimizer step over a global
batch of `accum x bs` images, laid out `(accum, bs, ...)` and split over the mesh's `"data"`
axis along `bs`:

1. `num_boxes` = valid target boxes of the whole batch (all devices, all hosts, all
   micro-batches): under `jit` over the global array this sum is the cross-device all-reduce
   the references do with `all_reduce(num_boxes) / world_size`, and every micro-batch's loss is
   normalised by it, so accumulating `accum` micro-batches is the same step as one batch of
   `accum x bs` (the criterion is a sum over images divided by `num_boxes`).
2. forward (dropout keyed by `fold_in(base_key, step)`), Hungarian matching, losses, gradients
   w.r.t. the trained parameters only; `lax.scan` over micro-batches when `accum > 1`.
3. optax update (clipping, groups, AdamW). A non-finite loss or gradient leaves the state as it
   was and records the step in `bad_step`; every later step is then a no-op, so the state stays
   the last good one until the loop stops.

`eval_step(params, frozen, batch) -> detections` runs the model deterministically and returns
the top-k (query, class) pairs per image, as `post_process_object_detection` ranks them, with
boxes as normalised (x0, y0, x1, y1).

On a CPU mesh the train step gets what `training.cpu` applies (its docstring lists them): the
model merged inside the trace prepared by `cpu.prepare_model`, the step jitted with
`cpu.compiler_options` and wrapped by `cpu.sized_train_step`; the eval step is compiled with
the same options.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from deformable_detr_jax.criterion.loss import LossConfig, loss_from_outputs
from deformable_detr_jax.processing.postprocessing import top_k_detections
from deformable_detr_jax.training import cpu
from deformable_detr_jax.training import mesh as mesh_lib
from deformable_detr_jax.training.train_state import ModelSpec, TrainState, state_sharding

# Batch entries the device sees; the rest (image ids, sizes) stay on the host.
TRAIN_KEYS = ("pixel_values", "pixel_mask", "labels", "boxes", "mask")
EVAL_KEYS = ("pixel_values", "pixel_mask")


def _sum_losses(total: dict[str, jax.Array], new: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: total[k] + new[k] for k in total}


def make_train_step(
    spec: ModelSpec,
    loss_config: LossConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state: TrainState,
    *,
    compute_dtype: Any = None,
    schedules: Mapping[str, optax.Schedule] | None = None,
) -> Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """The jitted step (state donated). `state` gives the pytree structure for the shardings.

    Args:
      compute_dtype: e.g. `jnp.bfloat16` for bfloat16 forward/backward (float32 master
        weights, optimizer and loss); None for float32.
      schedules: learning-rate schedules to report as `lr_{group}` metrics.
    """
    on_cpu = cpu.applies(mesh)
    grad_fn = _loss_and_gradients(spec, loss_config, compute_dtype, on_cpu=on_cpu)

    def train_step(state: TrainState, batch: dict[str, jax.Array], base_key: jax.Array):
        # valid boxes of the global batch: an all-reduce over the data axis
        num_boxes = jnp.maximum(batch["mask"].astype(jnp.float32).sum(), 1.0)
        step_key = jax.random.fold_in(base_key, state.step)
        loss, losses, grads = _accumulated(grad_fn, state, batch, num_boxes, step_key)
        new_state, grad_norm = _apply_update(tx, state, loss, grads)
        metrics = {"loss": loss, **losses, "grad_norm": grad_norm, "num_boxes": num_boxes}
        for group, schedule in (schedules or {}).items():
            metrics[f"lr_{group}"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, metrics

    shardings = state_sharding(state, mesh)
    replicated = mesh_lib.replicated(mesh)
    jitted = jax.jit(
        train_step,
        in_shardings=(shardings, mesh_lib.batch_sharding(mesh, 1), replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
        compiler_options=cpu.compiler_options(mesh, rematerialised=any(spec.config.backbone_remat)),
    )
    return cpu.sized_train_step(jitted, mesh) if on_cpu else jitted


def _loss_and_gradients(spec: ModelSpec, loss_config: LossConfig, compute_dtype, *, on_cpu: bool):
    """`grad_fn(params, frozen, micro, num_boxes, key) -> ((loss, losses), grads)` of one
    micro-batch; on a CPU mesh the merged model gets `training/cpu`'s products."""

    def loss_fn(params, frozen, micro, num_boxes, key):
        model = spec.merge(params, frozen, dropout_key=key, dtype=compute_dtype)
        if on_cpu:
            cpu.prepare_model(model)
        pixel_values = micro["pixel_values"]
        if compute_dtype is not None:
            pixel_values = pixel_values.astype(compute_dtype)
        outputs = model(pixel_values, micro["pixel_mask"], deterministic=False)
        with jax.named_scope("loss"):
            total, losses = loss_from_outputs(
                outputs,
                micro["labels"],
                micro["boxes"],
                micro["mask"],
                loss_config,
                num_boxes=num_boxes,
            )
        losses = {k: v.astype(jnp.float32) for k, v in losses.items() if k != "is_finite"}
        return total.astype(jnp.float32), losses

    return jax.value_and_grad(loss_fn, has_aux=True)


def _accumulated(grad_fn, state: TrainState, batch, num_boxes, step_key):
    """Loss, losses and gradients summed over the batch's `accum` micro-batches (its leading
    axis; `lax.scan` when there are several)."""
    accum = batch["mask"].shape[0]
    if accum == 1:
        micro = {k: v[0] for k, v in batch.items()}
        (loss, losses), grads = grad_fn(state.params, state.frozen, micro, num_boxes, step_key)
        return loss, losses, grads

    def body(carry, inputs):
        index, micro = inputs
        key = jax.random.fold_in(step_key, index)
        (loss, losses), grads = grad_fn(state.params, state.frozen, micro, num_boxes, key)
        acc_loss, acc_losses, acc_grads = carry
        acc_grads = jax.tree.map(jnp.add, acc_grads, grads)
        return (acc_loss + loss, _sum_losses(acc_losses, losses), acc_grads), None

    first = {k: v[0] for k, v in batch.items()}
    (_, loss_shapes), grad_shapes = jax.eval_shape(
        grad_fn, state.params, state.frozen, first, num_boxes, step_key
    )
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
    init = (jnp.zeros((), jnp.float32), zeros(loss_shapes), zeros(grad_shapes))
    (loss, losses, grads), _ = jax.lax.scan(body, init, (jnp.arange(accum), batch))
    # cardinality_error is a per-batch mean (logging only): average it, sum the rest
    losses = {k: v / accum if k.startswith("cardinality_error") else v for k, v in losses.items()}
    return loss, losses, grads


def _apply_update(tx: optax.GradientTransformation, state: TrainState, loss, grads):
    """The optimizer step when loss and gradients are finite (and no step was bad before); the
    state as it was otherwise, with the step recorded in `bad_step`. Returns the new state and
    the gradients' global norm."""

    def update(params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    with jax.named_scope("optimizer"):
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.bad_step < 0)
        # A conditional, not `where(ok, new, old)` per leaf: the select made XLA copy
        # every moment estimate before updating it in place (an AdamW update alone on CPU:
        # 26.7 against 9.9 ms).
        params, opt_state = jax.lax.cond(
            ok, update, lambda *state: state, state.params, state.opt_state
        )
    new_state = state.replace(
        step=state.step + ok.astype(jnp.int32),
        params=params,
        opt_state=opt_state,
        bad_step=jnp.where(
            state.bad_step >= 0, state.bad_step, jnp.where(ok, -1, state.step)
        ).astype(jnp.int32),
    )
    return new_state, grad_norm


def make_eval_step(
    spec: ModelSpec, mesh: Mesh, *, top_k: int = 100, compute_dtype: Any = None
) -> Callable[..., dict[str, jax.Array]]:
    """Jitted `(params, frozen, batch) -> {"scores", "labels", "boxes"}`, each `(bs, k, ...)`,
    split over the data axis like the batch: `postprocessing.top_k_detections` of the model's
    outputs, scores the float32 sigmoid of the top logits. Boxes are normalised (x0, y0, x1, y1).
    """

    def eval_step(params, frozen, batch):
        model = spec.merge(params, frozen, dtype=compute_dtype)
        pixel_values = batch["pixel_values"]
        if compute_dtype is not None:
            pixel_values = pixel_values.astype(compute_dtype)
        outputs = model(pixel_values, batch["pixel_mask"], deterministic=True)
        # the post-processing's decoding (`Detector` ranks the same pairs), here on the device
        top_logits, labels, corners = top_k_detections(
            outputs.logits.astype(jnp.float32), outputs.pred_boxes.astype(jnp.float32), top_k, jnp
        )
        return {"scores": jax.nn.sigmoid(top_logits), "labels": labels, "boxes": corners}

    replicated = mesh_lib.replicated(mesh)
    data = mesh_lib.batch_sharding(mesh)
    return jax.jit(
        eval_step,
        in_shardings=(replicated, replicated, data),
        out_shardings=data,
        compiler_options=cpu.compiler_options(mesh),
    )
