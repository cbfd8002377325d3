"""Rematerialised backbone stages (`DeformableDetrConfig.backbone_remat`, `modeling/remat.py`):
the chosen stages run under `jax.checkpoint` and nothing else changes: jitted, the feature maps
are bit-identical and the gradients (drop path on, so the recomputed stages must draw the masks
the forward drew) equal to float rounding, for the ResNet, ConvNeXt and Swin."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformable_detr_jax import DeformableDetrConfig
from deformable_detr_jax.modeling.backbone import DeformableDetrConvEncoder
from deformable_detr_jax.training import ConfigError, settings
from tests.random_models import SMALL, drawn_values

RESNET = dict(
    backbone_layer_type="bottleneck",
    backbone_depths=(1, 2, 1, 1),
    backbone_hidden_sizes=(16, 32, 64, 64),
    backbone_embedding_size=8,
)
CONVNEXT = dict(
    backbone_type="convnext",
    backbone_depths=(1, 2, 1, 1),
    backbone_hidden_sizes=(8, 16, 24, 32),
    backbone_drop_path_rate=0.3,
)
SWIN = dict(
    backbone_type="swin",
    backbone_depths=(1, 2, 1, 1),
    backbone_hidden_sizes=(8, 16, 32, 64),
    backbone_num_heads=(1, 2, 2, 4),
    backbone_window_size=5,
    backbone_drop_path_rate=0.3,
)
REMAT = (True, True, False, True)  # stage 2 (two blocks; Swin: a shifted one) and others


def random_weights(config: DeformableDetrConfig):
    """A backbone's graph, its variables (abstract templates) and `drawn_values` for them as
    `{name: array}`."""
    abstract = nnx.eval_shape(lambda: DeformableDetrConvEncoder(config, rngs=nnx.Rngs(0)))
    graph, state = nnx.split(abstract)
    values = drawn_values(state, seed=1)
    variables = tuple((".".join(map(str, p)), v) for p, v in nnx.to_flat_state(state))
    return graph, variables, {".".join(map(str, p)): v for p, v in values.items()}


def merged(graph, variables, values):
    """The backbone holding `values`, its variables made in the trace that calls this (as the
    train step's `ModelSpec.merge` makes them), so that drop path may count its draws."""
    items = [
        (tuple(int(k) if k.isdigit() else k for k in name.split(".")), v.replace(values[name]))
        for name, v in variables
    ]
    return nnx.merge(graph, nnx.from_flat_state(items))


def features_and_gradients(graph, variables, values, pixels, mask):
    """Jitted: the feature maps (evaluation), and the gradients of a loss on them in training
    (drop path on) with the number of remat equations (`jax.checkpoint`) in their jaxpr."""
    trained = {n for n, v in variables if isinstance(v, nnx.Param)}
    params = {n: a for n, a in values.items() if n in trained}
    rest = {n: a for n, a in values.items() if n not in trained}

    def run(params, rest):
        values = {**params, **rest}
        maps = merged(graph, variables, values)(pixels, mask)

        def loss(params):
            backbone = merged(graph, variables, {**params, **rest})
            maps = backbone(pixels, mask, deterministic=False)
            return sum(jnp.sum(jnp.sin((i + 1.0) * f)) for i, (f, _) in enumerate(maps))

        return [f for f, _ in maps], jax.grad(loss)(params)

    traced = jax.jit(run).trace(params, rest)
    remats = len(re.findall(r"= (?:remat2|checkpoint)\[", str(traced.jaxpr)))
    maps, grads = traced.lower().compile()(params, rest)
    return maps, grads, remats


@pytest.mark.parametrize("fields", [RESNET, CONVNEXT, SWIN], ids=["resnet", "convnext", "swin"])
def test_remat_changes_nothing_computed(fields):
    config = DeformableDetrConfig(**{**SMALL, **fields})
    graph, variables, values = random_weights(config)
    remat_graph, _, _ = random_weights(config.replace(backbone_remat=REMAT))
    pixels = jax.random.normal(jax.random.key(2), (2, 45, 53, 3))
    mask = jnp.ones((2, 45, 53), bool).at[1, 37:].set(False)
    maps, grads, plain_remats = features_and_gradients(graph, variables, values, pixels, mask)
    remat_maps, remat_grads, remats = features_and_gradients(
        remat_graph, variables, values, pixels, mask
    )
    # each chosen stage once in the evaluation (inlined when compiled), once in the gradient
    assert (plain_remats, remats) == (0, 2 * sum(REMAT))
    for plain, remat in zip(maps, remat_maps):
        np.testing.assert_array_equal(np.asarray(remat), np.asarray(plain))
    assert grads.keys() == remat_grads.keys()
    largest = max(float(jnp.abs(g).max()) for g in grads.values())
    assert largest > 1.0
    for name, grad in grads.items():
        np.testing.assert_allclose(
            np.asarray(remat_grads[name]),
            np.asarray(grad),
            rtol=0,
            atol=1e-6 * largest,
            err_msg=name,
        )


@pytest.mark.parametrize("remat", [(True,), (True, False, 1, True), (True,) * 5])
def test_a_bad_remat_is_one_error(remat):
    with pytest.raises(ValueError, match=r"backbone_remat must be \(\) .*\(4 in backbone_depths\)"):
        DeformableDetrConfig(**{**SMALL, **SWIN}, backbone_remat=remat)


def test_remat_is_a_setting_that_may_change_on_resume():
    run = settings.parse({"model": {"backbone_remat": [True, False, True, True]}})
    assert run.model.backbone_remat == (True, False, True, True)
    assert settings.field_of("model.backbone_remat").metadata["may_change"]
    with pytest.raises(ConfigError, match=r"model\.backbone_remat\[1\] must be True or False"):
        settings.parse({"model": {"backbone_remat": [True, "no", True, True]}})
