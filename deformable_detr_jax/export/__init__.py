"""Deployment export: a model as one ONNX file or one StableHLO (`jax.export`) file.

    from deformable_detr_jax.export import export
    export("deformable-detr", "ddetr.onnx", format="onnx", height=800, width=1216)
    export("deformable-detr", "ddetr.stablehlo", format="stablehlo", height=800, width=1216)

    python -m deformable_detr_jax.export MODEL OUT --format onnx|stablehlo --height H --width W \
        [--batch N] [--dtype float32|bfloat16] [--overwrite]

MODEL is anything `Detector.from_pretrained` reads. The program (`common.py`): `pixel_values
[N, H, W, 3]` float32 and `pixel_mask [N, H, W]` bool in, `logits [N, num_queries, num_labels]`
and `pred_boxes [N, num_queries, 4]` float32 out, the padding masked through the model
(`padding_invariant=True`), weights inside. Rooms: `common` (inputs, errors, atomic writes),
`onnx_export` + `onnx_rules` (jax2onnx, its missing rules), `stablehlo_export`, `__main__` (CLI).

Not to be confused with `deformable_detr_jax.training.to_pretrained`, which turns a training
checkpoint into a model folder.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from deformable_detr_jax.export.common import (
    DTYPES,
    FORMATS,
    INPUT_NAMES,
    OUTPUT_NAMES,
    ExportError,
    OutputExistsError,
    UnknownFormatError,
    UnsupportedSizeError,
    check_format,
)
from deformable_detr_jax.export.onnx_export import OPSET, export_onnx
from deformable_detr_jax.export.stablehlo_export import export_stablehlo, load_stablehlo


def export(
    model: Any,
    out: str | os.PathLike,
    *,
    format: str,
    height: int,
    width: int,
    batch: int = 1,
    dtype: str = "float32",
    overwrite: bool = False,
) -> pathlib.Path:
    """`export_onnx` or `export_stablehlo` by `format` ("onnx" | "stablehlo"); returns `out`."""
    writer = {"onnx": export_onnx, "stablehlo": export_stablehlo}[check_format(format)]
    return writer(
        model, out, height=height, width=width, batch=batch, dtype=dtype, overwrite=overwrite
    )


__all__ = [
    "DTYPES",
    "FORMATS",
    "INPUT_NAMES",
    "OPSET",
    "OUTPUT_NAMES",
    "ExportError",
    "OutputExistsError",
    "UnknownFormatError",
    "UnsupportedSizeError",
    "export",
    "export_onnx",
    "export_stablehlo",
    "load_stablehlo",
]
