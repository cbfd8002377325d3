"""The jitted train step on CPU, compiled once per batch shape with options sized for it.

XLA:CPU allocates an execution's temporaries as one buffer (2.8 GiB for R50 at batch 2,
384 x 512), which glibc maps afresh for every step. Compiled with the temporaries split into
buffers that fit glibc's per-thread heaps (`compiler.HEAP_FLAG`), where every value of the
program fits one (`compiler.largest_value_bytes` of the traced step), a step reuses the memory
of the step before once `host_memory.configure_process()` has run.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from deformable_detr_jax.training.cpu.compiler import largest_value_bytes, step_compiler_options


class CpuTrainStep:
    """Called as the jitted step is, `(state, batch, base_key) -> (state, metrics)`; `lower`
    is the jitted step's, `lower_sized` gives the options a first call of a shape adds."""

    def __init__(self, jitted, mesh: Mesh):
        self._jitted = jitted
        self._mesh = mesh
        self._compiled: dict[tuple, jax.stages.Compiled] = {}

    def lower(self, *args) -> jax.stages.Lowered:
        return self._jitted.lower(*args)

    def lower_sized(self, state, batch, base_key) -> tuple[jax.stages.Lowered, dict | None]:
        """The step lowered for these arguments' shapes, and the compiler options to add."""
        traced = self._jitted.trace(state, batch, base_key)
        given = step_compiler_options(self._mesh) or {}
        sized = step_compiler_options(self._mesh, largest_value_bytes(traced.jaxpr)) or {}
        extra = {name: value for name, value in sized.items() if name not in given}
        return traced.lower(), extra or None

    def compile(self, state, batch, base_key) -> jax.stages.Compiled:
        """Traces and compiles for these arguments' shapes (what the first call does)."""
        lowered, options = self.lower_sized(state, batch, base_key)
        return lowered.compile(compiler_options=options)

    def __call__(self, state, batch, base_key):
        shapes = tuple((name, value.shape, value.dtype) for name, value in sorted(batch.items()))
        compiled = self._compiled.get(shapes)
        if compiled is None:
            compiled = self._compiled[shapes] = self.compile(state, batch, base_key)
        return compiled(state, batch, base_key)
