"""The one public entry point and its dispatch table.

`ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights,
implementation="auto", interpret=False)` validates shapes, dtypes, the implementation name
and the backend before anything is traced, then calls the implementation chosen from
`IMPLEMENTATIONS`:

  - "xla": pure jnp tuned for XLA (`xla.py`: row gathers in the model's layout; on CPU in
    chunks with a hand-written backward, chosen by the platform lowered for); runs
    everywhere.
  - "pallas_gpu": Pallas Triton kernels, forward and backward (`pallas_gpu.py`).
  - "pallas_tpu": Pallas Mosaic kernels, forward and backward (`pallas_tpu.py`).
  - "auto": `pallas_gpu` on CUDA GPUs; on TPU the best option measured there
    (`xla` until `pallas_tpu` has been measured, see BENCHMARKS.md); `xla` elsewhere.

None of them is the correctness oracle: that is `reference.ms_deform_attn_reference`, the
plain formula (four corner gathers per level, autodiff's backward), which the tests compare
every implementation with, values and gradients, beside a float64 NumPy oracle.

On a CUDA GPU, `pallas_gpu` (explicit or picked by "auto") first passes
`gpu_support.problem`: compute capability 8.0 or newer, and a one-time probe that compiles
and runs both kernels for the call's configuration. Where it fails, "auto" falls back to
"xla" with one `PallasGpuFallbackWarning` naming the reason, and an explicit
`implementation="pallas_gpu"` raises `PallasGpuUnavailableError`. A shape past the
kernels' int32 offsets is a `KernelLimitError` for "pallas_gpu" and "xla" for "auto".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.ms_deform_attn import gpu_support, pallas_gpu, pallas_tpu
from pallas_kernels.ms_deform_attn.errors import (
    ImplementationUnavailableError,
    KernelLimitError,
    MSDAInputError,
    PallasGpuUnavailableError,
    UnsupportedDtypeError,
)
from pallas_kernels.ms_deform_attn.xla import ms_deform_attn_xla

# The dtypes every implementation computes in (accumulating in float32, float64 for
# float64); the three operands may differ.
DTYPES = ("float16", "bfloat16", "float32", "float64")


def _xla(value, spatial_shapes, sampling_locations, attention_weights, *, interpret=False):
    del interpret  # no kernel to interpret
    return ms_deform_attn_xla(value, spatial_shapes, sampling_locations, attention_weights)


def _pallas_gpu(value, spatial_shapes, sampling_locations, attention_weights, *, interpret=False):
    return pallas_gpu.ms_deform_attn_pallas_gpu(
        value, spatial_shapes, sampling_locations, attention_weights, interpret=interpret
    )


def _pallas_tpu(value, spatial_shapes, sampling_locations, attention_weights, *, interpret=False):
    return pallas_tpu.ms_deform_attn_pallas_tpu(
        value, spatial_shapes, sampling_locations, attention_weights, interpret=interpret
    )


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One row of the dispatch table.

    Attributes:
      fn: `fn(value, spatial_shapes, sampling_locations, attention_weights, *, interpret)`.
      backend: the `jax.default_backend()` that can compile it, None for any; with
        `interpret=True` a Pallas implementation runs on any backend.
    """

    fn: Callable[..., jax.Array]
    backend: str | None


IMPLEMENTATIONS: dict[str, Implementation] = {
    "xla": Implementation(_xla, backend=None),
    "pallas_gpu": Implementation(_pallas_gpu, backend="gpu"),
    "pallas_tpu": Implementation(_pallas_tpu, backend="tpu"),
}

# What "auto" picks per backend; anything not listed gets "xla". On TPU "pallas_tpu"
# replaces "xla" here once, on a TPU, the compiled suite (TestPallasTpuCompiled) passes and
# benchmarks/msda.py shows its forward+backward faster than "xla" at both the encoder and
# the decoder shape, in float32 and bfloat16 (the training step's use); a shape it loses
# at keeps "xla" (then "auto" on TPU becomes a per-shape rule, documented in BENCHMARKS.md).
_AUTO = {"cuda": "pallas_gpu", "tpu": "xla"}


