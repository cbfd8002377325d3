"""Whether the `pallas_gpu` kernels can serve a call on this GPU, decided once per process.

A Triton kernel that fails to lower, compile or launch fails when the caller's whole jitted
program is compiled or run, far from `ms_deform_attn`. So before the first compiled call
of each kernel configuration (dtypes, heads, head_dim, levels, points: what changes the
generated code) `problem()` runs a probe: both kernels, forward and backward, compiled for
the GPU at a tiny shape with that configuration and the tiles the real call will use, run
on random inputs and compared with `"xla"`. Any exception (XLA's Triton pipeline, ptxas,
the driver) or a disagreement is the reason `"auto"` falls back to `"xla"` and an explicit
`implementation="pallas_gpu"` raises `PallasGpuUnavailableError`. A failure that kills the
process instead of raising (a crash inside the driver) is beyond any probe.

The probe costs one compilation of both kernels and of "xla" at the tiny shape
(seconds on a GPU) per configuration and process; its verdict is cached.
"""

from __future__ import annotations

import functools
import importlib.metadata
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ms_deform_attn import errors, pallas_gpu
from pallas_kernels.ms_deform_attn.xla import ms_deform_attn_xla

# XLA runs Triton kernels on Ampere (compute capability 8.0) and later.
MIN_COMPUTE_CAPABILITY = (8, 0)

# Probe outputs and gradients must agree with "xla" to this fraction of their largest
# magnitude: loose, since the probe looks for broken kernels, the tests for precision.
_PROBE_RTOL = {2: 5e-2, 4: 1e-3, 8: 1e-6}  # by the itemsize of value's dtype

_lock = threading.Lock()
_verdicts: dict[tuple, str | None] = {}
_warned: set[str] = set()


def versions() -> str:
    """`jax X, jaxlib Y, Triton: the one bundled in jaxlib Y (triton package Z)`."""
    try:
        triton = f"triton package {importlib.metadata.version('triton')}"
    except importlib.metadata.PackageNotFoundError:
        triton = "no triton package"
    import jaxlib

    jaxlib_version = getattr(jaxlib, "__version__", "?")
    return (
        f"jax {jax.__version__}, jaxlib {jaxlib_version}, Triton: the one XLA bundles in "
        f"jaxlib {jaxlib_version} ({triton})"
    )


def compute_capability() -> tuple[int, int] | None:
    """The default device's CUDA compute capability, None when it reports none."""
    text = getattr(jax.devices()[0], "compute_capability", None)
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def problem(value, spatial_shapes, sampling_locations, attention_weights) -> str | None:
    """Why the compiled `pallas_gpu` kernels cannot serve this call here, or None.

    Shapes are checked by `api._validate` before this is called; the backend is a GPU.
    """
    cc = compute_capability()
    if cc is not None and cc < MIN_COMPUTE_CAPABILITY:
        return (
            f"this GPU has compute capability {cc[0]}.{cc[1]}; Pallas' Triton kernels need "
            f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer"
        )
    _, len_q, nheads, nlevels, npoints, _ = sampling_locations.shape
    key = (
        jnp.dtype(value.dtype).name,
        jnp.dtype(sampling_locations.dtype).name,
        jnp.dtype(attention_weights.dtype).name,
        nheads,
        value.shape[-1],
        nlevels,
        npoints,
    )
    with _lock:
        if key not in _verdicts:
            _verdicts[key] = _probe(*key)
        return _verdicts[key]


def warn_fallback(reason: str) -> None:
    """Warns that `"auto"` falls back to `"xla"`, once per process and reason."""
    with _lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(
        f"ms_deform_attn: implementation='auto' uses 'xla' instead of 'pallas_gpu' on this "
        f"GPU: {reason} ({versions()}). Pass implementation='xla' to silence this.",
        errors.PallasGpuFallbackWarning,
        stacklevel=3,
    )


def _probe_shapes(nlevels: int) -> tuple[tuple[int, int], ...]:
    return tuple((max(1, 4 - level), max(1, 5 - level)) for level in range(nlevels))


def _fwd_bwd(fn, spatial_shapes, value, loc, attn, grad_out):
    out, vjp = jax.vjp(lambda *args: fn(args[0], spatial_shapes, *args[1:]), value, loc, attn)
    return out, vjp(grad_out.astype(out.dtype))


def _probe(value_dtype, loc_dtype, attn_dtype, nheads, head_dim, nlevels, npoints) -> str | None:
    tiles = pallas_gpu.default_block_sizes(value_dtype, head_dim)
    len_q = 2 * max(tiles.block_q, tiles.block_q_bwd) + 3  # several blocks and a tail
    shapes = _probe_shapes(nlevels)
    len_v = sum(h * w for h, w in shapes)
    rng = np.random.default_rng(0)
    head = (1, len_q, nheads, nlevels, npoints)
    # Pixel coordinates a tenth of a pixel or more from any centre (the location gradient
    # jumps at a centre), from one pixel outside each level to one pixel beyond it.
    loc = np.empty(head + (2,))
    for level, (height, width) in enumerate(shapes):
        for coord, size in ((0, width), (1, height)):
            pixel = rng.integers(-1, size + 1, head[:3] + (npoints,))
            fraction = rng.uniform(0.1, 0.9, pixel.shape)
            loc[:, :, :, level, :, coord] = (pixel + 0.5 + fraction) / size
    inputs = (
        np.asarray(rng.standard_normal((1, len_v, nheads, head_dim)), jnp.dtype(value_dtype)),
        np.asarray(loc, jnp.dtype(loc_dtype)),
        np.asarray(rng.uniform(0.0, 1.0, head), jnp.dtype(attn_dtype)),
        np.asarray(rng.standard_normal((1, len_q, nheads * head_dim)), np.float32),
    )
    kernels = functools.partial(pallas_gpu.ms_deform_attn_pallas_gpu, block_sizes=tiles)
    try:
        got = _run(functools.partial(_fwd_bwd, kernels, shapes), inputs)
    except Exception as e:  # noqa: BLE001 - any failure means: not on this machine
        return f"{type(e).__name__}: {_first_line(e)}"
    want = _run(functools.partial(_fwd_bwd, ms_deform_attn_xla, shapes), inputs)
    rtol = _PROBE_RTOL[jnp.dtype(value_dtype).itemsize]
    for name, a, b in zip(
        ("output", "grad value", "grad sampling_locations", "grad attention_weights"),
        (got[0], *got[1]),
        (want[0], *want[1]),
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.max(np.abs(b))), 1e-30)
        error = float(np.max(np.abs(a - b))) if a.size else 0.0
        if not np.isfinite(a).all() or error > rtol * scale:
            return (
                f"its {name} disagrees with 'xla' at a probe shape (max |difference| "
                f"{error:.3g}, largest |value| {scale:.3g})"
            )
    return None


def _run(fn, inputs):
    """`fn(*inputs)` compiled ahead of time and run now, as NumPy arrays. Ahead of time
    because the probe runs while the caller's function is being traced: a plain jitted
    call would be staged into the caller's program (and under `ensure_compile_time_eval`
    a jitted call is evaluated op by op, which no Pallas kernel survives)."""
    compiled = jax.jit(fn).lower(*inputs).compile()
    return jax.tree.map(np.asarray, jax.block_until_ready(compiled(*inputs)))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "(no message)"
