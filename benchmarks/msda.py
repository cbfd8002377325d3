"""Times the multi-scale deformable attention core (`pallas_kernels.ms_deform_attn`).

For every implementation that can run on this machine's default backend (the Pallas ones
are skipped off their backend, with the reason printed: interpret mode is a correctness
tool, not something to time) it measures forward and forward+backward at

  - encoder: an 800x1333 image, levels 100x167, 50x84, 25x42, 13x21, len_q = len_v = 22223,
    8 heads, head_dim 32, 4 points, batch 1, 2 and 8;
  - decoder: the same value, 300 queries, batch 8;

in float32 and bfloat16, and prints the median time, the effective bandwidth (compulsory
bytes / time) and the ratio of the time to the compulsory-bytes floor:

  forward compulsory bytes = value + sampling_locations + attention_weights read once,
                             output written once;
  forward+backward         = the forward's bytes, plus grad_output and the three inputs
                             read again and the three gradients written once;
  floor                    = compulsory bytes / the device's copy bandwidth, measured here
                             with a jitted `x * 2` over a large buffer (bytes read + written).

When PyTorch and transformers are installed it also times transformers'
`MultiScaleDeformableAttention` (the `grid_sample` path) on the same inputs, on the GPU when
torch sees one, and checks that its forward output agrees with "xla".

On a CUDA GPU it finally checks the goals of issue 3 at the encoder shape, batch 2, float32:
pallas_gpu forward within 4x of the floor, forward+backward at least 3x faster than "xla",
and bfloat16 forward faster than float32.

`--sweep` times pallas_gpu at other tiles (encoder batch 2, decoder batch 8, both dtypes)
beside the default ones, so that a row of `pallas_gpu.default_block_sizes` is set by a
measurement; `--profile` runs pallas_gpu forward+backward at the encoder shape, batch 2,
float32, once after a warm-up, for `ncu` (benchmarks/gpu_check.sh).

    python benchmarks/msda.py                          # everything, 20 repeats
    python benchmarks/msda.py --repeats 3 --batches 1 2  # quicker (CPU)
    python benchmarks/msda.py --sweep                  # tile sweep (GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ms_deform_attn import api, pallas_gpu
from pallas_kernels.ms_deform_attn.resources import ENCODER_LEVELS

LEN_V = sum(h * w for h, w in ENCODER_LEVELS)  # 22223
NHEADS, HEAD_DIM, NPOINTS = 8, 32, 4
DECODER_QUERIES = 300


def _median_ms(fn, *args, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(repeats: int) -> float:
    """Bytes read + written per second by a jitted `x * 2` (GB/s), in place (donated), so
    that the figure is not one of allocating fresh output pages."""
    nbytes = (512 if jax.default_backend() != "cpu" else 128) * 2**20
    double = jax.jit(lambda x: x * 2, donate_argnums=0)
    x = jnp.ones((nbytes // 4,), jnp.float32)
    for _ in range(2):
        x = jax.block_until_ready(double(x))
    times = []
    for _ in range(max(repeats, 10)):
        start = time.perf_counter()
        x = jax.block_until_ready(double(x))
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times) / 1e9


def make_inputs(bs: int, len_q: int, dtype, seed: int = 0):
    """`(value, sampling_locations, attention_weights, grad_output)` in `dtype`."""
    kv, kl, ka, kg = jax.random.split(jax.random.key(seed), 4)
    nlevels = len(ENCODER_LEVELS)
    value = jax.random.normal(kv, (bs, LEN_V, NHEADS, HEAD_DIM), dtype)
    loc = jax.random.uniform(kl, (bs, len_q, NHEADS, nlevels, NPOINTS, 2), dtype)
    logits = jax.random.normal(ka, (bs, len_q, NHEADS, nlevels * NPOINTS), jnp.float32)
    attn = jax.nn.softmax(logits, -1).reshape(bs, len_q, NHEADS, nlevels, NPOINTS).astype(dtype)
    grad_out = jax.random.normal(kg, (bs, len_q, NHEADS * HEAD_DIM), dtype)
    return value, loc, attn, grad_out


def compulsory_bytes(value, loc, attn, grad_out) -> tuple[int, int]:
    """(forward, forward+backward) compulsory bytes; see the module docstring."""
    inputs = value.nbytes + loc.nbytes + attn.nbytes
    forward = inputs + grad_out.nbytes  # the output has grad_out's shape and dtype
    return forward, forward + grad_out.nbytes + 2 * inputs


def jax_functions(implementation: str):
    def forward(value, loc, attn):
        return api.ms_deform_attn(value, ENCODER_LEVELS, loc, attn, implementation=implementation)

    def forward_backward(value, loc, attn, grad_out):
        _, vjp = jax.vjp(forward, value, loc, attn)
        return vjp(grad_out)

    return jax.jit(forward), jax.jit(forward_backward)


def available_implementations() -> list[str]:
    names = []
    for name, row in api.IMPLEMENTATIONS.items():
        if row.backend is None or row.backend == jax.default_backend():
            names.append(name)
        else:
            print(
                f"skip {name}: compiles for {row.backend!r}, this backend is "
                f"{jax.default_backend()!r} (interpret mode is not worth timing)"
            )
    return names


def torch_runner():
    """transformers' grid_sample MSDA as `(forward, forward_backward, device)`, or None."""
    try:
        import torch
        from transformers.models.deformable_detr.modeling_deformable_detr import (
            MultiScaleDeformableAttention,
        )
    except ImportError as e:
        print(f"skip torch grid_sample: {e}")
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = MultiScaleDeformableAttention()
    shapes_t = torch.tensor(ENCODER_LEVELS, device=device)
    starts = torch.tensor(np.cumsum([0] + [h * w for h, w in ENCODER_LEVELS])[:-1], device=device)

    def to_torch(x, requires_grad=False):
        t = torch.from_numpy(np.array(x.astype(jnp.float32))).to(device)
        if x.dtype == jnp.bfloat16:
            t = t.to(torch.bfloat16)
        return t.requires_grad_(requires_grad)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def forward(value, loc, attn):
        with torch.no_grad():
            out = module(value, shapes_t, list(ENCODER_LEVELS), starts, loc, attn, 64)
        sync()
        return out

    def forward_backward(value, loc, attn, grad_out):
        out = module(value, shapes_t, list(ENCODER_LEVELS), starts, loc, attn, 64)
        out.backward(grad_out)
        sync()
        return out

    return to_torch, forward, forward_backward, device


