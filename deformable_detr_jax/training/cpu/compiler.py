"""Per-program XLA:CPU options for the training step.

Temporaries (the training step, Linux with glibc, any jaxlib): XLA:CPU allocates an execution's
temporaries as one buffer (2.8 GiB for R50 at batch 2, 384 x 512), which glibc maps afresh for
every step. Split into buffers of at most `HEAP_BYTES` (`xla_multiheap_size_constraint_per_heap`),
each fits one of glibc's per-thread heaps, and once `host_memory.configure_process()` has run
every step reuses the memory of the one before. The split is given only when no single value of
the program is larger than that (`largest_value_bytes` of its jaxpr); XLA would warn about each
one that is.

    jitted.trace(...).lower().compile(compiler_options=step_compiler_options(mesh, largest))

The options apply to that one program, not to the process; elsewhere (GPU, TPU, a system
without glibc) the result is None, the default compile. A user who sets the flag in `XLA_FLAGS`
keeps their own setting. (XLA's own convolutions instead of YNNPACK's, once given here on jaxlib
0.10, measured no faster on the R50 step: BENCHMARKS.md, "CPU speed-ups, each on and off".)
"""

from __future__ import annotations

import os

import numpy as np
from jax.sharding import Mesh

from deformable_detr_jax.training.cpu import host_memory

# glibc's per-thread heaps hold at most 64 MiB; a buffer up to this size fits one.
HEAP_FLAG = "xla_multiheap_size_constraint_per_heap"
HEAP_BYTES = 56 * 2**20


def cpu_compiler_options(
    platform: str, largest_value_bytes: int | None = None
) -> dict[str, str | int] | None:
    """The options for a program on `platform` ("cpu", "gpu", "tpu"), or None for none.

    Args:
      largest_value_bytes: the program's largest value (`largest_value_bytes`); None for a
        program whose temporaries are not split.
    """
    if (
        platform != "cpu"
        or largest_value_bytes is None
        or largest_value_bytes > HEAP_BYTES
        or HEAP_FLAG in os.environ.get("XLA_FLAGS", "")
        or not host_memory.applies()
    ):
        return None
    return {HEAP_FLAG: HEAP_BYTES}


def step_compiler_options(
    mesh: Mesh, largest_value_bytes: int | None = None
) -> dict[str, str | int] | None:
    """`cpu_compiler_options` for the platform of `mesh`'s devices."""
    return cpu_compiler_options(mesh.devices.flat[0].platform, largest_value_bytes)


def largest_value_bytes(jaxpr) -> int:
    """Bytes of the largest value that a (closed) jaxpr or any jaxpr inside it computes."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", None)
            itemsize = getattr(getattr(var.aval, "dtype", None), "itemsize", None)
            if shape is not None and itemsize is not None:
                largest = max(largest, int(np.prod(shape)) * itemsize)
        for param in eqn.params.values():
            for inner in param if isinstance(param, (list, tuple)) else (param,):
                if hasattr(inner, "eqns") or hasattr(getattr(inner, "jaxpr", None), "eqns"):
                    largest = max(largest, largest_value_bytes(inner))
    return largest
