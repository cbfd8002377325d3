"""A CPU step reusing the host memory of the step before (`deformable_detr_jax.training.cpu.host_memory` and
the temporaries split by `cpu_compiler`).

A program whose temporaries are one buffer larger than glibc's 64 MiB thread heaps gets fresh
pages from the kernel on every call (minor page faults); split into buffers that fit a heap and
run inside `retained_host_memory()`, a call reuses the pages of the call before. Measured here
with the process's minor page faults (`getrusage`), on Linux with glibc only.
"""

from __future__ import annotations

import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax.training.cpu import host_memory
from deformable_detr_jax.training.cpu.compiler import (
    HEAP_BYTES,
    HEAP_FLAG,
    cpu_compiler_options,
    largest_value_bytes,
)

needs_glibc = pytest.mark.skipif(not host_memory.applies(), reason="needs Linux with glibc")


def _many_live_values(x):
    """Eight (1024, 4096) float32 values (16 MiB each) alive at once: 128 MiB of temporaries."""
    # the barrier keeps XLA from fusing them into their consumers: all eight are buffers
    parts = jax.lax.optimization_barrier([jnp.sin(x * (i + 1)) for i in range(8)])
    return sum(jnp.sum(p * q) for p, q in zip(parts, parts[::-1]))


def _faults_per_call(compiled, x, calls: int = 8) -> float:
    """Mean minor page faults of a call, after three calls of warming up."""
    for _ in range(3):  # each of XLA's threads that allocates warms up its own heaps
        jax.block_until_ready(compiled(x))
    faults = []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        jax.block_until_ready(compiled(x))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return float(np.mean(faults))


@needs_glibc
def test_a_split_program_reuses_its_memory_inside_retained_host_memory(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    x = jax.random.normal(jax.random.key(0), (1024, 4096), jnp.float32)
    traced = jax.jit(_many_live_values).trace(x)
    largest = largest_value_bytes(traced.jaxpr)
    assert largest == 1024 * 4096 * 4  # every value is one (1024, 4096) float32 array
    options = cpu_compiler_options("cpu", largest)
    assert options[HEAP_FLAG] == HEAP_BYTES
    split = traced.lower().compile(compiler_options={HEAP_FLAG: HEAP_BYTES})
    whole = jax.jit(_many_live_values).lower(x).compile()
    np.testing.assert_allclose(float(split(x)), float(whole(x)), rtol=1e-6)
    with host_memory.retained_host_memory() as retained:
        assert retained
        split_faults = _faults_per_call(split, x)
        whole_faults = _faults_per_call(whole, x)
    # 128 MiB of fresh 4 KiB pages is 32768 faults per call. Split, most calls reuse all of it
    # (2-5 faults), and now and then one lands in a heap that glibc had not used yet (8192 or
    # 12288 faults): seen 0.1% to 31% of the whole program's faults in the mean
    assert whole_faults > 16384, whole_faults
    assert split_faults < 0.5 * whole_faults, (split_faults, whole_faults)


@needs_glibc
def test_freed_memory_is_kept_inside_and_given_back_after():
    def resident_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    size = 256 * 2**20
    with host_memory.retained_host_memory():
        block = np.ones(size, np.uint8)  # from glibc's heap: no mmap inside
        held = resident_bytes()
        del block
        kept = resident_bytes()
    after = resident_bytes()
    assert held - kept < size // 4, (held, kept)  # freed, still resident
    assert kept - after > size // 2, (kept, after)  # restored defaults and trimmed on exit


@needs_glibc
def test_nested_uses_share_one_setting(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "_set", lambda *values: calls.append(values))
    monkeypatch.setattr(host_memory, "_glibc", lambda: type("C", (), {"malloc_trim": print})())
    with host_memory.retained_host_memory():
        with host_memory.retained_host_memory():
            pass
        assert calls == [(0, 2**31 - 1)]
    assert calls == [
        (0, 2**31 - 1),
        (host_memory.DEFAULT_MMAP_MAX, host_memory.DEFAULT_TRIM_THRESHOLD),
    ]


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
    with host_memory.retained_host_memory() as retained:
        assert not retained
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
