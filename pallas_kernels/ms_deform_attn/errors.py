"""Typed errors and the fallback warning of `pallas_kernels.ms_deform_attn`.

Every one is raised before anything is traced, with a message that says what to do.
"""

from __future__ import annotations


class MSDAInputError(ValueError):
    """Arguments the sampling core cannot take: shapes that do not fit together, a bad
    `spatial_shapes` or an unknown implementation name."""


class UnsupportedDtypeError(MSDAInputError, TypeError):
    """An operand of a dtype no implementation computes in (they take float16, bfloat16,
    float32 and float64)."""


class KernelLimitError(MSDAInputError):
    """A shape the `pallas_gpu` kernels cannot address: an operand or the output has 2**31
    or more elements, past their int32 offsets. `implementation="xla"` takes it, or a
    smaller batch."""


class ImplementationUnavailableError(ValueError):
    """The implementation named cannot run here: a Pallas implementation off its backend
    (without `interpret=True`)."""


class PallasGpuUnavailableError(ImplementationUnavailableError, RuntimeError):
    """The `pallas_gpu` Triton kernels cannot run on this GPU and software: a GPU without
    Triton support, or a lowering, compilation or launch that failed. The message names
    the jax, jaxlib and Triton versions and the error; `implementation="xla"` runs
    everywhere."""


class PallasGpuFallbackWarning(RuntimeWarning):
    """`implementation="auto"` could not use `pallas_gpu` on this GPU and uses `"xla"`
    (issued once per process, naming the reason)."""
