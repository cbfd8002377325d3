"""The CPU train step's XLA options (`training.cpu.compiler`, `training.cpu.sized_step`).

The CPU train step is compiled per batch shape with its temporaries split to fit glibc's heaps,
and gives what the plain jitted step gives. Elsewhere the options are None (the default
compile).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax.training.cpu import host_memory
from deformable_detr_jax.training.cpu.compiler import (
    HEAP_BYTES,
    HEAP_FLAG,
    cpu_compiler_options,
)
from deformable_detr_jax.training.cpu.sized_step import CpuTrainStep


def _tiny_train_step():
    """`(mesh, step, state, batch)`: the package's train step of the tiny test model on one CPU."""
    from deformable_detr_jax.criterion.loss import LossConfig
    from deformable_detr_jax.training import mesh as mesh_lib
    from deformable_detr_jax.training import optimizer as optimizer_lib
    from deformable_detr_jax.training import recipes
    from deformable_detr_jax.training.step import make_train_step
    from deformable_detr_jax.training.train_state import (
        create_train_state,
        init_weights,
        model_spec,
    )
    from tests.training_workers import tiny_model_config

    mesh = mesh_lib.make_data_mesh(jax.local_devices()[:1])
    config = tiny_model_config(dropout=0.0)
    opt = recipes.optimizer_group()
    spec = model_spec(config, tuple(opt.frozen))
    labels = {n: optimizer_lib.param_group(n, opt) for n in spec.trainable}
    tx, _ = optimizer_lib.build_optimizer(opt, labels, 10)
    params, frozen = init_weights(spec, 0, mesh)
    state = create_train_state(params, frozen, tx, mesh)
    step = make_train_step(spec, LossConfig.preset("original", config.num_labels), tx, mesh, state)
    rng = np.random.default_rng(0)
    batch = {
        "pixel_values": rng.normal(size=(1, 2, 64, 64, 3)).astype(np.float32),
        "pixel_mask": np.ones((1, 2, 64, 64), bool),
        "labels": rng.integers(0, 3, (1, 2, 4)).astype(np.int32),
        "boxes": np.concatenate(
            [rng.uniform(0.3, 0.7, (1, 2, 4, 2)), rng.uniform(0.1, 0.3, (1, 2, 4, 2))], -1
        ).astype(np.float32),
        "mask": np.array([[[True, True, False, False], [True, False, False, False]]]),
    }
    return mesh, step, state, mesh_lib.host_to_global(batch, mesh, 1)


def test_no_options_off_the_cpu_unsized_or_when_the_user_set_the_flag(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert cpu_compiler_options("gpu", 1024) is None
    assert cpu_compiler_options("tpu", 1024) is None
    assert cpu_compiler_options("cpu") is None  # not sized: the default compile
    monkeypatch.setenv("XLA_FLAGS", f"--{HEAP_FLAG}=1000000")
    assert cpu_compiler_options("cpu", 1024) is None


@pytest.mark.skipif(not host_memory.applies(), reason="needs Linux with glibc")
def test_the_cpu_train_step_splits_its_temporaries_for_its_batch_shape(monkeypatch):
    """The first call of each batch shape compiles with the split sized for it; a second
    shape gets a program of its own, and both give what the step's own jit gives."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    _, step, state, batch = _tiny_train_step()
    assert isinstance(step, CpuTrainStep)
    key = jax.random.key(0)
    _, options = step.lower_sized(state, batch, key)
    assert options == {HEAP_FLAG: HEAP_BYTES}  # the tiny model's values are all far smaller
    want_state, want = step._jitted(jax.tree.map(jnp.copy, state), batch, key)
    got_state, got = step(jax.tree.map(jnp.copy, state), batch, key)
    half = jax.tree.map(lambda x: x[:, :1], batch)  # batch of one: another shape
    step(jax.tree.map(jnp.copy, state), half, key)
    assert len(step._compiled) == 2
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
