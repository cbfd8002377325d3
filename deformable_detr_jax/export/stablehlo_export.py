"""StableHLO export through `jax.export`, weights inside, reloadable with jax alone.

    exported = jax.export.deserialize(pathlib.Path("ddetr.stablehlo").read_bytes())
    logits, pred_boxes = exported.call(pixel_values, pixel_mask)   # no model code needed

The file is `jax.export.Exported.serialize()` of `jax.jit(Detector.model_function())`: the
StableHLO module of the whole model with its weights as constants, its input and output
shapes, and the platform it was lowered for (`jax.default_backend()` at export: export on the
kind of device you serve on). jax keeps reading serialized modules for at least 6 months of
releases (jax.export's compatibility guarantee). The model's own sampling core is exported as it
runs in JAX (the `"auto"` implementation for that backend), so a reloaded program computes what
`Detector` computes.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax

from deformable_detr_jax.export.common import as_detector, atomic_output, check_input, check_output


def to_exported(
    model: Any, *, height: int, width: int, batch: int = 1, dtype: str = "float32"
) -> jax.export.Exported:
    """The `jax.export.Exported` of `model` (see `export_stablehlo`), not written anywhere."""
    detector = as_detector(model, dtype)
    spec = check_input(detector.config, height, width, batch)
    return jax.export.export(jax.jit(detector.model_function()))(*spec.shapes)


def export_stablehlo(
    model: Any,
    out: str | os.PathLike,
    *,
    height: int,
    width: int,
    batch: int = 1,
    dtype: str = "float32",
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes `model` as a serialized `jax.export.Exported` for `pixel_values [batch, height,
    width, 3]` float32 and `pixel_mask [batch, height, width]` bool -> `(logits, pred_boxes)`
    float32. Arguments and errors as `export_onnx`; nothing is written on any error."""
    path = check_output(out, overwrite)
    data = to_exported(model, height=height, width=width, batch=batch, dtype=dtype).serialize()
    with atomic_output(path, overwrite) as tmp:
        tmp.write_bytes(data)
    return path


def load_stablehlo(path: str | os.PathLike) -> Callable[..., Any]:
    """`(pixel_values, pixel_mask) -> (logits, pred_boxes)` from a file `export_stablehlo`
    wrote (jitted `jax.export.deserialize(...).call`)."""
    exported = jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
    return jax.jit(exported.call)
