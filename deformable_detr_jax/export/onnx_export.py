"""ONNX export through jax2onnx, opset `OPSET`, standard operators only, weights inside.

jax2onnx (a maintained JAX -> ONNX converter) traces `Detector.model_function()` and lowers it
primitive by primitive; `onnx_rules()` adds the two rules it lacks (the sampling core as ONNX
`GridSample`, the NHWC max pool). The result is checked with `onnx.checker` (full check, with
shape inference) and written as one `.onnx` file, the weights as initializers. Its metadata
(`metadata_props`) records the model config (`config`, transformers' config.json), the
pre-processing (`preprocessor`, preprocessor_config.json), the input size and the dtype, so a
server can pre- and post-process without this package.

Installed by the `[export]` extra plus jax2onnx without its dependencies (its metadata pins
orbax-checkpoint < 0.11.37, older than this package needs; it imports none of the pinned
packages to convert a Flax NNX model): `pip install ".[export]" && pip install --no-deps
jax2onnx==0.17.1`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
from collections.abc import Iterator
from typing import Any

from deformable_detr_jax.export.common import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    ExportError,
    as_detector,
    atomic_output,
    check_input,
    check_output,
)

# ONNX opset of the exported graph (GridSample's linear mode and bfloat16 types need >= 20;
# onnxruntime >= 1.20 runs opset 23).
OPSET = 23
JAX2ONNX_VERSION = "0.17.1"
_INSTALL = (
    "pip install 'deformable_detr_jax[export]' && "
    f"pip install --no-deps jax2onnx=={JAX2ONNX_VERSION}"
)
_PROTOBUF_LIMIT = 2**31 - 1  # one protobuf message: larger models need external data


def _require():
    try:
        import jax2onnx  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs onnx and jax2onnx ({err}); install them: {_INSTALL}"
        ) from err


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """jax2onnx imports all its plugins and logs a traceback for each whose library (equinox,
    dm-pix) is not installed; those plugins are for other libraries' layers."""
    logger = logging.getLogger("jax2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _drop_unused_initializers(graph) -> None:
    """jax2onnx leaves a few shape constants no node reads (onnxruntime warns about each)."""
    used = {name for node in graph.node for name in node.input}
    used |= {value.name for value in graph.output}
    keep = [tensor for tensor in graph.initializer if tensor.name in used]
    if len(keep) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def to_onnx_proto(model: Any, *, height: int, width: int, batch: int = 1, dtype: str = "float32"):
    """The checked `onnx.ModelProto` of `model` (see `export_onnx`), not written anywhere."""
    if dtype != "float32":
        raise ExportError(
            f"ONNX export is float32 only (dtype={dtype!r}): opset {OPSET} has no bfloat16 "
            "Einsum and onnxruntime's CPU provider no bfloat16 kernels for most operators; export "
            "bfloat16 as --format stablehlo, or convert the float32 ONNX model with ONNX tools"
        )
    _require()
    import jax2onnx
    import onnx

    detector = as_detector(model, dtype)
    spec = check_input(detector.config, height, width, batch)
    with _quiet_converter():
        from deformable_detr_jax.export.onnx_rules import flat_function, onnx_rules

        with onnx_rules():
            proto = jax2onnx.to_onnx(
                flat_function(detector.model_function(), spec.shapes),
                list(spec.shapes),
                model_name="deformable_detr",
                opset=OPSET,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
            )
    _drop_unused_initializers(proto.graph)
    metadata = {
        "producer": "deformable_detr_jax",
        "config": json.dumps(detector.config.to_hf()),
        "preprocessor": json.dumps(detector.processor.to_dict()),
        "input_size": json.dumps({"batch": spec.batch, "height": spec.height, "width": spec.width}),
        "dtype": detector.dtype.name,
        "padding_invariant": json.dumps(detector.padding_invariant),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "deformable_detr_jax (jax2onnx)"
    if proto.ByteSize() > _PROTOBUF_LIMIT:
        raise ExportError(
            f"the ONNX model is {proto.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB limit "
            "for one file"
        )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(
    model: Any,
    out: str | os.PathLike,
    *,
    height: int,
    width: int,
    batch: int = 1,
    dtype: str = "float32",
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes `model` as one ONNX file for `pixel_values [batch, height, width, 3]` float32
    and `pixel_mask [batch, height, width]` bool -> `logits`, `pred_boxes` float32.

    Args:
      model: a path `Detector.from_pretrained` reads, a `Detector` or a
        `DeformableDetrForObjectDetection`.
      out: the `.onnx` file to write (its folder is created).
      height, width, batch: the static input size (pad images to it, mask False on padding).
      dtype: "float32" only (bfloat16: `ExportError`, see `to_onnx_proto`; StableHLO takes it).
      overwrite: replace an existing `out`.

    Raises:
      UnsupportedSizeError: a size the model cannot take. OutputExistsError: `out` exists.
      ExportError: anything else the export cannot do. ImportError: the `[export]` extra or
      jax2onnx is missing. The loaders' errors (FileNotFoundError, CheckpointError) for a
      path that is not a model. Nothing is written on any error.
    """
    path = check_output(out, overwrite)
    proto = to_onnx_proto(model, height=height, width=width, batch=batch, dtype=dtype)
    import onnx

    with atomic_output(path, overwrite) as tmp:
        onnx.save_model(proto, os.fspath(tmp))
    return path