def _platform() -> str:
    """`jax.default_backend()`, with "gpu" narrowed to "cuda" or "rocm"."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = getattr(jax.devices()[0].client, "platform_version", "").lower()
    return "rocm" if "rocm" in version else "cuda"


def _auto() -> str:
    """The implementation the table picks for the default backend."""
    return _AUTO.get(_platform(), "xla")


def _resolve_auto(value, spatial_shapes, sampling_locations, attention_weights) -> str:
    """The implementation used when none is named: the table's pick where it can serve
    this call, else "xla" (see the module docstring)."""
    choice = _auto()
    if choice != "pallas_gpu":
        return choice
    try:
        pallas_gpu.check_fits(value, sampling_locations)
    except KernelLimitError as e:
        gpu_support.warn_fallback(str(e))
        return "xla"
    reason = gpu_support.problem(value, spatial_shapes, sampling_locations, attention_weights)
    if reason is not None:
        gpu_support.warn_fallback(reason)
        return "xla"
    return choice


def _validate(value, spatial_shapes, sampling_locations, attention_weights) -> None:
    for name, x in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise MSDAInputError(f"{name} must be an array, got {type(x).__name__}")
        if jnp.dtype(x.dtype).name not in DTYPES:
            raise UnsupportedDtypeError(
                f"{name} has dtype {jnp.dtype(x.dtype).name} (shape {x.shape}); "
                f"ms_deform_attn computes in {', '.join(DTYPES)}: cast it to float32 "
                "(or bfloat16)"
            )
    if value.ndim != 4:
        raise MSDAInputError(f"value must be (bs, len_v, nheads, head_dim), got {value.shape=}")
    if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
        raise MSDAInputError(
            "sampling_locations must be (bs, len_q, nheads, nlevels, npoints, 2), got "
            f"{sampling_locations.shape=}"
        )
    if attention_weights.ndim != 5:
        raise MSDAInputError(
            "attention_weights must be (bs, len_q, nheads, nlevels, npoints), got "
            f"{attention_weights.shape=}"
        )
    try:
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    except (TypeError, ValueError) as e:
        raise MSDAInputError(
            f"spatial_shapes must be a static sequence of (h, w) ints, got {spatial_shapes!r}"
        ) from e
    if not shapes or any(h <= 0 or w <= 0 for h, w in shapes):
        raise MSDAInputError(f"spatial_shapes must be non-empty and positive, got {shapes}")
    bs, len_v, nheads, head_dim = value.shape
    if min(bs, nheads, head_dim) <= 0:
        raise MSDAInputError(f"value must have non-empty bs, nheads, head_dim, got {value.shape=}")
    total = sum(h * w for h, w in shapes)
    if total != len_v:
        raise MSDAInputError(
            f"len_v={len_v} from {value.shape=} must equal sum(h * w)={total} over "
            f"spatial_shapes={shapes}"
        )
    lb, len_q, lh, nlevels, npoints, _ = sampling_locations.shape
    if (lb, lh, nlevels) != (bs, nheads, len(shapes)):
        raise MSDAInputError(
            f"sampling_locations {sampling_locations.shape=} does not fit {value.shape=} and "
            f"{len(shapes)} levels: expected (bs={bs}, len_q, nheads={nheads}, "
            f"nlevels={len(shapes)}, npoints, 2)"
        )
    if len_q <= 0 or npoints <= 0:
        raise MSDAInputError(f"len_q and npoints must be positive, got {sampling_locations.shape=}")
    if attention_weights.shape != (bs, len_q, nheads, nlevels, npoints):
        raise MSDAInputError(
            f"{attention_weights.shape=} must equal {(bs, len_q, nheads, nlevels, npoints)} "
            f"to match {sampling_locations.shape=}"
        )


def _check_runnable(
    implementation: str,
    interpret: bool,
    value,
    spatial_shapes,
    sampling_locations,
    attention_weights,
) -> None:
    """Raises unless the named implementation can serve this call here."""
    if implementation == "pallas_gpu":
        pallas_gpu.check_fits(value, sampling_locations)  # int32 offsets, interpreted too
    backend = IMPLEMENTATIONS[implementation].backend
    if interpret or backend is None:
        return
    platform = _platform()
    if backend != ("gpu" if platform in ("cuda", "rocm") else platform):
        raise ImplementationUnavailableError(
            f"implementation={implementation!r} compiles for the {backend!r} backend but "
            f"this is {platform!r}; pass interpret=True to run it "
            "in Pallas' interpreter, or use implementation='xla' (or 'auto')"
        )
    if implementation == "pallas_gpu":
        reason = gpu_support.problem(value, spatial_shapes, sampling_locations, attention_weights)
        if reason is not None:
            raise PallasGpuUnavailableError(
                f"implementation='pallas_gpu' cannot run here: {reason} "
                f"({gpu_support.versions()}); use implementation='xla'"
            )


def ms_deform_attn(
    value: jax.Array,
    spatial_shapes,
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
    *,
    implementation: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Multi-scale deformable attention sampling core.

    Bilinear sampling as `grid_sample(align_corners=False, padding_mode="zeros")`, weighted
    by `attention_weights` and summed over levels and points (Zhu et al., eq. 3).

    Args:
      value: `(bs, len_v, nheads, head_dim)`.
      spatial_shapes: static `((h, w), ...)` per level, `sum(h * w) == len_v`.
      sampling_locations: `(bs, len_q, nheads, nlevels, npoints, 2)`, (x, y) in [0, 1].
      attention_weights: `(bs, len_q, nheads, nlevels, npoints)`.
      implementation: one of `IMPLEMENTATIONS` or `"auto"` (best for the backend).
      interpret: run Pallas kernels in interpret mode (CPU tests).

    Returns:
      `(bs, len_q, nheads * head_dim)` in `value.dtype` (accumulated in float32, or
      float64 for float64 inputs).

    Raises (all before anything is traced; see `errors.py`):
      MSDAInputError: shapes that do not fit together or an unknown implementation;
        `UnsupportedDtypeError` for a dtype outside `DTYPES`; `KernelLimitError` for a
        shape past pallas_gpu's int32 offsets (with implementation="pallas_gpu").
      ImplementationUnavailableError: a Pallas implementation on a backend that cannot
        compile it (without interpret); `PallasGpuUnavailableError` when pallas_gpu
        cannot lower, compile or run on this GPU (the message names the versions).
    """
    if implementation != "auto" and implementation not in IMPLEMENTATIONS:
        raise MSDAInputError(
            f"unknown implementation={implementation!r}; choose one of "
            f"{sorted(IMPLEMENTATIONS) + ['auto']}"
        )
    _validate(value, spatial_shapes, sampling_locations, attention_weights)
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    if implementation == "auto":
        implementation = _resolve_auto(value, shapes, sampling_locations, attention_weights)
    else:
        _check_runnable(
            implementation, interpret, value, shapes, sampling_locations, attention_weights
        )
    return IMPLEMENTATIONS[implementation].fn(
        value, shapes, sampling_locations, attention_weights, interpret=interpret
    )
