"""Input throughput: images/s of the training pipeline with the full DETR augmentations.

    .venv/bin/python benchmarks/input_pipeline.py                      # ../shared/data/coco128
    .venv/bin/python benchmarks/input_pipeline.py --workers 1 2 4 --batches 32
    .venv/bin/python benchmarks/input_pipeline.py --need 12.5          # a step's img/s to feed

Both folder sources read the same photos: `YoloFolderSource` on the folder itself and
`CocoJsonSource` on an `instances` json written (to a temporary folder) from its labels. The
stream is `make_batches(train=True)` with the paper's COCO augmentations (flip, shortest edge
480..800 capped at 1333, the crop branch with probability 0.5), ImageNet normalisation and
padding to the buckets, as `train.py` runs it. Configurations:

- `python` and `grain` backends, 1..N reader threads in one process (PIL releases the GIL
  while it decodes and resizes; the rest runs under it); `train.py`'s default is grain
  (`data.backend="auto"`) with threads;
- `grain` backend, 1..N worker processes (`num_workers`, one reader thread each), batches
  collated in the main process.

First, each stage alone in one thread, per image: decode (the source's `__getitem__`), the
augmentations, normalisation to float32, and collation into padded batches. Then each
configuration's images/s after one warm-up batch, and that figure per core: divided by the
cores it can occupy, min(threads or workers, the machine's cores). `--need R` adds how many
such cores feed R images/s (e.g. a GPU step's batch / step time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import PIL.Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deformable_detr_jax.data import pipeline, streams, transforms  # noqa: E402
from deformable_detr_jax.data.coco_json import CocoJsonSource  # noqa: E402
from deformable_detr_jax.data.yolo import YoloFolderSource  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "coco128"


def write_coco_json(yolo: YoloFolderSource, folder: pathlib.Path) -> pathlib.Path:
    """An `instances` json for the YOLO folder's images and boxes (pixels, xywh), ids 1..K."""
    images, annotations = [], []
    for index, path in enumerate(yolo._files):
        with PIL.Image.open(path) as image:
            width, height = image.size
        image_id = yolo._image_ids[index]
        images.append({"id": image_id, "file_name": path.name, "height": height, "width": width})
        boxes, labels = yolo._targets[index]  # (n, 4) cxcywh normalised, (n,)
        for (cx, cy, w, h), label in zip(boxes.tolist(), labels.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height],
                    "area": w * width * h * height,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(yolo.label_names)]
    path = folder / "instances.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def stage_times(source, augment: transforms.AugmentConfig, batch_size: int, seed: int) -> dict:
    """Milliseconds per image of each stage, one thread, every image of `source` once."""
    loader = streams.Loader(source, streams.Order(len(source), 0, 1, seed, True), augment)
    totals = dict.fromkeys(("decode", "augment", "normalise", "collate"), 0.0)
    rng = np.random.default_rng(seed)
    examples = []
    for index in range(len(source)):
        start = time.perf_counter()
        record = source[index]
        decoded = time.perf_counter()
        sample = transforms.train_transform(record, rng, augment)
        augmented = time.perf_counter()
        image = (sample["image"].astype(np.float32) - loader.mean) / loader.std
        normalised = time.perf_counter()
        totals["decode"] += decoded - start
        totals["augment"] += augmented - decoded
        totals["normalise"] += normalised - augmented
        examples.append(
            {
                "image": image,
                "boxes": np.asarray(sample["boxes"], np.float32),
                "labels": np.asarray(sample["labels"], np.int32),
                "image_id": record["image_id"],
                "size": image.shape[:2],
                "orig_size": record["image"].shape[:2],
            }
        )
        if len(examples) == batch_size:
            start = time.perf_counter()
            pipeline.collate(
                examples, batch_size, 100, buckets=pipeline.bucket_sizes(augment.max_size, 128)
            )
            totals["collate"] += time.perf_counter() - start
            examples = []
    return {k: 1e3 * v / len(source) for k, v in totals.items()}


