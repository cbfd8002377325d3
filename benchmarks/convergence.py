"""Convergence: COCO AP / AP50 on held-out images while training, with the curve.

    .venv/bin/python benchmarks/convergence.py                          # shapes_tiny, make demo's run
    .venv/bin/python benchmarks/convergence.py --steps 3000 --eval-every 500
    .venv/bin/python benchmarks/convergence.py --coco128 ../shared/data/coco128 --steps 2000

Default: `configs/shapes_tiny.py` as `make demo` trains it (same steps, same data), evaluated on
its held-out shapes (`data.shapes.num_eval` images never trained on) every `--eval-every`
steps. `--coco128 FOLDER`: a sanity figure on real photos: the shapes_tiny architecture with 80
labels trained from scratch on the 128 COCO train2017 images of the YOLO folder and evaluated on
the same images (an overfitting check, not a generalisation figure), images resized to
`--coco128-size` (shorter side; longer side capped at 5/3 of it), flips only.

Prints one Markdown row per evaluation (step, wall-clock seconds since the script started,
which includes compilation and the evaluations themselves, training loss, AP, AP50, AP75) and
writes the rows as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_recipe(name: str):
    path = ROOT / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def coco128_config(folder: str, size: int):
    config = load_recipe("shapes_tiny")
    config.model.num_labels = None  # 80, from names.yaml
    config.model.num_queries = 50
    data = config.data
    data.source = "yolo"
    data.yolo.folder = folder
    data.yolo.train_split = "train2017"
    data.yolo.eval_split = "train2017"  # overfit: evaluate on the training images
    data.max_boxes = 50
    longest = size * 5 // 3
    side = -(-longest // 32) * 32
    data.pad_to = (side, side)
    data.augment.scales = (size,)
    data.augment.max_size = longest
    data.augment.crop_prob = 0.0
    data.augment.eval_size = size
    data.augment.eval_max_size = longest
    data.batch_size = 8
    data.eval_batch_size = 8
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="shapes_tiny")
    parser.add_argument("--coco128", default=None, metavar="FOLDER")
    parser.add_argument("--coco128-size", type=int, default=160)
    parser.add_argument("--steps", type=int, default=0, help="default: the recipe's")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    start = time.time()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)

    import jax

    from deformable_detr_jax.training import train
    from deformable_detr_jax.training.metrics import read_jsonl

    if args.coco128:
        if not os.path.isdir(args.coco128):
            print(f"convergence.py: no coco128 folder at {args.coco128}; skipping", file=sys.stderr)
            return 0
        config = coco128_config(args.coco128, args.coco128_size)
        name = f"coco128 (train = eval, {args.coco128_size} px)"
    else:
        config = load_recipe(args.recipe)
        name = args.recipe
    if args.steps:
        config.train.num_steps = args.steps
    config.train.eval_every = args.eval_every
    config.train.eval_at_end = True
    config.train.checkpoint_every = 0
    config.train.save_model = False
    workdir = args.workdir or tempfile.mkdtemp(prefix="convergence_")
    try:
        result = train(config, workdir)
        records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    losses = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    rows = []
    for record in records:
        if record["split"] != "eval":
            continue
        step = record["step"]
        near = max((s for s in losses if s <= step), default=None)
        rows.append(
            {
                "step": step,
                "seconds": round(record["time"] - start, 1),
                "loss": losses.get(near),
                "AP": record["AP"],
                "AP50": record["AP50"],
                "AP75": record["AP75"],
            }
        )
    print(
        f"\n{name}: {result.step} steps, batch {config.data.batch_size}, "
        f"{jax.device_count()} {jax.default_backend()} device(s), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {time.time() - start:.0f} s in all\n"
    )
    print("| step | seconds | train loss | AP | AP50 | AP75 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        loss = f"{row['loss']:.3f}" if isinstance(row["loss"], float) else "-"
        print(
            f"| {row['step']} | {row['seconds']:.0f} | {loss} | {row['AP']:.3f} | "
            f"{row['AP50']:.3f} | {row['AP75']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"name": name, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
