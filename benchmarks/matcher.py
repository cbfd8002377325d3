"""Hungarian matching: the on-device JAX solver vs scipy through a host callback.

Prints a markdown table of median milliseconds per call (jitted, after warm-up) for:
- `solve`: `linear_sum_assignment` on a random uniform `(batch, queries, targets)` cost;
- `match`: `hungarian_match` end to end (cost from random logits over `num_labels` classes
  and random boxes, then the assignment), the call the loss makes per decoder layer.

    python benchmarks/matcher.py                       # batch 8, 300 queries, 20 and 100 targets
    python benchmarks/matcher.py --targets 20 50 100 --repeats 50
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from deformable_detr_jax.criterion.matcher import hungarian_match, linear_sum_assignment


def _median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _inputs(rng, batch, queries, targets, num_labels):
    def boxes(*lead):
        centers = rng.uniform(0.1, 0.9, (*lead, 2))
        return np.concatenate([centers, rng.uniform(0.02, 0.4, (*lead, 2))], -1).astype(np.float32)

    return {
        "cost": jnp.asarray(rng.uniform(size=(batch, queries, targets)), jnp.float32),
        "mask": jnp.ones((batch, targets), bool),
        "logits": jnp.asarray(rng.normal(size=(batch, queries, num_labels)), jnp.float32),
        "pred_boxes": jnp.asarray(boxes(batch, queries)),
        "labels": jnp.asarray(rng.integers(0, num_labels, (batch, targets)), jnp.int32),
        "boxes": jnp.asarray(boxes(batch, targets)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--targets", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--num-labels", type=int, default=91)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}")
    print(
        f"batch {args.batch}, {args.queries} queries, {args.num_labels} labels, "
        f"median of {args.repeats}"
    )
    print()
    print("| targets | backend | solve (ms) | match (ms) |")
    print("|---:|---|---:|---:|")
    rng = np.random.default_rng(0)
    for targets in args.targets:
        x = _inputs(rng, args.batch, args.queries, targets, args.num_labels)
        for backend in ("jax", "scipy"):
            solve = jax.jit(lambda c, m, b=backend: linear_sum_assignment(c, m, backend=b))
            match = jax.jit(
                lambda lo, pb, la, bo, m, b=backend: hungarian_match(
                    lo, pb, la, bo, m, class_cost=2.0, bbox_cost=5.0, giou_cost=2.0, backend=b
                )
            )
            solve_ms = _median_ms(solve, x["cost"], x["mask"], repeats=args.repeats)
            match_ms = _median_ms(
                match,
                x["logits"],
                x["pred_boxes"],
                x["labels"],
                x["boxes"],
                x["mask"],
                repeats=args.repeats,
            )
            print(f"| {targets} | {backend} | {solve_ms:.2f} | {match_ms:.2f} |")


if __name__ == "__main__":
    main()
