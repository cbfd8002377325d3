"""What both export formats share: the model to export, its input size, errors, atomic writes.

The exported program is `Detector.model_function()`: the model with `padding_invariant=True`
(the padding of a bucket is masked all the way through, so the outputs on a padded input are
those of the image alone; a `Detector` passed in keeps its own setting) in the compute dtype,
logits and boxes cast to float32. Inputs:
`pixel_values [batch, height, width, 3]` float32 (normalised, NHWC, as `ImageProcessor` makes
them) and `pixel_mask [batch, height, width]` bool (True on real pixels); outputs `logits
[batch, num_queries, num_labels]` and `pred_boxes [batch, num_queries, 4]` (cx, cy, w, h
normalised to the unpadded image), float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from deformable_detr_jax import file_modes
from deformable_detr_jax.inference.detector import Detector
from deformable_detr_jax.modeling import DeformableDetrForObjectDetection
from deformable_detr_jax.processing.image_processor import MIN_SIDE

FORMATS = ("onnx", "stablehlo")
DTYPES = ("float32", "bfloat16")
INPUT_NAMES = ("pixel_values", "pixel_mask")
OUTPUT_NAMES = ("logits", "pred_boxes")


class ExportError(ValueError):
    """The model could not be exported as asked."""


class UnsupportedSizeError(ExportError):
    """The model cannot run at the requested input size or batch."""


class UnknownFormatError(ExportError):
    """A format other than `FORMATS`."""


class OutputExistsError(ExportError, FileExistsError):
    """The output file exists (pass `overwrite=True` to replace it)."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The static input shape of an exported program."""

    batch: int
    height: int
    width: int

    @property
    def shapes(self) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """`pixel_values [batch, height, width, 3]` float32, `pixel_mask [batch, height, width]`."""
        return (
            jax.ShapeDtypeStruct((self.batch, self.height, self.width, 3), jnp.float32),
            jax.ShapeDtypeStruct((self.batch, self.height, self.width), jnp.bool_),
        )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise UnsupportedSizeError(f"{name} must be a positive integer, got {value!r}")
    value = int(value)
    if value < 1:
        raise UnsupportedSizeError(f"{name} must be a positive integer, got {value}")
    return value


def check_input(config, height: Any, width: Any, batch: Any = 1) -> InputSpec:
    """The `InputSpec`, or `UnsupportedSizeError` saying why the model cannot take it.

    Every side must be at least `MIN_SIDE` pixels (one cell of the stride-32 backbone level); a
    two-stage model needs at least `two_stage_num_proposals` feature positions to pick its
    proposals from.
    """
    height, width = _positive_int("height", height), _positive_int("width", width)
    batch = _positive_int("batch", batch)
    if height < MIN_SIDE or width < MIN_SIDE:
        raise UnsupportedSizeError(
            f"the model needs an input of at least {MIN_SIDE}x{MIN_SIDE} pixels (its backbone "
            f"stride), got {height}x{width}; export at the padded size you will run "
            "(e.g. --height 800 --width 1216)"
        )
    if config.two_stage:
        positions = sum(h * w for h, w in feature_sizes(config, height, width))
        if positions < config.two_stage_num_proposals:
            raise UnsupportedSizeError(
                f"a two-stage model picks {config.two_stage_num_proposals} proposals from the "
                f"encoder's feature positions, but a {height}x{width} input has only "
                f"{positions}; export at a larger size"
            )
    return InputSpec(batch, height, width)


def _half(side: int) -> int:
    """Output side of a stride-2 layer (7x7 pad 3, 3x3 pad 1, max pool 3 pad 1): ceil(n / 2)."""
    return -(-side // 2)


def feature_sizes(config, height: int, width: int) -> list[tuple[int, int]]:
    """(h, w) of every feature level for a `height x width` input (`spatial_shapes`)."""
    h, w = _half(_half(height)), _half(_half(width))  # stem conv and max pool: stride 4
    stages = [(h, w)]
    for stage in range(1, 4):
        if not (config.dilation and stage == 3):  # DC5: the last stage keeps stride 16
            h, w = _half(h), _half(w)
        stages.append((h, w))
    sizes = [stages[i] for i in config.backbone_out_stages]
    while len(sizes) < config.num_feature_levels:  # extra 3x3 stride-2 levels
        sizes.append((_half(sizes[-1][0]), _half(sizes[-1][1])))
    return sizes


def as_detector(model: Any, dtype: str = "float32") -> Detector:
    """A `Detector` for `model`: a `Detector` (its dtype must match), a
    `DeformableDetrForObjectDetection`, or a path `Detector.from_pretrained` reads."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(model, Detector):
        if model.dtype != jnp.dtype(dtype):
            raise ExportError(
                f"the Detector computes in {model.dtype.name} but dtype={dtype!r} was asked; "
                "pass the model or a Detector of that dtype"
            )
        return model
    if isinstance(model, DeformableDetrForObjectDetection):
        return Detector(model, dtype=dtype, compile_cache=None)
    if isinstance(model, (str, os.PathLike)):
        return Detector.from_pretrained(model, dtype=dtype, compile_cache=None)
    raise TypeError(
        "model must be a path (a model folder or weights file), a Detector or a "
        f"DeformableDetrForObjectDetection, got {type(model).__name__}"
    )


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise UnknownFormatError(
            f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}"
        )
    return format


def check_output(out: str | os.PathLike, overwrite: bool) -> pathlib.Path:
    """`out` as a path; `OutputExistsError` when it exists and `overwrite` is False."""
    path = pathlib.Path(out)
    if path.is_dir():
        raise OutputExistsError(f"{os.fspath(out)!r} is a directory; give a file name to write")
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{os.fspath(out)!r} exists; choose another name or pass overwrite=True (--overwrite)"
        )
    return path


@contextlib.contextmanager
def atomic_output(path: pathlib.Path, overwrite: bool) -> Iterator[pathlib.Path]:
    """Yields a temporary file beside `path`; moved onto `path` only when the block succeeds.

    On any error the temporary file is removed and `path` is untouched: a failed export leaves
    no partial file behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkstemp: the output keeps this file's mode, and it should be the umask's
    tmp_path = file_modes.temporary_file(path.parent, f".{path.name}.", ".partial")
    try:
        yield tmp_path
        if path.exists() and not overwrite:  # appeared while exporting
            raise OutputExistsError(f"{os.fspath(path)!r} appeared while exporting; not replaced")
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
