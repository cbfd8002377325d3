"""Exported models against the JAX model and transformers: onnxruntime CPU, StableHLO, eager.

The same random full-size weights (ResNet-50 Deformable DETR, 300 queries, 91 labels; every
parameter and batch-norm statistic perturbed, `tests/hf_reference.random_hf_model`) are exported
by `deformable_detr_jax.export` (ONNX and StableHLO, timed, file sizes) at 800 x 1216, batch 1,
and the model alone (no pre- or post-processing) runs on one fixture photo pre-processed to
800 x 1216 (nothing padded) in:

- onnxruntime, CPU execution provider (the exported `.onnx`);
- `Detector.forward` (jax.jit, float32, on the CPU);
- the StableHLO file reloaded with `jax.export.deserialize` (jax only);
- transformers' `DeformableDetrForObjectDetection`, eager PyTorch float32.

Each runs in its own subprocess (peak memory is its own): first call (session creation or
compilation included), then the median of `--repeats` timed calls, wall clock and CPU time.
Outputs are compared with transformers' (sigmoid scores, boxes in pixels).

    python benchmarks/export.py                  # needs torch + transformers and the [export] extra
    python benchmarks/export.py --repeats 5 --height 800 --width 1216
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

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.inference import FIXTURES, _images, _make_folder, _rss_gib, _sigmoid, _time  # noqa: E402


def _inputs(args):
    from deformable_detr_jax.processing.image_processor import ImageProcessor

    processor = ImageProcessor.from_pretrained(args.folder)
    batch = processor.preprocess(_images(args.height, args.width, 1))
    assert batch["pixel_values"].shape[1:3] == (args.height, args.width), batch[
        "pixel_values"
    ].shape
    return np.asarray(batch["pixel_values"], np.float32), np.asarray(batch["pixel_mask"], bool)


def _child_export(args) -> dict:
    from deformable_detr_jax.export import export
    from deformable_detr_jax.inference.detector import Detector

    detector = Detector.from_pretrained(args.folder, compile_cache=None)
    result = {}
    for fmt in ("onnx", "stablehlo"):
        path = pathlib.Path(args.out_dir) / f"model.{fmt}"
        start = time.perf_counter()
        export(detector, path, format=fmt, height=args.height, width=args.width)
        result[fmt] = {"seconds": time.perf_counter() - start, "mib": path.stat().st_size / 2**20}
    return result


def _child_run(args) -> dict:
    pixel_values, pixel_mask = _inputs(args)
    if args.child == "onnxruntime":
        import onnxruntime as ort

        start = time.perf_counter()
        session = ort.InferenceSession(
            str(pathlib.Path(args.out_dir) / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        load = time.perf_counter() - start
        feed = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        run = lambda: session.run(None, feed)  # noqa: E731
        name = f"onnxruntime {ort.__version__} CPU (exported .onnx)"
    elif args.child in ("jax", "stablehlo"):
        import jax

        start = time.perf_counter()
        if args.child == "jax":
            from deformable_detr_jax.inference.detector import Detector

            detector = Detector.from_pretrained(args.folder, buckets=None, compile_cache=None)
            fn = detector.forward
            name = f"Detector.forward, jax {jax.__version__} jit fp32"
        else:
            data = (pathlib.Path(args.out_dir) / "model.stablehlo").read_bytes()
            fn = jax.jit(jax.export.deserialize(bytearray(data)).call)
            name = "StableHLO reloaded (jax.export.deserialize)"
        load = time.perf_counter() - start
        run = lambda: [np.asarray(x) for x in fn(pixel_values, pixel_mask)]  # noqa: E731
    else:  # transformers eager
        import torch
        import transformers

        start = time.perf_counter()
        model = transformers.DeformableDetrForObjectDetection.from_pretrained(args.folder).eval()
        load = time.perf_counter() - start
        inputs = {
            "pixel_values": torch.from_numpy(pixel_values.transpose(0, 3, 1, 2).copy()),
            "pixel_mask": torch.from_numpy(pixel_mask.astype(np.int64)),
        }

        @torch.no_grad()
        def run():
            out = model(**inputs)
            return [out.logits.numpy(), out.pred_boxes.numpy()]

        name = f"transformers {transformers.__version__} eager fp32 (torch {torch.__version__})"
    first, times, cpu, outputs = _time(run, args.repeats)
    np.savez(args.raw_out, logits=outputs[0], pred_boxes=outputs[1])
    return {
        "name": name,
        "load_s": load,
        "first_s": first,
        "times_s": times,
        "cpu_s": cpu,
        "peak_gib": _rss_gib(),
    }


def _spawn(args, child: str, tmp: pathlib.Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        child,
        "--folder",
        str(tmp / "model"),
        "--out-dir",
        str(tmp),
        "--raw-out",
        str(tmp / f"{child}.npz"),
        "--json-out",
        str(tmp / f"{child}.json"),
        "--height",
        str(args.height),
        "--width",
        str(args.width),
        "--repeats",
        str(args.repeats),
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    print(f"  {child}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    result = json.loads((tmp / f"{child}.json").read_text())
    if (tmp / f"{child}.npz").exists():
        result["raw"] = dict(np.load(tmp / f"{child}.npz"))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("--raw-out", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = _child_export(args) if args.child == "export" else _child_run(args)
        pathlib.Path(args.json_out).write_text(json.dumps(result))
        return 0

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        "?",
    )
    print(
        f"CPU {cpu}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start; "
        f"{args.height}x{args.width}, batch 1, {pathlib.Path(FIXTURES[0]).name}; median of "
        f"{args.repeats} calls after a first",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        _make_folder(tmp / "model", args.seed)
        exported = _spawn(args, "export", tmp)
        results = {
            child: _spawn(args, child, tmp)
            for child in ("onnxruntime", "jax", "stablehlo", "torch")
        }
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print()
    print("| format | export time (s) | file size (MiB) |")
    print("|---|---:|---:|")
    for fmt, row in exported.items():
        print(f"| {fmt} | {row['seconds']:.1f} | {row['mib']:.1f} |")
    print()
    print(
        "| model run by | load (s) | first call (s) | median latency (s) | median CPU time (s) | "
        "peak RSS (GiB) | vs transformers: scores, boxes (px) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    reference = results["torch"]["raw"]
    scale = np.array([args.width, args.height] * 2)
    for result in results.values():
        raw = result["raw"]
        scores = np.abs(_sigmoid(raw["logits"]) - _sigmoid(reference["logits"])).max()
        boxes = np.abs((raw["pred_boxes"] - reference["pred_boxes"]) * scale).max()
        print(
            f"| {result['name']} | {result['load_s']:.2f} | {result['first_s']:.2f} | "
            f"{statistics.median(result['times_s']):.3f} | "
            f"{statistics.median(result['cpu_s']):.2f} | {result['peak_gib']:.2f} | "
            f"{scores:.1e}, {boxes:.1e} |"
        )
    torch_median = statistics.median(results["torch"]["times_s"])
    for child in ("onnxruntime", "jax", "stablehlo"):
        median = statistics.median(results[child]["times_s"])
        print(f"- {results[child]['name']}: {torch_median / median:.2f}x transformers' speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
