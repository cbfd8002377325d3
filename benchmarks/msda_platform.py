"""The "xla" sampling core with its CPU variant chosen by `jax.lax.platform_dependent` (both
variants traced, the one for the platform lowered for compiled) against the CPU variant
called directly (what choosing by `jax.default_backend()` at trace time compiled), side by
side in one process.

Encoder shape of an 800x1333 image (levels 100x167, 50x84, 25x42, 13x21; len_q = len_v =
22223; 8 heads, head_dim 32, 4 points), float32, random locations in [-0.1, 1.1]: forward,
and forward + backward (`jax.grad` w.r.t. value, locations and weights). It prints the time
to trace, lower and compile each program, then runs each repeat of both one after the other,
alternating which goes first, so that load on a shared machine falls on both; medians are
printed with their ratio.

    python benchmarks/msda_platform.py --repeats 7 --batch 1
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

from pallas_kernels.ms_deform_attn import xla
from pallas_kernels.ms_deform_attn.resources import ENCODER_LEVELS

NHEADS, HEAD_DIM, NPOINTS = 8, 32, 4


def _cpu_variant(value, spatial_shapes, loc, attn):
    """The CPU variant alone, as `ms_deform_attn_xla` compiled it on CPU before."""
    bs, _, nheads, head_dim = value.shape
    out = xla._sample(value, spatial_shapes, loc, attn, True)
    return out.reshape(bs, loc.shape[1], nheads * head_dim).astype(value.dtype)


FORMULATIONS = {
    "CPU variant alone": _cpu_variant,
    "platform_dependent": xla.ms_deform_attn_xla,
}


def _inputs(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    len_v = sum(h * w for h, w in ENCODER_LEVELS)
    shape = (batch, len_v, NHEADS, len(ENCODER_LEVELS), NPOINTS)
    value = jnp.asarray(rng.standard_normal((batch, len_v, NHEADS, HEAD_DIM)), jnp.float32)
    loc = jnp.asarray(rng.uniform(-0.1, 1.1, shape + (2,)), jnp.float32)
    attn = jnp.asarray(rng.uniform(0, 1, shape), jnp.float32)
    return value, loc, attn


def _programs(core, args):
    """Forward and forward+backward of `core`, compiled, and the seconds each took."""

    def forward(value, loc, attn):
        return core(value, ENCODER_LEVELS, loc, attn)

    def loss(value, loc, attn):
        return jnp.sum(forward(value, loc, attn) ** 2)

    programs, seconds = [], []
    for fn in (forward, jax.grad(loss, argnums=(0, 1, 2))):
        start = time.perf_counter()
        programs.append(jax.jit(fn).lower(*args).compile())
        seconds.append(time.perf_counter() - start)
    return programs, seconds


def _time_ms(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1)
    options = parser.parse_args()
    args = _inputs(options.batch)
    programs, compile_s = {}, {}
    for name, core in FORMULATIONS.items():
        programs[name], compile_s[name] = _programs(core, args)
    outputs = [np.asarray(fwd(*args)) for fwd, _ in programs.values()]
    print(f"forward outputs differ by at most {np.abs(outputs[0] - outputs[1]).max():.3g}")
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
        f"{options.repeats} repeats (median ms; compile s: trace + lower + compile)"
    )
    print("| formulation | fwd ms | fwd+bwd ms | fwd compile s | fwd+bwd compile s |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        fwd = statistics.median(times[name, "fwd"])
        bwd = statistics.median(times[name, "fwd+bwd"])
        c_fwd, c_bwd = compile_s[name]
        print(f"| {name} | {fwd:.1f} | {bwd:.1f} | {c_fwd:.2f} | {c_bwd:.2f} |")
    first, second = names
    for part in ("fwd", "fwd+bwd"):
        ratio = statistics.median(times[second, part]) / statistics.median(times[first, part])
        print(f"{part}: platform_dependent / CPU variant alone = {ratio:.3f}")


if __name__ == "__main__":
    main()
