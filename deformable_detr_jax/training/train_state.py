"""The train state: trained parameters, optimizer state and the frozen weights, as flat dicts.

A Flax NNX model is split once into a static `ModelSpec` (the graph definition and every
variable's path and kind) and two flat `{name: array}` dicts keyed by the dot-joined NNX path
(`model.encoder.layers.0.self_attn.sampling_offsets.kernel`):

    params   the trained `nnx.Param`s (gradients, optimizer state, weight decay)
    frozen   the frozen `nnx.Param`s (optimizer.frozen patterns: stem + layer1) and every
             `nnx.BatchStat` (the frozen batch norms): carried and checkpointed, never updated

Flat string keys make the optimizer's group labels, checkpoints and test comparisons plain
dictionary work. Dropout keys are not state: `ModelSpec.merge` builds fresh RNG variables from a
key that the train step derives from `(seed, step)`, so a resumed run draws the same dropout
masks as an uninterrupted one. Everything is created already replicated on the mesh
(`jax.jit(..., out_shardings=...)`), never first on one device.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.modeling import DeformableDetrForObjectDetection
from deformable_detr_jax.training import mesh as mesh_lib

Params = dict[str, jax.Array]


def param_name(path: Sequence[Any]) -> str:
    """Dot-joined NNX path."""
    return ".".join(str(getattr(p, "key", p)) for p in path)


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes (a pytree; checkpointed whole).

    Attributes:
      step: optimizer steps taken (int32 scalar).
      params: trained parameters `{name: array}`.
      opt_state: the optax state of `params`.
      frozen: frozen parameters and batch-norm statistics `{name: array}`.
      bad_step: -1, or the first step whose loss or gradient was not finite; once set, no
        later step changes the state (the loop stops and reports it).
    """

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    frozen: Params
    bad_step: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class ModelSpec:
    """What it takes to rebuild the model from flat dicts (static, not a pytree)."""

    config: DeformableDetrConfig
    graphdef: Any
    variables: tuple[tuple[tuple[Any, ...], Any], ...]  # (path, abstract variable), flat order
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]

    def merge(
        self,
        params: Mapping[str, jax.Array],
        frozen: Mapping[str, jax.Array],
        *,
        dropout_key: jax.Array | None = None,
        dtype: Any = None,
    ) -> DeformableDetrForObjectDetection:
        """The model holding `params` and `frozen`; call it inside the traced function that uses it.

        Args:
          dropout_key: seeds every dropout stream (stream `i` gets `fold_in(key, i)`).
          dtype: cast the floating `nnx.Param`s (not the batch-norm statistics) to this compute
            dtype, e.g. `jnp.bfloat16`; gradients flow back through the cast in float32.
        """
        key = jax.random.key(0) if dropout_key is None else dropout_key
        items = []
        for index, (path, variable) in enumerate(self.variables):
            if isinstance(variable, nnx.RngKey):
                value = jax.random.fold_in(key, index)
            elif isinstance(variable, nnx.RngCount):
                value = jnp.zeros(variable.shape, variable.dtype)
            else:
                name = param_name(path)
                value = params[name] if name in params else frozen[name]
                if (
                    dtype is not None
                    and isinstance(variable, nnx.Param)
                    and jnp.issubdtype(value.dtype, jnp.floating)
                ):
                    value = value.astype(dtype)
            items.append((path, variable.replace(value)))
        return nnx.merge(self.graphdef, nnx.from_flat_state(items))


def _is_frozen(name: str, variable: Any, frozen_patterns: Sequence[str]) -> bool:
    if not isinstance(variable, nnx.Param):
        return True  # nnx.BatchStat: frozen batch norm
    return any(re.search(p, name) for p in frozen_patterns)


