"""A CPU step reusing the host memory of the step before (`training.cpu.host_memory` and the
temporaries split by `training.cpu.compiler`): which glibc settings are made, when, and which
programs are split. (What glibc then does with the memory is glibc's: BENCHMARKS.md has the
page faults and step times it saves.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from deformable_detr_jax.training.cpu import host_memory
from deformable_detr_jax.training.cpu.compiler import (
    HEAP_BYTES,
    HEAP_FLAG,
    cpu_compiler_options,
    largest_value_bytes,
)

needs_glibc = pytest.mark.skipif(not host_memory.applies(), reason="needs Linux with glibc")


@needs_glibc
def test_configure_process_keeps_freed_memory_from_then_on_for_a_cpu_process(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "_set", lambda *values: calls.append(values))
    monkeypatch.setattr(host_memory, "_configured", False)
    assert not host_memory.configure_process("gpu")
    assert calls == []
    assert host_memory.configure_process("cpu")
    assert host_memory.configure_process("cpu")  # once per process
    assert calls == [(0, 2**31 - 1)]


@pytest.mark.parametrize(
    "name, value",
    [
        ("MALLOC_MMAP_MAX_", "0"),
        ("MALLOC_TRIM_THRESHOLD_", "1000"),
        ("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1"),
    ],
)
def test_the_users_own_malloc_settings_are_kept(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    assert not host_memory.applies()
    monkeypatch.setattr(host_memory, "_set", lambda *values: pytest.fail("mallopt called"))
    assert not host_memory.configure_process("cpu")
    assert HEAP_FLAG not in (cpu_compiler_options("cpu", 1024) or {})


def test_largest_value_bytes_looks_inside_nested_jaxprs():
    def body(carry, x):
        return carry + jnp.sum(jnp.outer(x, x)), None  # (300, 300) float32 inside the scan

    def f(xs):
        inner = jax.jit(lambda v: jnp.concatenate([v, v, v]))  # (3 * 50, 300) inside a jit
        return jax.lax.scan(body, 0.0, xs)[0] + jnp.sum(inner(xs))

    jaxpr = jax.make_jaxpr(f)(jnp.ones((50, 300), jnp.float32))
    assert largest_value_bytes(jaxpr) == 300 * 300 * 4


def test_no_split_for_a_value_larger_than_a_heap(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert HEAP_FLAG not in (cpu_compiler_options("cpu", HEAP_BYTES + 1) or {})
    assert HEAP_FLAG not in (cpu_compiler_options("cpu") or {})
    assert cpu_compiler_options("gpu", 1024) is None
    monkeypatch.setenv("XLA_FLAGS", f"--{HEAP_FLAG}=1000000")
    assert HEAP_FLAG not in (cpu_compiler_options("cpu", 1024) or {})


def test_largest_value_bytes_counts_the_branch_lowered_for_the_platform():
    def big(v):
        return jnp.sum(jnp.outer(v, v))  # (300, 300) float32

    def small(v):
        return jnp.sum(v * 2.0)  # (300,)

    def f(x):
        return jax.lax.platform_dependent(x, cpu=small, default=big)

    jaxpr = jax.make_jaxpr(f)(jnp.ones((300,), jnp.float32))
    assert largest_value_bytes(jaxpr, "cpu") == 300 * 4
    assert largest_value_bytes(jaxpr, "cuda") == 300 * 300 * 4
    assert largest_value_bytes(jaxpr, "tpu") == 300 * 300 * 4


def test_the_r50_encoders_sampling_core_and_its_gradient_fit_a_heap_on_cpu():
    """The sampling core as the model calls it, at the R50 benchmark's encoder (batch 2,
    384 x 512, 8 heads, 4 levels, 4 points): the CPU program's values fit a heap, so the train
    step's temporaries are split; the branch for other platforms would not (BENCHMARKS.md, "The
    R50 step's regression found")."""
    from pallas_kernels.ms_deform_attn import ms_deform_attn

    levels = ((48, 64), (24, 32), (12, 16), (6, 8))
    pixels = sum(h * w for h, w in levels)
    value = jax.ShapeDtypeStruct((2, pixels, 8, 32), jnp.float32)
    locations = jax.ShapeDtypeStruct((2, pixels, 8, 4, 4, 2), jnp.float32)
    weights = jax.ShapeDtypeStruct((2, pixels, 8, 4, 4), jnp.float32)

    def loss(value, locations, weights):
        return jnp.sum(ms_deform_attn(value, levels, locations, weights) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(value, locations, weights)
    assert largest_value_bytes(jaxpr, "cpu") <= HEAP_BYTES
    assert largest_value_bytes(jaxpr, "cuda") > HEAP_BYTES
