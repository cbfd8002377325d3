"""The one public entry point and its dispatch table.

`ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights,
implementation="auto")` validates shapes before anything is traced, then calls the
implementation chosen from `IMPLEMENTATIONS`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from pallas_kernels.ms_deform_attn.reference import ms_deform_attn_reference


def _xla(value, spatial_shapes, sampling_locations, attention_weights, *, interpret=False):
    del interpret  # the reference has nothing to interpret
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)


# name -> callable(value, spatial_shapes, sampling_locations, attention_weights, *, interpret)
IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {"xla": _xla}


def _auto() -> str:
    """The implementation used when none is named: the best one for the default backend."""
    backend = jax.default_backend()
    if backend == "gpu" and "pallas_gpu" in IMPLEMENTATIONS:
        return "pallas_gpu"
    return "xla"


def _validate(value, spatial_shapes, sampling_locations, attention_weights) -> None:
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
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must be positive, got {shapes}")
    bs, len_v, nheads, _ = value.shape
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
    if attention_weights.shape != (bs, len_q, nheads, nlevels, npoints):
        raise ValueError(
            f"{attention_weights.shape=} must equal {(bs, len_q, nheads, nlevels, npoints)} "
            f"to match {sampling_locations.shape=}"
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

    Args:
      value: `(bs, len_v, nheads, head_dim)`.
      spatial_shapes: static `((h, w), ...)` per level, `sum(h * w) == len_v`.
      sampling_locations: `(bs, len_q, nheads, nlevels, npoints, 2)`, (x, y) in [0, 1].
      attention_weights: `(bs, len_q, nheads, nlevels, npoints)`.
      implementation: one of `IMPLEMENTATIONS` or `"auto"` (best for the backend).
      interpret: run Pallas kernels in interpret mode (CPU tests).

    Returns:
      `(bs, len_q, nheads * head_dim)` in `value.dtype`.
    """
    if implementation == "auto":
        implementation = _auto()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation={implementation!r}; choose one of "
            f"{sorted(IMPLEMENTATIONS) + ['auto']}"
        )
    _validate(value, spatial_shapes, sampling_locations, attention_weights)
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    return IMPLEMENTATIONS[implementation](
        value, shapes, sampling_locations, attention_weights, interpret=interpret
    )