def model_spec(config: DeformableDetrConfig, frozen_patterns: Sequence[str]) -> ModelSpec:
    """The spec of a fresh model of `config` (shapes only, no initialisation work)."""
    abstract = nnx.eval_shape(lambda: DeformableDetrForObjectDetection(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = tuple(nnx.to_flat_state(state))
    trainable, frozen = [], []
    for path, variable in variables:
        if isinstance(variable, nnx.RngState):
            continue
        name = param_name(path)
        (frozen if _is_frozen(name, variable, frozen_patterns) else trainable).append(name)
    if not trainable:
        raise ValueError(
            "optimizer.frozen matches every parameter: nothing would be trained; narrow the "
            "patterns"
        )
    return ModelSpec(config, graphdef, variables, tuple(trainable), tuple(frozen))


def model_weights(model: DeformableDetrForObjectDetection) -> dict[str, np.ndarray | jax.Array]:
    """`{name: array}` of a model's parameters and batch-norm statistics."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    return {param_name(path): variable[...] for path, variable in flat}


def split_weights(spec: ModelSpec, weights: Mapping[str, Any]) -> tuple[Params, Params]:
    """`(params, frozen)` from one `{name: array}` dict holding both."""
    return (
        {name: weights[name] for name in spec.trainable},
        {name: weights[name] for name in spec.frozen},
    )


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Floating leaves of `tree` cast to `dtype` (None: unchanged)."""
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def init_weights(
    spec: ModelSpec, seed: int, mesh: Mesh, dtype: Any = None
) -> tuple[Params, Params]:
    """Randomly initialised `(params, frozen)`, created replicated on `mesh` under `jit`.

    `dtype`: the stored (master) dtype of the weights; default float32 (float64 needs
    `jax_enable_x64`)."""
    config = spec.config

    def init():
        model = DeformableDetrForObjectDetection(config, rngs=nnx.Rngs(params=seed, dropout=seed))
        return cast_floating(split_weights(spec, model_weights(model)), dtype)

    return jax.jit(init, out_shardings=mesh_lib.replicated(mesh))()


def place_weights(weights: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host (or single-device) arrays, equal on every process -> arrays replicated on `mesh`."""
    sharding = mesh_lib.replicated(mesh)
    out = {}
    for name, value in weights.items():
        array = np.asarray(jax.device_get(value))
        out[name] = jax.make_array_from_callback(
            array.shape, sharding, lambda index, a=array: a[index]
        )
    return out


def create_train_state(
    params: Params, frozen: Params, tx: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """A step-0 state around replicated weights; the optimizer state is created replicated."""
    replicated = mesh_lib.replicated(mesh)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    step, bad_step = jax.jit(
        lambda: (jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32)), out_shardings=replicated
    )()
    return TrainState(
        step=step, params=params, opt_state=opt_state, frozen=frozen, bad_step=bad_step
    )


def abstract_train_state(
    spec: ModelSpec, tx: optax.GradientTransformation, mesh: Mesh, dtype: Any = None
) -> TrainState:
    """Shapes, dtypes and shardings of the train state (the restore target of a checkpoint)."""

    def build():
        params, frozen = cast_floating(init_weights_shapes(spec), dtype)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            frozen=frozen,
            bad_step=jnp.zeros((), jnp.int32),
        )

    shapes = jax.eval_shape(build)
    replicated = mesh_lib.replicated(mesh)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes
    )


def init_weights_shapes(spec: ModelSpec) -> tuple[Params, Params]:
    """`(params, frozen)` of zeros with the spec's shapes (for tracing only)."""
    shapes = {
        param_name(path): jnp.zeros(variable.shape, variable.dtype)
        for path, variable in spec.variables
        if not isinstance(variable, nnx.RngState)
    }
    return split_weights(spec, shapes)


def state_sharding(state: TrainState, mesh: Mesh) -> TrainState:
    """Every leaf replicated (data parallelism)."""
    replicated = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda _: replicated, state)


def model_from_weights(
    spec: ModelSpec, weights: Mapping[str, Any]
) -> DeformableDetrForObjectDetection:
    """An eager model holding `weights` (`{name: array}`, trained and frozen together), with
    fresh dropout streams."""
    items = []
    for index, (path, variable) in enumerate(spec.variables):
        if isinstance(variable, nnx.RngKey):
            value = jax.random.fold_in(jax.random.key(0), index)
        elif isinstance(variable, nnx.RngCount):
            value = jnp.zeros(variable.shape, variable.dtype)
        else:
            value = jnp.asarray(np.asarray(jax.device_get(weights[param_name(path)])))
        items.append((path, variable.replace(value)))
    return nnx.merge(spec.graphdef, nnx.from_flat_state(items))


def merged_model(spec: ModelSpec, state: TrainState) -> DeformableDetrForObjectDetection:
    """The trained model (eager, host-usable) from a train state: for `save_pretrained`,
    `Detector` and evaluation outside the loop."""
    return model_from_weights(spec, {**state.params, **state.frozen})
