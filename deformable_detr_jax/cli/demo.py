"""The end-to-end demo on the embedded default: train shapes_tiny, evaluate, save, detect, draw.

    python -m deformable_detr_jax.demo     # what `make demo` runs; also `deformable-detr-demo`

1. trains `configs/shapes_tiny.py` on CPU (`training.train`; 2 to 6 minutes on a quiet 2-core machine, BENCHMARKS.md),
2. evaluates COCO AP on its held-out shapes images (never trained on),
3. saves the model with `checkpoint.save_pretrained` (workdir/model),
4. loads it back with `inference.Detector.from_pretrained` and runs it on held-out images,
5. writes each image with its detections drawn (workdir/detections/*.png) and prints the AP.

A workdir that already holds a finished run is resumed (training is skipped if it is complete).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import time


def run_demo(
    workdir: str | os.PathLike = "runs/demo",
    *,
    num_images: int = 6,
    num_steps: int | None = None,
    threshold: float = 0.35,
) -> dict:
    """Runs the demo; returns `{"metrics", "model_dir", "images"}`."""
    import PIL.Image

    from deformable_detr_jax.data import ShapesSource
    from deformable_detr_jax.inference.detector import Detector
    from deformable_detr_jax.training import cpu, settings, setup, train
    from deformable_detr_jax.training.recipes import shapes_tiny

    start = time.time()
    workdir = pathlib.Path(workdir)
    config = shapes_tiny()
    if num_steps is not None:
        config.train.num_steps = int(num_steps)
    cpu.configure_process()  # process-wide settings: once, here (on a CPU host only)
    result = train(config, workdir)
    metrics = result.eval_metrics or {}

    detector = Detector.from_pretrained(result.model_dir)
    held_out = setup.make_source(settings.parse(config).data, "eval")
    assert isinstance(held_out, ShapesSource)
    out_dir = workdir / "detections"
    out_dir.mkdir(parents=True, exist_ok=True)
    images = [held_out[i]["image"] for i in range(min(num_images, len(held_out)))]
    paths = []
    for index, (image, found) in enumerate(zip(images, detector(images, threshold=threshold))):
        path = out_dir / f"held_out_{index}.png"
        detector.draw(image, found).resize(
            (image.shape[1] * 3, image.shape[0] * 3), PIL.Image.NEAREST
        ).save(path)
        paths.append(str(path))
        names = ", ".join(f"{n} {s:.2f}" for n, s in zip(found.label_names, found.scores))
        print(f"  {path}: {len(found)} detection(s) {names}")
    print(
        f"\nshapes_tiny after {result.step} steps ({time.time() - start:.0f} s): "
        f"AP {metrics.get('AP', float('nan')):.3f}  AP50 {metrics.get('AP50', float('nan')):.3f}  "
        f"AP75 {metrics.get('AP75', float('nan')):.3f} on {len(held_out)} held-out images\n"
        f"model: {result.model_dir}\nannotated images: {out_dir}"
    )
    return {"metrics": metrics, "model_dir": result.model_dir, "images": paths}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="make demo: train, evaluate, save, detect")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    run_demo(args.workdir, num_steps=args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
