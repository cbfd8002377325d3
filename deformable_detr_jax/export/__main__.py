"""`python -m deformable_detr_jax.export MODEL OUT --format onnx|stablehlo --height H --width W`.

Writes MODEL (anything `Detector.from_pretrained` reads) as one ONNX or StableHLO file for a
static input size (`[--batch N]`, default 1; `[--dtype float32|bfloat16]`). An existing OUT is
refused unless `--overwrite`; nothing is left behind when the export fails.

Exit statuses: the table in `deformable_detr_jax/cli/exits.py`; each failure is one `error: ...`
line.

    python -m deformable_detr_jax.export deformable-detr ddetr.onnx --format onnx \
        --height 800 --width 1216
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from deformable_detr_jax.cli import exits

PROG = "python -m deformable_detr_jax.export"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Export a Deformable DETR model as ONNX or StableHLO for a fixed input size.",
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="what Detector.from_pretrained reads: a Hugging Face hub id (org/name), a "
        "hub-style model folder, one saved by deformable_detr_jax, or a weights file",
    )
    parser.add_argument("out", metavar="OUT", help="file to write (.onnx / .stablehlo)")
    parser.add_argument(
        "--format",
        required=True,
        metavar="onnx|stablehlo",
        help="onnx (onnxruntime and other ONNX runtimes) or stablehlo (jax.export)",
    )
    parser.add_argument(
        "--height",
        type=int,
        required=True,
        metavar="H",
        help="input height in pixels (pad images to it)",
    )
    parser.add_argument(
        "--width", type=int, required=True, metavar="W", help="input width in pixels"
    )
    parser.add_argument("--batch", type=int, default=1, metavar="N", help="batch size (default 1)")
    parser.add_argument(
        "--dtype",
        default="float32",
        metavar="float32|bfloat16",
        help="compute dtype (default float32)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exits.guarded(PROG, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    from deformable_detr_jax.export import ExportError, check_format, export
    from deformable_detr_jax.export.common import DTYPES, check_output

    try:  # cheap checks first: no model is loaded for a bad format, dtype or OUT
        check_format(args.format)
        if args.dtype not in DTYPES:
            raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
        if args.format == "onnx" and args.dtype != "float32":
            raise ExportError(
                "--format onnx is float32 only; bfloat16 exports as --format stablehlo"
            )
        check_output(args.out, args.overwrite)
    except ExportError as err:
        return exits.report(PROG, str(err), exits.BAD_INPUT)

    from deformable_detr_jax.export.common import as_detector

    start = time.perf_counter()
    try:
        detector = as_detector(args.model, args.dtype)
    except (OSError, ValueError) as err:  # not a model, unreadable, bad config (typed errors)
        return exits.report(
            PROG, f"cannot load the model from {args.model!r}: {err}", exits.BAD_INPUT
        )
    try:
        path = export(
            detector,
            args.out,
            format=args.format,
            height=args.height,
            width=args.width,
            batch=args.batch,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (ExportError, ImportError) as err:
        return exits.report(PROG, str(err), exits.BAD_INPUT)
    except OSError as err:
        if err.errno not in exits.WRITE_ERRNOS:
            raise
        return exits.report(
            PROG,
            f"cannot write {args.out}: {err.strerror}; nothing was left there",
            exits.WRITE_FAILED,
        )
    size = os.path.getsize(path) / 2**20
    print(
        f"wrote {os.fspath(path)} ({args.format}, {args.batch}x{args.height}x{args.width}, "
        f"{args.dtype}, {size:.1f} MiB) in {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
