"""The one public entry point and its dispatch table.

`ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights,
implementation="auto", interpret=False)` validates shapes, dtypes, the implementation name
and the backend before anything is traced, then calls the implementation chosen from
`IMPLEMENTATIONS`:

  - "xla": the pure-jnp reference (`reference.py`); runs everywhere.
  - "pallas_gpu": Pallas Triton kernels, forward and backward (`pallas_gpu.py`).
  - "pallas_tpu": Pallas Mosaic forward, reference VJP backward (`pallas_tpu.py`).
  - "auto": `pallas_gpu` on CUDA GPUs; on TPU the best option measured there
    (`xla` until `pallas_tpu` has been measured, see BENCHMARKS.md); `xla` elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.ms_deform_attn import pallas_gpu, pallas_tpu
from pallas_kernels.ms_deform_attn.reference import ms_deform_attn_reference


def _xla(value, spatial_shapes, sampling_locations, attention_weights, *, interpret=False):
    del interpret  # the reference has nothing to interpret
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)


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
# replaces "xla" here once a TPU run in benchmarks/msda.py shows it faster.
_AUTO = {"cuda": "pallas_gpu", "tpu": "xla"}


def _platform() -> str:
    """`jax.default_backend()`, with "gpu" narrowed to "cuda" or "rocm"."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = getattr(jax.devices()[0].client, "platform_version", "").lower()
    return "rocm" if "rocm" in version else "cuda"


def _auto() -> str:
    """The implementation used when none is named: the best one for the default backend."""
    return _AUTO.get(_platform(), "xla")


def _validate(value, spatial_shapes, sampling_locations, attention_weights) -> None:
    for name, x in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{name} must be a floating-point array, got "
                f"{getattr(x, 'dtype', type(x).__name__)} with shape {getattr(x, 'shape', None)}"
            )
    if value.ndim != 4:
        raise ValueError(f"value must be (bs, len_v, nheads, head_dim), got {value.shape=}")
    if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be (bs, len_q, nheads, nlevels, npoints, 2), got "
            f"{sampling_locations.shape=}"
        )
    if attention_weights.ndim != 5:
        raise ValueError(
            "attention_weights must be (bs, len_q, nheads, nlevels, npoints), got "
            f"{attention_weights.shape=}"
        )
    try:
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"spatial_shapes must be a static sequence of (h, w) ints, got {spatial_shapes!r}"
        ) from e
    if not shapes or any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must be non-empty and positive, got {shapes}")
    bs, len_v, nheads, head_dim = value.shape
    if min(bs, nheads, head_dim) <= 0:
        raise ValueError(f"value must have non-empty bs, nheads, head_dim, got {value.shape=}")
    total = sum(h * w for h, w in shapes)
    if total != len_v:
        raise ValueError(
            f"len_v={len_v} from {value.shape=} must equal sum(h * w)={total} over "
            f"spatial_shapes={shapes}"
        )
    lb, len_q, lh, nlevels, npoints, _ = sampling_locations.shape
    if (lb, lh, nlevels) != (bs, nheads, len(shapes)):
        raise ValueError(
            f"sampling_locations {sampling_locations.shape=} does not fit {value.shape=} and "
            f"{len(shapes)} levels: expected (bs={bs}, len_q, nheads={nheads}, "
            f"nlevels={len(shapes)}, npoints, 2)"
        )
    if len_q <= 0 or npoints <= 0:
        raise ValueError(f"len_q and npoints must be positive, got {sampling_locations.shape=}")
    if attention_weights.shape != (bs, len_q, nheads, nlevels, npoints):
        raise ValueError(
            f"{attention_weights.shape=} must equal {(bs, len_q, nheads, nlevels, npoints)} "
            f"to match {sampling_locations.shape=}"
        )


def _check_backend(implementation: str, interpret: bool) -> None:
    backend = IMPLEMENTATIONS[implementation].backend
    if interpret or backend is None:
        return
    if jax.default_backend() != backend:
        raise ValueError(
            f"implementation={implementation!r} compiles for the {backend!r} backend but "
            f"jax.default_backend()={jax.default_backend()!r}; pass interpret=True to run it "
            "in Pallas' interpreter, or use implementation='xla' (or 'auto')"
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

    Raises:
      ValueError: shapes that do not fit together, an unknown implementation, or a
        Pallas implementation on a backend that cannot compile it (without interpret).
    """
    if implementation == "auto":
        implementation = _auto()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation={implementation!r}; choose one of "
            f"{sorted(IMPLEMENTATIONS) + ['auto']}"
        )
    _validate(value, spatial_shapes, sampling_locations, attention_weights)
    _check_backend(implementation, interpret)
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    return IMPLEMENTATIONS[implementation].fn(
        value, shapes, sampling_locations, attention_weights, interpret=interpret
    )