def _torch_median_ms(fn, *args, repeats: int) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[1, 2, 8], help="encoder batch sizes"
    )
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--no-decoder", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="pallas_gpu at other tiles")
    parser.add_argument("--profile", action="store_true", help="one fwd+bwd for ncu")
    args = parser.parse_args()
    if args.profile:
        return profile_once()
    if args.sweep:
        return tile_sweep(args.repeats)

    device = jax.devices()[0]
    print(
        f"# {datetime.date.today()} jax {jax.__version__} {device.platform} "
        f"{device.device_kind} ({platform.processor() or platform.machine()})"
    )
    bandwidth = copy_bandwidth_gbs(args.repeats)
    print(f"# copy bandwidth (x * 2): {bandwidth:.1f} GB/s")
    implementations = available_implementations()
    torch_impl = None if args.no_torch else torch_runner()
    torch_repeats = args.repeats
    if torch_impl is not None and torch_impl[-1] == "cpu" and jax.default_backend() != "cpu":
        # A CPU-only torch beside a GPU/TPU jax: seconds per call, so fewer repeats.
        torch_repeats = min(args.repeats, 3)
        print(f"# torch has no GPU here: timing its CPU path with {torch_repeats} repeats")

    cases = [("encoder", bs, LEN_V) for bs in args.batches]
    if not args.no_decoder:
        cases.append(("decoder", 8, DECODER_QUERIES))
    print(
        "| shape | bs | dtype | implementation | fwd ms | fwd GB/s | fwd / floor "
        "| fwd+bwd ms | fwd+bwd GB/s | fwd+bwd / floor |"
    )
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    results = {}
    for shape, bs, len_q in cases:
        for dtype_name in args.dtypes:
            dtype = jnp.dtype(dtype_name)
            value, loc, attn, grad_out = make_inputs(bs, len_q, dtype)
            fwd_bytes, fwdbwd_bytes = compulsory_bytes(value, loc, attn, grad_out)
            outputs = {}

            report = functools.partial(
                _report, results, (shape, bs, dtype_name), (fwd_bytes, fwdbwd_bytes), bandwidth
            )
            for name in implementations:
                forward, forward_backward = jax_functions(name)
                outputs[name] = np.asarray(forward(value, loc, attn).astype(jnp.float32))
                report(
                    name,
                    _median_ms(forward, value, loc, attn, repeats=args.repeats),
                    _median_ms(forward_backward, value, loc, attn, grad_out, repeats=args.repeats),
                )
            if torch_impl is not None:
                to_torch, t_forward, t_forward_backward, t_device = torch_impl
                try:
                    t_in = [to_torch(x) for x in (value, loc, attn)]
                    t_out = t_forward(*t_in).float().cpu().numpy()
                    fwd_ms = _torch_median_ms(t_forward, *t_in, repeats=torch_repeats)
                    t_grad = [to_torch(x, requires_grad=True) for x in (value, loc, attn)]
                    fwdbwd_ms = _torch_median_ms(
                        t_forward_backward, *t_grad, to_torch(grad_out), repeats=torch_repeats
                    )
                except Exception as e:  # noqa: BLE001 - a dtype or signature torch lacks here
                    print(f"skip torch grid_sample {dtype_name}: {e}")
                else:
                    report(f"torch grid_sample ({t_device})", fwd_ms, fwdbwd_ms)
                    check_agreement(t_out, outputs, dtype)

    goal_checks(results, bandwidth)


