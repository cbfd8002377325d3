"""Each CPU speed-up of the training step on and off, side by side in one run.

    .venv/bin/python benchmarks/cpu_speedups.py --model r50-box-refine --batch 2 --size 384 512 \
        --variants all no-a no-b no-c no-d --steps 6 --block 1

A variant is `all` (every speed-up the package applies on CPU) or `no-X`: all but the
speed-ups named by the letters X,
turned off in that subject's process before its step is built:

- `a`: the dense layers' filter gradients in the form YNNPACK runs (`cpu.prepare_model`);
- `b`: the train step compiled per batch shape with sized options (`cpu.sized_train_step`:
  the temporaries split into buffers that fit glibc's heaps);
- `c`: `cpu.compiler_options`' YNNPACK fusion types without its convolutions (jaxlib 0.10);
- `d`: glibc keeping freed memory (`cpu.configure_process`).

Each variant runs in its own process (`side_by_side.py`), the variants alternate in blocks of
`--block` steps after `--warmup` untimed blocks; the medians, the spread (min..max) and each
variant's median against `all` are printed with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step  # noqa: E402  (benchmarks/train_step.py)

SPEEDUPS = "abcd"


def turn_off(speedups: str) -> None:
    """Turns the speed-ups named in `speedups` off in this process (before the step is built)."""
    from deformable_detr_jax.training import cpu
    from deformable_detr_jax.training.cpu import compiler

    if "a" in speedups:
        cpu.prepare_model = lambda model: model
    if "b" in speedups:
        cpu.sized_train_step = lambda jitted, mesh: jitted
    if "c" in speedups:
        compiler.MEASURED_JAXLIB = (-1, -1)


class Variant:
    """The JAX train step of `train_step.py` with `args.off` turned off."""

    def __init__(self, args):
        import jax

        from deformable_detr_jax.training import cpu

        self._jax = jax
        turn_off(args.off)
        if "d" not in args.off:
            cpu.configure_process()
        config, batch, _ = train_step.setup(args)
        self.step_fn, self.state, self.batch, self.key = train_step.build_jax(config, batch, args)
        start = time.perf_counter()
        self.step()
        self.first_step_s = time.perf_counter() - start

    def step(self):
        self.state, self.metrics = self.step_fn(self.state, self.batch, self.key)
        self._jax.block_until_ready(self.metrics)

    def loss(self) -> float:
        return float(self.metrics["loss"])


def main(argv=None) -> int:
    from side_by_side import Subject, interleave

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    train_step.add_arguments(parser)
    parser.add_argument("--variants", nargs="+", default=["all", *(f"no-{s}" for s in SPEEDUPS)])
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--cache", default=None, help="persistent compilation cache directory")
    args = parser.parse_args(argv)
    if args.cache:  # variants with the same program (no-d and all) compile it once
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(args.cache)
    for variant in args.variants:
        if variant != "all" and not (variant[:3] == "no-" and set(variant[3:]) <= set(SPEEDUPS)):
            parser.error(f"unknown variant {variant!r}: use all or no-X with X among {SPEEDUPS}")
    load_before = os.getloadavg()
    subjects = {}
    try:
        for variant in args.variants:
            off = "" if variant == "all" else variant[3:]
            subject_args = argparse.Namespace(**vars(args), off=off)
            subjects[variant] = Subject(Variant, subject_args)
        block = max(1, args.block)
        rounds = -(-args.steps // block)
        times = interleave(subjects, rounds=rounds, block=block, warmup=args.warmup)
        losses = {name: subject.call("loss") for name, subject in subjects.items()}
    finally:
        for subject in subjects.values():
            subject.close()
    load_after = os.getloadavg()
    base = statistics.median(times[args.variants[0]])
    results = {}
    for name in args.variants:
        median = statistics.median(times[name])
        results[name] = {
            "median_s": median,
            "min_s": min(times[name]),
            "max_s": max(times[name]),
            "vs_first": median / base,
            "first_step_s": subjects[name].info["first_step_s"],
            "loss": losses[name],
            "times_s": times[name],
        }
        print(
            f"{name:>5}: {median * 1e3:8.1f} ms/step (min {min(times[name]) * 1e3:.1f}, max "
            f"{max(times[name]) * 1e3:.1f}, {len(times[name])} steps), "
            f"{median / base:.3f}x of {args.variants[0]}, first step "
            f"{subjects[name].info['first_step_s']:.1f} s, loss {losses[name]:.4f}"
        )
    print(
        f"{args.model} batch {args.batch}, {args.size}; load average (1, 5, 15 min) before "
        f"{' '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{' '.join(f'{x:.2f}' for x in load_after)}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "load": [load_before, load_after]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
