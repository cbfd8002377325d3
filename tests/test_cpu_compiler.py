"""The training and evaluation steps' XLA:CPU options (`deformable_detr_jax.training.cpu.compiler`).

On jaxlib 0.10.x the CPU steps compile their convolutions with XLA's own emitter instead of
YNNPACK, and keep YNNPACK's dots; the gradients stay those of the default compile to float32
rounding. The CPU train step is compiled per batch shape with its temporaries split to fit
glibc's heaps (tests/test_host_memory.py has what that buys). A model with `backbone_remat`
compiles with jax.checkpoint's barriers kept (XLA:CPU would undo the rematerialisation).
Elsewhere the options are None (the default compile).
"""

from __future__ import annotations

import importlib.metadata
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax.training.cpu import host_memory
from deformable_detr_jax.training.cpu.compiler import (
    BARRIER_PASS,
    HEAP_BYTES,
    HEAP_FLAG,
    PASSES_FLAG,
    YNN_FUSION_FLAG,
    cpu_compiler_options,
    step_compiler_options,
)
from deformable_detr_jax.training.cpu.sized_step import CpuTrainStep

JAXLIB_0_10 = importlib.metadata.version("jaxlib").startswith("0.10.")
needs_jaxlib_0_10 = pytest.mark.skipif(
    not JAXLIB_0_10, reason="the options are measured and given on jaxlib 0.10.x only"
)


def _ynn_ops(hlo: str) -> set[str]:
    """Op names (from the metadata) of the YNNPACK fusions in a compiled module's text."""
    return set(re.findall(r"%ynn_fusion[.\d]* = .*?op_name=\"([^\"]+)\"", hlo))


