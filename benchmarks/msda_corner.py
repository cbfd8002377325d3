"""The "xla" sampling core with its corner computed once (`xla._shared_corner`, issue 24)
against the corner of the commit before (`corner.pixel_corner`, recomputed in every fusion),
side by side in one process.

Encoder shape of an 800x1333 image (levels 100x167, 50x84, 25x42, 13x21; len_q = len_v =
22223; 8 heads, head_dim 32, 4 points), float32, the locations built inside the jitted
function as the encoder builds them (reference point x valid ratio + offset / normaliser, a
padded image's valid ratios, random offsets), as in the model: forward, and forward + backward
(`jax.grad` w.r.t. value, offsets and weights). Each repeat times both formulations one after
the other, alternating which goes first, so that load on a shared machine falls on both;
medians are printed with their ratio.

    python benchmarks/msda_corner.py --repeats 7 --batch 1
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from deformable_detr_jax.modeling.transformer import encoder_reference_points
from pallas_kernels.ms_deform_attn import corner, xla
from pallas_kernels.ms_deform_attn.resources import ENCODER_LEVELS

NHEADS, HEAD_DIM, NPOINTS = 8, 32, 4
FORMULATIONS = {
    "before (pixel_corner)": corner.pixel_corner,
    "after (_shared_corner)": xla._shared_corner,
}


def _inputs(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    len_v = sum(h * w for h, w in ENCODER_LEVELS)
    nlevels = len(ENCODER_LEVELS)
    value = jnp.asarray(rng.standard_normal((batch, len_v, NHEADS, HEAD_DIM)), jnp.float32)
    offsets = jnp.asarray(
        rng.normal(0, 2, (batch, len_v, NHEADS, nlevels, NPOINTS, 2)), jnp.float32
    )
    attn = jnp.asarray(rng.uniform(0, 1, (batch, len_v, NHEADS, nlevels, NPOINTS)), jnp.float32)
    ratios = jnp.asarray(
        rng.uniform(0.7, 1.0, (batch, 1, 2)) * np.ones((1, nlevels, 1)), jnp.float32
    )
    return value, offsets, attn, ratios


def _core(value, offsets, attn, ratios):
    ref = encoder_reference_points(ENCODER_LEVELS, ratios)
    normaliser = jnp.asarray([[w, h] for h, w in ENCODER_LEVELS], jnp.float32)
    loc = ref[:, :, None, :, None, :] + offsets / normaliser[:, None, :]
    return xla.ms_deform_attn_xla(value, ENCODER_LEVELS, loc, attn)


def _programs(corner_fn):
    """Forward and forward+backward compiled with `corner_fn` as the core's corner function."""
    saved = xla._shared_corner
    xla._shared_corner = corner_fn
    try:
        forward = jax.jit(_core)
        loss = lambda *args: jnp.sum(_core(*args) ** 2)  # noqa: E731
        backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        args = _inputs(_programs.batch)
        forward = forward.lower(*args).compile()
        backward = backward.lower(*args).compile()
    finally:
        xla._shared_corner = saved
    return forward, backward


def _time_ms(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1)
    options = parser.parse_args()
    _programs.batch = options.batch
    args = _inputs(options.batch)
    programs = {name: _programs(fn) for name, fn in FORMULATIONS.items()}
    outputs = {name: np.asarray(fwd(*args)) for name, (fwd, _) in programs.items()}
    a, b = outputs.values()
    print(f"forward outputs differ by at most {np.abs(a - b).max():.3g} (random offsets)")
    times = {(name, part): [] for name in programs for part in ("fwd", "fwd+bwd")}
    for fwd, bwd in programs.values():  # warm-up
        _time_ms(fwd, args), _time_ms(bwd, args)
    names = list(programs)
    for repeat in range(options.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            fwd, bwd = programs[name]
            times[name, "fwd"].append(_time_ms(fwd, args))
            times[name, "fwd+bwd"].append(_time_ms(bwd, args))
    print(
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}, batch {options.batch}, "
        f"{options.repeats} repeats (median ms)"
    )
    print("| formulation | fwd ms | fwd+bwd ms |")
    print("|---|---:|---:|")
    for name in names:
        fwd = statistics.median(times[name, "fwd"])
        bwd = statistics.median(times[name, "fwd+bwd"])
        print(f"| {name} | {fwd:.1f} | {bwd:.1f} |")
    first, second = names
    for part in ("fwd", "fwd+bwd"):
        ratio = statistics.median(times[second, part]) / statistics.median(times[first, part])
        print(f"{part}: after / before = {ratio:.3f}")


if __name__ == "__main__":
    main()