def throughput(source, augment, *, backend, threads, workers, batch_size, batches, seed) -> float:
    """Images per second of `make_batches` after one warm-up batch."""
    stream = pipeline.make_batches(
        source,
        batch_size=batch_size,
        train=True,
        seed=seed,
        augment=augment,
        backend=backend,
        num_threads=threads,
        num_workers=workers,
        process_index=0,
        process_count=1,
    )
    with stream:
        next(stream)  # starts the threads / worker processes
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a YOLO folder (coco128)")
    parser.add_argument("--split", default="train2017")
    parser.add_argument(
        "--sources", nargs="+", default=["coco-json", "yolo"], choices=["coco-json", "yolo"]
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="thread / worker counts (default 1..cores)",
    )
    parser.add_argument(
        "--backends", nargs="+", default=["python", "grain"], choices=["python", "grain"]
    )
    parser.add_argument(
        "--batch", type=int, default=4, help="images per batch (the paper: 4 per GPU)"
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=32,
        help="timed batches per configuration (32 x 4: each image once)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--need",
        type=float,
        default=None,
        help="images/s a training step consumes (batch / step seconds)",
    )
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    data = pathlib.Path(args.data)
    if not (data / "images" / args.split).is_dir():
        sys.exit(
            f"error: no YOLO folder at --data {data} (images/{args.split}); point --data at "
            "coco128 (../shared/data/coco128 from the project root)"
        )
    cores = os.cpu_count() or 1
    counts = args.workers or list(range(1, cores + 1))
    if "grain" in args.backends and not pipeline.grain_available():
        sys.exit("error: --backends grain needs grain installed (`pip install grain`)")
    augment = transforms.AugmentConfig()  # the paper's COCO recipe
    yolo = YoloFolderSource(data, args.split)
    with tempfile.TemporaryDirectory() as tmp:
        named = {}
        if "coco-json" in args.sources:
            named["coco-json"] = CocoJsonSource(
                data / "images" / args.split, write_coco_json(yolo, pathlib.Path(tmp))
            )
        if "yolo" in args.sources:
            named["yolo"] = yolo
        print(
            f"{len(yolo)} images from {data}, batch {args.batch}, {args.batches} timed batches "
            f"per configuration, {cores} cores, load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
        )
        results = {
            "cores": cores,
            "images": len(yolo),
            "batch": args.batch,
            "stages": {},
            "throughput": [],
        }
        print(
            "\n| source | decode ms/img | augment ms/img | normalise ms/img | collate ms/img "
            "| sum ms/img | one thread img/s |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, source in named.items():
            stages = stage_times(source, augment, args.batch, args.seed)
            results["stages"][name] = stages
            total = sum(stages.values())
            print(
                f"| {name} | "
                + " | ".join(f"{v:.1f}" for v in stages.values())
                + f" | {total:.1f} | {1e3 / total:.1f} |"
            )
        need = f" | cores for {args.need:g} img/s" if args.need else ""
        print(f"\n| source | backend | threads | workers | img/s | img/s per core{need} |")
        print("|---|---|---:|---:|---:|---:" + ("|---:|" if args.need else "|"))
        for name, source in named.items():
            layouts = [(backend, count, 0) for backend in args.backends for count in counts]
            layouts += [("grain", 1, count) for count in counts if "grain" in args.backends]
            for backend, threads, workers in layouts:
                count = max(threads, workers)
                rate = throughput(
                    source,
                    augment,
                    backend=backend,
                    threads=threads,
                    workers=workers,
                    batch_size=args.batch,
                    batches=args.batches,
                    seed=args.seed,
                )
                per_core = rate / min(count, cores)
                row = {
                    "source": name,
                    "backend": backend,
                    "threads": threads,
                    "workers": workers,
                    "images_per_s": rate,
                    "images_per_s_per_core": per_core,
                }
                results["throughput"].append(row)
                extra = f" | {math.ceil(args.need / per_core)}" if args.need else ""
                print(
                    f"| {name} | {backend} | {threads} | {workers} | {rate:.1f} | "
                    f"{per_core:.1f}{extra} |",
                    flush=True,
                )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