def _report(results, case, nbytes, bandwidth, name, fwd_ms, fwdbwd_ms) -> None:
    """Records `(fwd_ms, fwdbwd_ms)` under `case + (name,)` and prints the table row."""
    results[case + (name,)] = (fwd_ms, fwdbwd_ms)
    cells = []
    for ms, n in zip((fwd_ms, fwdbwd_ms), nbytes):
        floor_ms = n / (bandwidth * 1e9) * 1e3
        gbs = n / (ms * 1e-3) / 1e9
        cells += [f"{ms:.2f}", f"{gbs:.1f}" if gbs >= 1 else f"{gbs:.3f}", f"{ms / floor_ms:.1f}"]
    shape, bs, dtype_name = case
    print(f"| {shape} | {bs} | {dtype_name} | {name} | " + " | ".join(cells) + " |", flush=True)


def check_agreement(torch_out: np.ndarray, outputs: dict, dtype) -> None:
    """Prints whether torch's forward output agrees with ours ("xla" when timed).

    float32: 1e-4 of the largest output. bfloat16: 0.1, because transformers rounds the
    grid `2 * loc - 1` to bfloat16 before `grid_sample` (up to 0.4 % of the map size, a
    fraction of a pixel on the large levels), whereas the kernels compute pixel
    coordinates from the bfloat16 locations in float32.
    """
    ours = outputs.get("xla", next(iter(outputs.values())))
    scale = float(np.max(np.abs(ours)))
    tol = 1e-4 if dtype == jnp.float32 else 0.1
    nans = int(np.isnan(torch_out).sum())
    if nans:
        print(
            f"#   torch vs jax outputs DISAGREE: torch's output has {nans} NaNs "
            f"of {torch_out.size} (ours has {int(np.isnan(ours).sum())})"
        )
        return
    diff = float(np.max(np.abs(torch_out - ours)))
    verdict = "agree" if diff <= tol * scale else "DISAGREE"
    print(
        f"#   torch vs jax outputs {verdict}: max |diff| = {diff:.2e} "
        f"(max |out| = {scale:.2e}, tolerance {tol:g} relative)"
    )


