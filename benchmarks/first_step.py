"""Where a training run's first step goes: tracing and lowering, XLA's compile, the first run.

    .venv/bin/python benchmarks/first_step.py --model shapes_tiny --batch 8
    .venv/bin/python benchmarks/first_step.py --model r50-box-refine --batch 2 --size 384 512
    .venv/bin/python benchmarks/first_step.py ... --cache DIR   # twice: the second reads DIR

The step is `benchmarks/train_step.py`'s (the package's jitted `train_step`), lowered and
compiled separately (`jit(...).lower()`, `.compile()`) and then run once. `--cache DIR` points
JAX's persistent compilation cache at DIR, as `train.compilation_cache_dir` does for a
training run (its default: `WORKDIR/compile_cache`): run the command twice and the second
process's compile is a cache read. XLA flags come from `XLA_FLAGS` as usual.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step  # noqa: E402  (benchmarks/train_step.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    train_step.add_arguments(parser)
    parser.add_argument("--cache", default=None, help="persistent compilation cache directory")
    args = parser.parse_args()
    import jax

    if args.cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.cache))
    from deformable_detr_jax import compile_cache

    compile_cache.programs_read()  # counts from here on
    config, batch, (height, width) = train_step.setup(args)
    step_fn, state, batch, key = train_step.build_jax(config, batch, args)
    start = time.perf_counter()
    if hasattr(step_fn, "lower_sized"):  # CPU: the options sized for the batch, as a call does
        lowered, options = step_fn.lower_sized(state, batch, key)
    else:
        lowered, options = step_fn.lower(state, batch, key), None
    lowered_at = time.perf_counter()
    compiled = lowered.compile(compiler_options=options)
    compiled_at = time.perf_counter()
    jax.block_until_ready(compiled(state, batch, key))
    ran_at = time.perf_counter()
    read, saved = compile_cache.programs_read()
    cache = f"; {read} programs read from {args.cache}" if args.cache else ""
    print(
        f"{args.model}, batch {args.batch}, {height}x{width}, {args.dtype}: "
        f"trace + lower {lowered_at - start:.1f} s, compile {compiled_at - lowered_at:.1f} s, "
        f"first run {ran_at - compiled_at:.1f} s, first step {ran_at - start:.1f} s{cache}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
