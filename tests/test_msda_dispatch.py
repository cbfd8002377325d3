"""Dispatch of `pallas_kernels.ms_deform_attn` on a GPU that cannot run the Triton kernels,
and the typed errors for input no implementation takes.

There is no GPU here, so `api._platform` is patched to say "cuda" and
`gpu_support.compute_capability` to name a GPU. The forced failure is then real: the probe
compiles the `pallas_gpu` kernels (not interpreted) for this machine's backend and jax
refuses to lower them ("Only interpret mode is supported on CPU backend"), as jax would
raise a Triton lowering, ptxas or launch error on a GPU. What this cannot show is that a
given GPU-side failure surfaces as a Python exception rather than a crash.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.ms_deform_attn import api, errors, gpu_support, pallas_gpu
from pallas_kernels.ms_deform_attn.xla import ms_deform_attn_xla
from tests.test_ms_deform_attn import Case, make_inputs

CASE = Case(bs=1, len_q=19, nheads=2, head_dim=8, npoints=2, spatial_shapes=((4, 6), (2, 3)))

on_gpu = jax.default_backend() == "gpu"
forced_failure = pytest.mark.skipif(
    on_gpu, reason="the forced failure is the CPU backend refusing to lower the kernels"
)


@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA GPU of compute capability 9.0 with nothing probed or warned yet."""
    monkeypatch.setattr(api, "_platform", lambda: "cuda")
    monkeypatch.setattr(gpu_support, "compute_capability", lambda: (9, 0))
    monkeypatch.setattr(gpu_support, "_verdicts", {})
    monkeypatch.setattr(gpu_support, "_warned", set())


def _must_not_run(*args, **kwargs):
    raise AssertionError("pallas_gpu ran although it cannot serve this call")


@pytest.fixture
def no_pallas_gpu_call(monkeypatch):
    row = api.IMPLEMENTATIONS["pallas_gpu"]
    monkeypatch.setitem(
        api.IMPLEMENTATIONS, "pallas_gpu", dataclasses.replace(row, fn=_must_not_run)
    )


def _jitted(implementation: str):
    return jax.jit(
        lambda value, loc, attn: pallas_kernels.ms_deform_attn(
            value, CASE.spatial_shapes, loc, attn, implementation=implementation
        )
    )


def _fallback_warnings(record) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, errors.PallasGpuFallbackWarning)]


@forced_failure
def test_auto_falls_back_to_xla_once_when_pallas_gpu_fails_to_lower(gpu, no_pallas_gpu_call):
    value, loc, attn, _ = make_inputs(CASE, jnp.float32, seed=11)
    want = ms_deform_attn_xla(value, CASE.spatial_shapes, loc, attn)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = [_jitted("auto")(value, loc, attn), _jitted("auto")(value * 2, loc, attn)]
        # A second configuration (other dtypes) is probed again and fails the same way.
        outs.append(_jitted("auto")(value.astype(jnp.bfloat16), loc, attn))
    found = _fallback_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    assert "Only interpret mode is supported on CPU backend" in message, message
    assert f"jax {jax.__version__}" in message and "implementation='xla'" in message
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(outs[1]), np.asarray(want * 2))
    assert outs[2].dtype == jnp.bfloat16
    assert len(gpu_support._verdicts) == 2  # one probe per configuration, then cached


@forced_failure
def test_explicit_pallas_gpu_raises_with_the_versions(gpu, no_pallas_gpu_call):
    value, loc, attn, _ = make_inputs(CASE, jnp.float32, seed=12)
    with pytest.raises(errors.PallasGpuUnavailableError) as raised:
        _jitted("pallas_gpu")(value, loc, attn)
    message = str(raised.value)
    assert "Only interpret mode is supported on CPU backend" in message, message
    try:
        triton = f"triton package {importlib.metadata.version('triton')}"
    except importlib.metadata.PackageNotFoundError:
        triton = "no triton package"
    for part in (f"jax {jax.__version__}", f"jaxlib {jaxlib.__version__}", "Triton", triton):
        assert part in message, (part, message)
    assert message.endswith("use implementation='xla'")
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, RuntimeError)


def test_kernels_that_disagree_with_xla_are_not_used(gpu, no_pallas_gpu_call, monkeypatch):
    """A kernel that compiles but computes the wrong thing fails the probe's comparison."""
    wrong = lambda *args, **kwargs: 1.01 * ms_deform_attn_xla(*args[:4])  # noqa: E731
    monkeypatch.setattr(pallas_gpu, "ms_deform_attn_pallas_gpu", wrong)
    value, loc, attn, _ = make_inputs(CASE, jnp.float32, seed=13)
    with pytest.warns(errors.PallasGpuFallbackWarning, match="output disagrees with 'xla'"):
        out = _jitted("auto")(value, loc, attn)
    want = ms_deform_attn_xla(value, CASE.spatial_shapes, loc, attn)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


