"""Small models with random weights, built without torch, and the configs the tests share.

`random_model` perturbs every weight and batch-norm statistic away from the initialisation
the way `tests/hf_reference.random_hf_model` perturbs transformers' (no zero projections,
no unit statistics), so that a wrong axis or a missed term changes the outputs.
`small_config(depth_layout, **fields)` is `DeformableDetrConfig.from_hf(hf_reference.hf_config(
depth_layout, **SMALL, **fields))` written directly (tests/test_config_vs_transformers.py
checks the two agree), so torch-free tests run the same architectures as the parity tests.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from deformable_detr_jax import DeformableDetrConfig, DeformableDetrForObjectDetection

SMALL = dict(
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    num_queries=12,
    two_stage_num_proposals=12,
    num_labels=5,
    encoder_attention_heads=4,
    decoder_attention_heads=2,
    encoder_n_points=3,
    decoder_n_points=2,
)
# Tiny ConvNeXt and Swin backbones (their config fields only): strides 4 / 3 and a window of 5,
# which the test images' sides are no multiples of
TINY_CONVNEXT = dict(
    backbone_type="convnext",
    backbone_depths=(1, 1, 1),
    backbone_hidden_sizes=(8, 16, 24),
    backbone_patch_size=4,
)
TINY_SWIN = dict(
    backbone_type="swin",
    backbone_depths=(2, 2, 2),
    backbone_hidden_sizes=(8, 16, 32),
    backbone_num_heads=(1, 2, 2),
    backbone_window_size=5,
    backbone_patch_size=3,
)
BASIC_18 = ((2, 2, 2, 2), "basic", (64, 128, 256, 512))
TINY_BOTTLENECK = ((1, 2, 1, 1), "bottleneck", (64, 128, 256, 256))


def small_config(depth_layout=TINY_BOTTLENECK, **fields) -> DeformableDetrConfig:
    """`SMALL` on a ResNet `(depths, layer_type, hidden_sizes)`, with `fields` on top."""
    depths, layer_type, hidden_sizes = depth_layout
    return DeformableDetrConfig(
        backbone_layer_type=layer_type,
        backbone_depths=tuple(depths),
        backbone_hidden_sizes=tuple(hidden_sizes),
        **{**SMALL, **fields},
    )


def random_model(config: DeformableDetrConfig, seed: int = 0) -> DeformableDetrForObjectDetection:
    """The model initialised from `seed`, then every float weight moved by 0.02 N(0, 1),
    batch-norm means set to 0.1 N(0, 1) and variances to U(0.5, 2)."""
    model = DeformableDetrForObjectDetection(config, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed + 1)
    flat = []
    for path, var in nnx.to_flat_state(state):
        value = var[...]
        if isinstance(var, (nnx.Param, nnx.BatchStat)) and jnp.issubdtype(
            value.dtype, jnp.floating
        ):
            if path[-1] == "running_var":
                new = rng.uniform(0.5, 2.0, value.shape)
            elif path[-1] == "running_mean":
                new = 0.1 * rng.standard_normal(value.shape)
            else:
                new = np.asarray(value, np.float64) + 0.02 * rng.standard_normal(value.shape)
            var = var.replace(jnp.asarray(new, value.dtype))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def drawn_values(state: nnx.State, seed: int = 0) -> dict[tuple, object]:
    """A value for every variable of a (possibly abstract) `state`, keyed by path, drawn with
    NumPy instead of the initialisers (which run op by op, eagerly: seconds per model): kernels
    N(0, 1 / fan_in), norm scales 1 + 0.1 N(0, 1), batch-norm variances U(0.5, 2), everything
    else (biases, embeddings, Swin's bias tables, ConvNeXt's layer scales) 0.1 N(0, 1); dropout
    streams keyed by `seed`, their counters at 0."""
    import jax

    rng = np.random.default_rng(seed)
    values = {}
    for index, (path, variable) in enumerate(nnx.to_flat_state(state)):
        shape, leaf = tuple(variable.shape), path[-1]
        if isinstance(variable, nnx.RngKey):
            values[path] = jax.random.fold_in(jax.random.key(seed), index)
            continue
        if isinstance(variable, nnx.RngCount):
            values[path] = jnp.zeros(shape, variable.dtype)
            continue
        if len(shape) >= 2:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif leaf in ("scale", "weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif leaf == "running_var":
            value = rng.uniform(0.5, 2.0, shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        values[path] = jnp.asarray(value, variable.dtype)
    return values


def drawn_model(config: DeformableDetrConfig, seed: int = 0) -> DeformableDetrForObjectDetection:
    """A model of `config` with `drawn_values` (built abstractly: no initialiser runs)."""
    abstract = nnx.eval_shape(lambda: DeformableDetrForObjectDetection(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    values = drawn_values(state, seed)
    flat = [(path, var.replace(values[path])) for path, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def random_state_dict(config: DeformableDetrConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """`export_state_dict` of `drawn_model(config, seed)`: for tests that need a state dict's
    names, shapes and distinct values without building a model."""
    from deformable_detr_jax import export_state_dict

    return export_state_dict(drawn_model(config, seed))