def _conv_grad(x, w):
    def loss(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(jnp.tanh(y) @ jnp.ones((y.shape[-1], 8), y.dtype))

    return jax.grad(loss, argnums=(0, 1))(x, w)


def test_no_options_off_the_cpu_or_when_the_user_set_the_flag(monkeypatch):
    assert cpu_compiler_options("gpu") is None
    assert cpu_compiler_options("tpu") is None
    monkeypatch.setenv("XLA_FLAGS", f"--{YNN_FUSION_FLAG}=-individual_dot")
    assert cpu_compiler_options("cpu") is None


def test_options_only_on_the_measured_jaxlib(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = cpu_compiler_options("cpu")
    if JAXLIB_0_10:
        assert options == {
            YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
        }
    else:
        assert options is None


@needs_jaxlib_0_10
def test_convolutions_leave_ynnpack_with_the_same_gradients(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (2, 12, 16, 32), jnp.float32)
    w = 0.1 * jax.random.normal(keys[1], (3, 3, 32, 48), jnp.float32)
    default = jax.jit(_conv_grad).lower(x, w).compile()
    tuned = jax.jit(_conv_grad, compiler_options=cpu_compiler_options("cpu")).lower(x, w).compile()
    default_ops, tuned_ops = _ynn_ops(default.as_text()), _ynn_ops(tuned.as_text())
    # the default hands the convolutions to YNNPACK; the options take them back, keep the dots
    assert any("conv_general_dilated" in op for op in default_ops), default_ops
    assert not any("conv_general_dilated" in op for op in tuned_ops), tuned_ops
    assert any("dot_general" in op for op in tuned_ops), tuned_ops
    for got, want in zip(tuned(x, w), default(x, w), strict=True):
        got, want = np.asarray(got), np.asarray(want)
        # float32 rounding of 288-term sums in another order: 1e-5 of the largest gradient
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert np.abs(got - want).max() > 0  # two different compiles, not one program twice


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


@needs_jaxlib_0_10
def test_the_train_step_is_compiled_with_the_options(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    mesh, step, state, batch = _tiny_train_step()
    assert step_compiler_options(mesh) == cpu_compiler_options("cpu")
    hlo = step.lower(state, batch, jax.random.key(0)).compile().as_text()
    assert "convolution(" in hlo  # the backbone's 3x3 convolutions, compiled by XLA itself
    assert not any("conv_general_dilated" in op for op in _ynn_ops(hlo))


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


def _mlp_gradient(ws, x, remat: bool):
    """Gradients of four rematerialised (or not) blocks of eight tanh layers."""

    def block(x, w):
        for _ in range(8):
            x = jnp.tanh(x @ w)
        return x

    def loss(ws, x):
        for w in ws:
            x = (jax.checkpoint(block) if remat else block)(x, w)
        return jnp.sum(x)

    return jax.grad(loss)(ws, x)


def test_rematerialisation_saves_memory_on_cpu(monkeypatch):
    """jaxlib 0.10's XLA:CPU removes `jax.checkpoint`'s barriers and so undoes it (no memory
    saved); the options of a rematerialised model keep them there. Compiled with those options,
    on any jaxlib, the temporaries shrink to about the blocks' inputs and one block's
    activations, with the same gradients."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = cpu_compiler_options("cpu", rematerialised=True)
    assert ((options or {}).get(PASSES_FLAG) == BARRIER_PASS) == JAXLIB_0_10
    assert PASSES_FLAG not in (cpu_compiler_options("cpu") or {})
    assert cpu_compiler_options("gpu", rematerialised=True) is None
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((256, 256)) / 16, jnp.float32) for _ in range(4)]
    x = jnp.asarray(rng.standard_normal((2048, 256)), jnp.float32)
    activation = 2048 * 256 * 4  # one tanh layer's output: 2 MiB

    def compiled(remat, options):
        lowered = jax.jit(lambda ws, x: _mlp_gradient(ws, x, remat)).lower(ws, x)
        return lowered.compile(compiler_options=options)

    def temp(program) -> float:
        return program.memory_analysis().temp_size_in_bytes / activation

    plain, rematerialised = compiled(False, None), compiled(True, options)
    # 32 activations kept without rematerialisation; with it: 4 block inputs and about one
    # block's 8 recomputed activations
    assert temp(plain) >= 30 and temp(rematerialised) <= 16, (temp(plain), temp(rematerialised))
    if JAXLIB_0_10:
        assert temp(compiled(True, None)) >= 30  # undone without the option
    for got, want in zip(rematerialised(ws, x), plain(ws, x)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_a_rematerialised_models_train_step_asks_for_the_barriers(monkeypatch):
    """`make_train_step` compiles a model with `backbone_remat` with the option, others not."""
    from deformable_detr_jax.criterion.loss import LossConfig
    from deformable_detr_jax.training import mesh as mesh_lib
    from deformable_detr_jax.training import optimizer as optimizer_lib
    from deformable_detr_jax.training import recipes
    from deformable_detr_jax.training import step as step_lib
    from deformable_detr_jax.training.train_state import abstract_train_state, model_spec
    from tests.training_workers import tiny_model_config

    asked, real = [], step_lib.cpu.compiler_options
    monkeypatch.setattr(
        step_lib.cpu, "compiler_options", lambda mesh, **kw: asked.append(kw) or real(mesh, **kw)
    )
    mesh = mesh_lib.make_data_mesh(jax.local_devices()[:1])
    opt = recipes.optimizer_group()
    for remat in ((), (False, True, False, True)):
        config = tiny_model_config(dropout=0.0, backbone_remat=remat)
        spec = model_spec(config, tuple(opt.frozen))
        labels = {n: optimizer_lib.param_group(n, opt) for n in spec.trainable}
        tx, _ = optimizer_lib.build_optimizer(opt, labels, 10)
        state = abstract_train_state(spec, tx, mesh)
        loss = LossConfig.preset("original", config.num_labels)
        step_lib.make_train_step(spec, loss, tx, mesh, state)
    assert [kw.get("rematerialised") for kw in asked] == [False, True]
