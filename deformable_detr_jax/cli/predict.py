"""Command line detection: `python -m deformable_detr_jax.predict --model PATH IMAGE...`.

Loads a model folder (a hub download: config.json + model.safetensors | pytorch_model.bin +
preprocessor_config.json, or a folder saved by this package), detects objects in every image,
prints them, and with `--out DIR` writes each image with its labelled boxes to
`DIR/<name>.png`. A bad image (unreadable, empty, ...) is reported on stderr and the others are
still processed. A folder stands for its images (sorted by name, not its subfolders).

Exit statuses: the table in `deformable_detr_jax/cli/exits.py`.

    python -m deformable_detr_jax.predict --model deformable-detr photos/*.jpg --out detected
    python -m deformable_detr_jax.predict --model deformable-detr photos/ --out detected
    python -m deformable_detr_jax.predict --model deformable-detr a.jpg --threshold 0.7 --json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence

from deformable_detr_jax.cli import exits

PROG = "python -m deformable_detr_jax.predict"
# what a folder given as IMAGE contributes (the formats PIL reads that photos come in)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"threshold must be a number in [0, 1], got {text!r}"
        ) from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"threshold must be in [0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deformable_detr_jax.predict",
        description="Detect objects in images with a Deformable DETR model folder.",
    )
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files, or folders: a folder's images ("
        + ", ".join(IMAGE_SUFFIXES)
        + "), sorted by name, not its subfolders",
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="a Hugging Face hub id (org/name, downloaded once into huggingface_hub's cache), "
        "a model folder (hub-style: config.json + model.safetensors | pytorch_model.bin; or "
        "saved by deformable_detr_jax) or a weights file (.safetensors, .bin, .pth)",
    )
    parser.add_argument("--out", metavar="DIR", help="write annotated images to DIR/<name>.png")
    parser.add_argument(
        "--threshold",
        type=_threshold,
        default=0.5,
        metavar="T",
        help="keep detections with score > T, in [0, 1] (default 0.5)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute dtype of the model (default float32; bfloat16 is faster on GPU and TPU)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive,
        default=4,
        metavar="N",
        help="images per device batch within a shape bucket (default 4)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per image instead of text"
    )
    return parser


def _output_path(out: pathlib.Path, image: str, taken: set[str]) -> pathlib.Path:
    """`out/<stem>.png`, with `-1`, `-2`, ... when two inputs share a stem."""
    stem = pathlib.Path(image).stem or "image"
    name, n = f"{stem}.png", 0
    while name in taken:
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name)
    return out / name


class NoImagesError(ValueError):
    """A folder given as IMAGE holds no image file."""


def image_files(paths: Sequence[str]) -> list[str]:
    """`paths` with each folder replaced by its image files (`IMAGE_SUFFIXES`, any case), sorted
    by name, not recursive; anything else is kept as given (a missing file is reported with the
    other bad images). Raises NoImagesError for a folder without images."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = sorted(
            entry.path
            for entry in os.scandir(path)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES)
        )
        if not found:
            raise NoImagesError(
                f"{path}: no images in this folder (it takes {', '.join(IMAGE_SUFFIXES)} files, "
                "not subfolders)"
            )
        files.extend(found)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.images = image_files(args.images)
    except NoImagesError as err:
        return exits.report(PROG, str(err), exits.BAD_INPUT)
    exits.quiet_orbax()
    return exits.guarded(PROG, lambda: _predict(args))


def _predict(args: argparse.Namespace) -> int:
    from deformable_detr_jax.inference.detector import Detector
    from deformable_detr_jax.processing.image_processor import ImageError

    try:
        detector = Detector.from_pretrained(
            args.model, dtype=args.dtype, batch_size=args.batch_size
        )
    except (OSError, ValueError) as err:  # missing folder, bad checkpoint or config
        return exits.report(
            PROG, f"cannot load the model from {args.model!r}: {err}", exits.BAD_INPUT
        )
    out = pathlib.Path(args.out) if args.out else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            return exits.report(
                PROG, f"cannot create --out {str(out)!r}: {err}", exits.WRITE_FAILED
            )

    start = time.perf_counter()
    results = detector(args.images, threshold=args.threshold, on_error="return")
    seconds = time.perf_counter() - start

    failed, taken = 0, set()
    for path, result in zip(args.images, results):
        if isinstance(result, ImageError):
            failed += 1
            print(f"error: {result}", file=sys.stderr)
            continue
        written = None
        if out is not None:
            written = _output_path(out, path, taken)
            try:
                detector.draw(path, result).save(written)
            except (OSError, ValueError) as err:
                failed += 1
                print(f"error: {path}: cannot write {written}: {err}", file=sys.stderr)
                written = None
        if args.json:
            record = {
                "image": os.fspath(path),
                "height": result.image_size[0],
                "width": result.image_size[1],
                "detections": result.to_list(),
            }
            if written is not None:
                record["annotated"] = os.fspath(written)
            print(json.dumps(record))
        else:
            print(f"{path}: {result}")
            if written is not None:
                print(f"  -> {written}")
    ok = len(args.images) - failed
    print(
        f"{ok} of {len(args.images)} image(s) processed in {seconds:.1f} s "
        f"(programs compiled for {len(detector.compiled_shapes)} shape(s))",
        file=sys.stderr,
    )
    return exits.SOME_FAILED if failed else exits.OK


if __name__ == "__main__":
    sys.exit(main())
