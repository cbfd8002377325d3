"""Per-program XLA:CPU options for the training and evaluation steps.

Three options, each given only where it was measured:

- Convolutions (jaxlib 0.10.x): XLA:CPU hands f32 convolutions to YNNPACK, and its convolutions
  are the slow part of the backbone's backward on CPU: a layer2-sized 3x3 filter gradient takes
  1.8-2.8x the time of XLA's own Eigen convolution (BENCHMARKS.md, "Host memory of a CPU
  step"). So the steps keep YNNPACK's other fusion types (its dots and reductions, the default
  list of jaxlib 0.10.2 less the convolutions).
- Temporaries (the training step, Linux with glibc, any jaxlib): XLA:CPU allocates an
  execution's temporaries as one buffer (2.8 GiB for R50 at batch 2, 384 x 512), which glibc
  maps afresh for every step. Split into buffers of at most `HEAP_BYTES`
  (`xla_multiheap_size_constraint_per_heap`), each fits one of glibc's per-thread heaps, and
  once `host_memory.configure_process()` has run every step reuses the memory of the one before.
  The split is given only when no single value of the program is larger than that
  (`largest_value_bytes` of its jaxpr); XLA would warn about each one that is.
- Rematerialisation (a model with `backbone_remat`, jaxlib 0.10.x): `jax.checkpoint` keeps a
  recomputed stage apart from its forward with optimization barriers, which jaxlib 0.10's
  XLA:CPU removes early in its pipeline (`cse_barrier_expander`); the recomputation is then
  scheduled with the forward and nothing is saved (a 4-block tanh MLP's gradient: 289 MiB of
  temporaries rematerialised against 265 MiB without, 97 MiB with the pass off, the same
  gradients; BENCHMARKS.md, "Backbone memory per rematerialisation setting"). So there a
  rematerialised model's steps compile without that pass. jaxlib 0.12.1 keeps the saving
  without the option (97 MiB), and gets none.

    jax.jit(step, compiler_options=step_compiler_options(mesh))

The options apply to that one program, not to the process; elsewhere (GPU, TPU, a jaxlib or
system not measured) the result is None, the default compile. A user who sets one of these
flags in `XLA_FLAGS` keeps their own setting.
"""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np
from jax.sharding import Mesh

from deformable_detr_jax._versions import release_numbers
from deformable_detr_jax.training.cpu import host_memory

# jaxlib 0.10.2's default YNNPACK fusion types are INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION and
# REDUCE (read from the compiled HLO of a dot, a convolution and reductions); this is that
# list without the convolutions.
YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
MEASURED_JAXLIB = (0, 10)


# glibc's per-thread heaps hold at most 64 MiB; a buffer up to this size fits one.
HEAP_FLAG = "xla_multiheap_size_constraint_per_heap"
HEAP_BYTES = 56 * 2**20

# XLA:CPU's pass that removes optimization barriers (`OptimizationBarrierExpander`'s name).
PASSES_FLAG = "xla_disable_hlo_passes"
BARRIER_PASS = "cse_barrier_expander"


def cpu_compiler_options(
    platform: str, largest_value_bytes: int | None = None, *, rematerialised: bool = False
) -> dict[str, str | int] | None:
    """The options for a program on `platform` ("cpu", "gpu", "tpu"), or None for none.

    Args:
      largest_value_bytes: the program's largest value (`largest_value_bytes`); None for a
        program whose temporaries are not split.
      rematerialised: the program has `jax.checkpoint`s whose barriers must stay.
    """
    if platform != "cpu":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    options: dict[str, str | int] = {}
    jaxlib = release_numbers(importlib.metadata.version("jaxlib"))[:2]
    if jaxlib == MEASURED_JAXLIB and YNN_FUSION_FLAG not in flags:
        options[YNN_FUSION_FLAG] = YNN_WITHOUT_CONVOLUTIONS
    if (
        largest_value_bytes is not None
        and largest_value_bytes <= HEAP_BYTES
        and HEAP_FLAG not in flags
        and host_memory.applies()
    ):
        options[HEAP_FLAG] = HEAP_BYTES
    if rematerialised and jaxlib == MEASURED_JAXLIB and PASSES_FLAG not in flags:
        options[PASSES_FLAG] = BARRIER_PASS
    return options or None


def step_compiler_options(
    mesh: Mesh, largest_value_bytes: int | None = None, *, rematerialised: bool = False
) -> dict[str, str | int] | None:
    """`cpu_compiler_options` for the platform of `mesh`'s devices."""
    return cpu_compiler_options(
        mesh.devices.flat[0].platform, largest_value_bytes, rematerialised=rematerialised
    )


def largest_value_bytes(jaxpr, platform: str = "cpu") -> int:
    """Bytes of the largest value that a (closed) jaxpr or any jaxpr inside it computes, in the
    program lowered for `platform` (a lowering platform: "cpu", "cuda", "rocm", "tpu").

    Of a `jax.lax.platform_dependent` choice (a `cond` with `branches_platforms`) only the
    branch lowered for `platform` counts: the sampling core's branch for other platforms
    gathers every row at once (hundreds of MiB at R50 sizes), which the CPU program never
    computes, and counting it withheld the split from every CPU train step (BENCHMARKS.md,
    "The R50 step's regression found").
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", None)
            itemsize = getattr(getattr(var.aval, "dtype", None), "itemsize", None)
            if shape is not None and itemsize is not None:
                largest = max(largest, int(np.prod(shape)) * itemsize)
        for inner in _inner_jaxprs(eqn, platform):
            largest = max(largest, largest_value_bytes(inner, platform))
    return largest


def _inner_jaxprs(eqn, platform: str) -> list:
    """The jaxprs inside `eqn` that the program lowered for `platform` runs."""
    inner = [
        value
        for param in eqn.params.values()
        for value in (param if isinstance(param, (list, tuple)) else (param,))
        if hasattr(value, "eqns") or hasattr(getattr(value, "jaxpr", None), "eqns")
    ]
    platforms = eqn.params.get("branches_platforms")
    if eqn.primitive.name != "cond" or platforms is None:
        return inner
    chosen = [i for i, names in enumerate(platforms) if names is not None and platform in names]
    default = [i for i, names in enumerate(platforms) if names is None]
    index = (chosen or default or [None])[0]
    return inner if index is None else [eqn.params["branches"][index]]
