"""Per-program XLA:CPU options for the training and evaluation steps.

On jaxlib 0.10, XLA:CPU hands f32 convolutions to YNNPACK. Its convolutions are the slow part
of the backbone's backward on CPU: a layer2-sized 3x3 filter gradient takes 1.8-2.8x the time
of XLA's own Eigen convolution (BENCHMARKS.md, "Host memory of a CPU step"). So the steps are
compiled with `compiler_options` that keep YNNPACK's other fusion types (its dots and
reductions, the default list of jaxlib 0.10.2 less the convolutions):

    jax.jit(step, compiler_options=step_compiler_options(mesh))

The options apply to that one program, not to the process. They are given only where this was
measured: the CPU backend of jaxlib 0.10.x. Elsewhere (GPU, TPU, another jaxlib) the result is
None, the default compile. A user who sets `xla_cpu_experimental_ynn_fusion_type` in `XLA_FLAGS`
keeps their own setting: the options are then None too.
"""

from __future__ import annotations

import importlib.metadata
import os

from jax.sharding import Mesh

from deformable_detr_jax._versions import _release

# jaxlib 0.10.2's default YNNPACK fusion types are INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION and
# REDUCE (read from the compiled HLO of a dot, a convolution and reductions); this is that
# list without the convolutions.
YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
MEASURED_JAXLIB = (0, 10)


def cpu_compiler_options(platform: str) -> dict[str, str] | None:
    """The options for a program on `platform` ("cpu", "gpu", "tpu"), or None for none."""
    if platform != "cpu" or _release(importlib.metadata.version("jaxlib"))[:2] != MEASURED_JAXLIB:
        return None
    if YNN_FUSION_FLAG in os.environ.get("XLA_FLAGS", ""):
        return None
    return {YNN_FUSION_FLAG: YNN_WITHOUT_CONVOLUTIONS}


def step_compiler_options(mesh: Mesh) -> dict[str, str] | None:
    """`cpu_compiler_options` for the platform of `mesh`'s devices."""
    return cpu_compiler_options(mesh.devices.flat[0].platform)