def goal_checks(results, bandwidth) -> None:
    """Issue 3's GPU goals, when pallas_gpu was measured at the encoder shape, batch 2."""
    key = ("encoder", 2, "float32")
    if key + ("pallas_gpu",) not in results:
        print("# GPU goals: not measured here (needs pallas_gpu at encoder batch 2 float32)")
        return
    value, loc, attn, grad_out = make_inputs(2, LEN_V, jnp.float32)
    floor_ms = compulsory_bytes(value, loc, attn, grad_out)[0] / (bandwidth * 1e9) * 1e3
    fwd, fwdbwd = results[key + ("pallas_gpu",)]
    xla_fwdbwd = results[key + ("xla",)][1]
    print(
        f"# goal forward within 4x of floor: {fwd / floor_ms:.2f}x "
        f"{'PASS' if fwd <= 4 * floor_ms else 'FAIL'}"
    )
    print(
        f"# goal fwd+bwd >= 3x faster than xla: {xla_fwdbwd / fwdbwd:.2f}x "
        f"{'PASS' if xla_fwdbwd >= 3 * fwdbwd else 'FAIL'}"
    )
    bf16 = results.get(("encoder", 2, "bfloat16", "pallas_gpu"))
    if bf16 is not None:
        print(
            f"# goal bf16 forward faster than fp32: {bf16[0]:.3f} vs {fwd:.3f} ms "
            f"{'PASS' if bf16[0] < fwd else 'FAIL'}"
        )


# (forward tiles, backward tiles) tried by --sweep beside the defaults.
SWEEP_BLOCK_Q = (8, 16, 32, 64)
SWEEP_BLOCK_Q_BWD = (4, 8, 16)


def _pallas_gpu_here() -> bool:
    if api._platform() != "cuda":
        print(f"# skip: pallas_gpu compiles for CUDA GPUs, this is {api._platform()!r}")
        return False
    return True


def tile_sweep(repeats: int) -> None:
    """Forward and forward+backward ms of pallas_gpu at each tile of the sweep."""
    if not _pallas_gpu_here():
        return
    print("| shape | bs | dtype | kernel | block_q | ms | vs default |")
    print("|---|---:|---|---|---:|---:|---:|")
    for shape, bs, len_q in (("encoder", 2, LEN_V), ("decoder", 8, DECODER_QUERIES)):
        for dtype_name in ("float32", "bfloat16"):
            value, loc, attn, grad_out = make_inputs(bs, len_q, jnp.dtype(dtype_name))
            default = pallas_gpu.default_block_sizes(value.dtype, HEAD_DIM)
            for kernel, sizes, field in (
                ("forward", SWEEP_BLOCK_Q, "block_q"),
                ("forward+backward", SWEEP_BLOCK_Q_BWD, "block_q_bwd"),
            ):
                times = {}
                for size in sorted(set(sizes) | {getattr(default, field)}):
                    tiles = dataclasses.replace(default, **{field: size})
                    fn = functools.partial(pallas_gpu.ms_deform_attn_pallas_gpu, block_sizes=tiles)
                    forward = jax.jit(lambda v, s, a, fn=fn: fn(v, ENCODER_LEVELS, s, a))
                    if kernel == "forward":
                        times[size] = _median_ms(forward, value, loc, attn, repeats=repeats)
                    else:
                        fwd_bwd = jax.jit(lambda v, s, a, g, f=forward: jax.vjp(f, v, s, a)[1](g))
                        times[size] = _median_ms(
                            fwd_bwd, value, loc, attn, grad_out, repeats=repeats
                        )
                base = times[getattr(default, field)]
                best = min(times, key=times.get)
                for size, ms in sorted(times.items()):
                    mark = " (default)" if size == getattr(default, field) else ""
                    mark += " (fastest)" if size == best else ""
                    print(
                        f"| {shape} | {bs} | {dtype_name} | {kernel} | {size}{mark} | "
                        f"{ms:.3f} | {ms / base:.2f} |",
                        flush=True,
                    )


def profile_once() -> None:
    """pallas_gpu forward+backward, encoder batch 2 float32: compiled and run once to warm
    up, then once more (the launches ncu is told to profile: `--launch-skip 2`)."""
    if not _pallas_gpu_here():
        return
    value, loc, attn, grad_out = make_inputs(2, LEN_V, jnp.float32)

    @jax.jit
    def forward_backward(value, loc, attn, grad_out):
        # The kernels themselves: through `api` the one-time probe would launch them first.
        def forward(value, loc, attn):
            return pallas_gpu.ms_deform_attn_pallas_gpu(value, ENCODER_LEVELS, loc, attn)

        return jax.vjp(forward, value, loc, attn)[1](grad_out)

    for _ in range(2):
        jax.block_until_ready(forward_backward(value, loc, attn, grad_out))
    print("# profiled: pallas_gpu forward+backward, encoder batch 2 float32")


if __name__ == "__main__":
    main()
