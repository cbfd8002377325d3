"""The end-to-end demo on the embedded default: train shapes_tiny, evaluate, save, detect, draw.

    python -m deformable_detr_jax.demo     # what `make demo` runs; also `deformable-detr-demo`

1. trains `configs/shapes_tiny.py` on CPU (`training.train`; how long: README, BENCHMARKS.md),
2. evaluates COCO AP on its held-out shapes images (never trained on),
3. saves the model with `checkpoint.save_pretrained` (workdir/model),
4. loads it back with `inference.Detector.from_pretrained` and runs it on held-out images,
5. writes each image with its detections drawn (workdir/detections/*.png) and prints the AP.

It says what it does as it goes: a first line before jax is imported, the run's log (weights,
compiling the train step, progress lines whose ETA counts steps, not compiling, the evaluation's
progress), then the detections. A workdir that already holds a finished run is resumed
(training is skipped if it is complete).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import time

from deformable_detr_jax.cli import logs

PROG = "deformable-detr-demo"
# what to expect, measured (README, BENCHMARKS.md "Convergence on shapes_tiny": 2 min 23 s)
EXPECTED = (
    "about 2.5 minutes on 2 idle cores: 30 s to start and compile, 2 minutes of training "
    "steps, 15 s to evaluate, save and detect; longer on a busy machine"
)


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

    say(f"loading the saved model back from {result.model_dir}")
    # one batch of all the images: one program to compile
    detector = Detector.from_pretrained(result.model_dir, batch_size=max(num_images, 1))
    held_out = setup.make_source(settings.parse(config).data, "eval")
    assert isinstance(held_out, ShapesSource)
    out_dir = workdir / "detections"
    out_dir.mkdir(parents=True, exist_ok=True)
    images = [held_out[i]["image"] for i in range(min(num_images, len(held_out)))]
    paths = []
    say(f"detecting objects in {len(images)} held-out images (the detector compiles first)...")
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


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="make demo: train configs/shapes_tiny.py on the CPU, evaluate, save, detect",
    )
    parser.add_argument(
        "--workdir",
        default="runs/demo",
        metavar="DIR",
        help="checkpoints, metrics, the model and the annotated images go here; a finished run "
        "there is reused (default runs/demo)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="training steps (default: the recipe's, configs/shapes_tiny.py)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    say(
        "train a small Deformable DETR on synthetic shapes (configs/shapes_tiny.py) on the CPU, "
        f"evaluate it on held-out images, save it and draw its detections in {args.workdir}: "
        f"{EXPECTED}. Starting jax..."
    )
    logs.quiet_backend_discovery()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    run_demo(args.workdir, num_steps=args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