def test_auto_uses_pallas_gpu_where_the_probe_passes(gpu, monkeypatch):
    """The kernels in interpret mode stand in for compiled ones: the probe passes once per
    configuration, "auto" then calls pallas_gpu, and nothing is warned."""
    interpreted = functools.partial(pallas_gpu.ms_deform_attn_pallas_gpu, interpret=True)
    monkeypatch.setattr(pallas_gpu, "ms_deform_attn_pallas_gpu", interpreted)
    calls = []

    def pallas_gpu_row(value, spatial_shapes, loc, attn, *, interpret=False):
        calls.append(interpret)
        return interpreted(value, spatial_shapes, loc, attn)

    row = dataclasses.replace(api.IMPLEMENTATIONS["pallas_gpu"], fn=pallas_gpu_row)
    monkeypatch.setitem(api.IMPLEMENTATIONS, "pallas_gpu", row)
    value, loc, attn, _ = make_inputs(CASE, jnp.float32, seed=14)
    with warnings.catch_warnings():
        warnings.simplefilter("error", errors.PallasGpuFallbackWarning)
        out = _jitted("auto")(value, loc, attn)
        _jitted("pallas_gpu")(value, loc, attn)
    assert calls == [False, False]
    assert list(gpu_support._verdicts.values()) == [None]
    want = ms_deform_attn_xla(value, CASE.spatial_shapes, loc, attn)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_gpu_without_triton_support(gpu, no_pallas_gpu_call, monkeypatch):
    monkeypatch.setattr(gpu_support, "compute_capability", lambda: (7, 5))
    probes = []
    monkeypatch.setattr(gpu_support, "_probe", lambda *key: probes.append(key))
    value, loc, attn, _ = make_inputs(CASE, jnp.float32, seed=15)
    with pytest.raises(errors.PallasGpuUnavailableError, match="compute capability 7.5"):
        _jitted("pallas_gpu")(value, loc, attn)
    with pytest.warns(errors.PallasGpuFallbackWarning, match="compute capability 7.5"):
        out = _jitted("auto")(value, loc, attn)
    assert probes == []  # decided before any compilation
    want = ms_deform_attn_xla(value, CASE.spatial_shapes, loc, attn)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


def _huge():
    """Shapes with value of exactly 2**31 elements (one past int32 offsets), abstract."""
    shapes = ((2048, 4096),)
    value = jax.ShapeDtypeStruct((1, 2048 * 4096, 8, 32), jnp.float32)
    loc = jax.ShapeDtypeStruct((1, 10, 8, 1, 4, 2), jnp.float32)
    attn = jax.ShapeDtypeStruct((1, 10, 8, 1, 4), jnp.float32)
    return shapes, value, loc, attn


def test_shape_past_int32_offsets(gpu, no_pallas_gpu_call):
    shapes, value, loc, attn = _huge()
    for interpret in (False, True):
        with pytest.raises(errors.KernelLimitError, match=r"2\*\*31 - 1 elements: use impl"):
            pallas_kernels.ms_deform_attn(
                value, shapes, loc, attn, implementation="pallas_gpu", interpret=interpret
            )
    with pytest.warns(errors.PallasGpuFallbackWarning, match="int32 offsets"):
        out = jax.eval_shape(
            lambda v, s, a: pallas_kernels.ms_deform_attn(v, shapes, s, a), value, loc, attn
        )
    assert out.shape == (1, 10, 256) and out.dtype == jnp.float32
    assert gpu_support._verdicts == {}  # no probe for a call pallas_gpu cannot take


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu", "pallas_tpu", "auto"])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float8_e4m3fn, jnp.complex64, bool])
def test_unsupported_dtype_raises_before_tracing(implementation, dtype, monkeypatch):
    for name, row in api.IMPLEMENTATIONS.items():
        monkeypatch.setitem(api.IMPLEMENTATIONS, name, dataclasses.replace(row, fn=_must_not_run))
    value, loc, attn, _ = make_inputs(CASE, jnp.float32, seed=16)
    operands = [value, loc, attn]
    for i, name in enumerate(("value", "sampling_locations", "attention_weights")):
        bad = list(operands)
        bad[i] = operands[i].astype(dtype)
        with pytest.raises(errors.UnsupportedDtypeError, match=f"^{name} has dtype") as raised:
            pallas_kernels.ms_deform_attn(
                bad[0],
                CASE.spatial_shapes,
                bad[1],
                bad[2],
                implementation=implementation,
                interpret=True,
            )
        assert "cast it to float32" in str(raised.value)
        assert isinstance(raised.value, TypeError) and isinstance(raised.value, ValueError)


@pytest.mark.skipif(not on_gpu, reason="needs a GPU: the probe compiles the kernels for it")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "case",
    [
        Case(
            bs=2,
            len_q=300,
            nheads=8,
            head_dim=32,
            npoints=4,
            spatial_shapes=((20, 30), (10, 15), (5, 8), (3, 4)),
        ),
        Case(
            bs=1,
            len_q=77,
            nheads=8,
            head_dim=32,
            npoints=8,
            spatial_shapes=((9, 11), (5, 6), (3, 3), (2, 2), (1, 1)),
        ),
    ],
    ids=["four_levels", "five_levels_eight_points"],
)
def test_probe_passes_on_this_gpu(case, dtype, monkeypatch):
    """On a GPU where the kernels work the probe must say so: "auto" then runs pallas_gpu
    (no fallback warning) and agrees with "xla"."""
    monkeypatch.setattr(gpu_support, "_verdicts", {})
    monkeypatch.setattr(gpu_support, "_warned", set())
    row = api.IMPLEMENTATIONS["pallas_gpu"]
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("interpret"))
        return row.fn(*args, **kwargs)

    monkeypatch.setitem(api.IMPLEMENTATIONS, "pallas_gpu", dataclasses.replace(row, fn=counted))
    value, loc, attn, _ = make_inputs(case, dtype, seed=17)
    assert gpu_support.problem(value, case.spatial_shapes, loc, attn) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", errors.PallasGpuFallbackWarning)
        out = jax.jit(lambda v, s, a: pallas_kernels.ms_deform_attn(v, case.spatial_shapes, s, a))(
            value, loc, attn
        )
    assert calls == [False]  # compiled pallas_gpu, chosen by "auto"
    want = ms_deform_attn_xla(value, case.spatial_shapes, loc, attn)
    out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol * np.abs(want).max())
