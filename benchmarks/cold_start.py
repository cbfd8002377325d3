"""A new process's first `Detector` call, with and without the persistent compilation cache.

A full-size model (ResNet-50 Deformable DETR, 300 queries, 91 labels, random weights: the
timing does not depend on them) is saved once; then fresh processes each load it with
`Detector.from_pretrained` and detect objects in one 800 x 1216 photo (bucket 800 x 1280) twice:

- `cold`: an empty cache directory (what a user's very first process pays; it fills the cache);
- `warm`: the directory the cold process filled (every later process: the compile is read back);
- `warmup`: warm, and `Detector.warmup([(800, 1216)])` before the first call (what it costs and
  what the first call costs after it).

The processes alternate (cold, warm, warmup, cold, warm, warmup, ...), so that a change of
machine load hits all of them alike. Printed: per process the load, first call, second call
and the cache hits JAX reported (`/jax/compilation_cache/cache_hits`).

    python benchmarks/cold_start.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.inference import FIXTURES  # noqa: E402

_CHILD = """
import json, sys, time
start = time.perf_counter()
from jax import monitoring
hits = []
monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
import numpy as np
from deformable_detr_jax import Detector
sys.path.insert(0, sys.argv[4])
from benchmarks.inference import _images
cache = None if sys.argv[2] == "none" else sys.argv[2]
image = _images(800, 1216, 1)[0]
imported = time.perf_counter() - start
t = time.perf_counter()
detector = Detector.from_pretrained(sys.argv[1], compile_cache=cache)
load = time.perf_counter() - t
warmup = None
if sys.argv[3] == "warmup":
    t = time.perf_counter()
    detector.warmup([image.shape[:2]])
    warmup = time.perf_counter() - t
calls = []
for _ in range(2):
    t = time.perf_counter()
    detector([image], threshold=0.5)
    calls.append(time.perf_counter() - t)
print(json.dumps({"import": imported, "load": load, "warmup": warmup, "first": calls[0],
                  "second": calls[1], "hits": len(hits), "shapes": detector.compiled_shapes}))
"""


def _child(folder, cache, mode) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DEFORMABLE_DETR_JAX_COMPILE_CACHE"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(folder), str(cache), mode, str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(done.stderr[-5000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    import jax
    from flax import nnx

    from deformable_detr_jax import DeformableDetrForObjectDetection, preset, save_pretrained

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        "?",
    )
    print(
        f"jax {jax.__version__}; CPU {cpu}, {os.cpu_count()} cores; load average "
        f"{os.getloadavg()[0]:.1f} at start; one {pathlib.Path(FIXTURES[0]).name} resized to "
        "800x1216 (bucket 800x1280), batch 1",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model = DeformableDetrForObjectDetection(preset("deformable-detr"), rngs=nnx.Rngs(0))
        save_pretrained(model, tmp / "model")
        del model
        for round_ in range(args.rounds):
            cache = tmp / f"cache{round_}"
            for mode in ("cold", "warm", "warmup"):
                start = time.perf_counter()
                row = _child(tmp / "model", cache, "warmup" if mode == "warmup" else "call")
                row.update(mode=mode, round=round_, load_avg=os.getloadavg()[0])
                rows.append(row)
                print(
                    f"  {mode} (round {round_}): {time.perf_counter() - start:.0f} s "
                    f"{json.dumps(row)}",
                    file=sys.stderr,
                    flush=True,
                )
    print()
    print(
        "| process | cache | load average | from_pretrained (s) | warmup (s) | first call (s) "
        "| second call (s) | cache hits |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        warm = "-" if row["warmup"] is None else f"{row['warmup']:.2f}"
        cache = "empty" if row["mode"] == "cold" else "filled"
        print(
            f"| {row['mode']} (round {row['round']}) | {cache} | {row['load_avg']:.1f} | "
            f"{row['load']:.2f} | {warm} | {row['first']:.2f} | {row['second']:.2f} | "
            f"{row['hits']} |"
        )
    for round_ in range(args.rounds):
        cold, warm, warmup = (r for r in rows if r["round"] == round_)
        print(
            f"- round {round_}: first call cold {cold['first']:.2f} s, warm {warm['first']:.2f} s "
            f"({cold['first'] / warm['first']:.1f}x faster); compile overhead of the first call "
            f"over the second: cold {cold['first'] - cold['second']:.2f} s, warm "
            f"{warm['first'] - warm['second']:.2f} s; after warmup the first call takes "
            f"{warmup['first']:.2f} s (warmup {warmup['warmup']:.2f} s)"
        )
    firsts = {
        m: statistics.median(r["first"] for r in rows if r["mode"] == m) for m in ("cold", "warm")
    }
    print(f"- median first call: cold {firsts['cold']:.2f} s, warm {firsts['warm']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
