"""Host batches -> the global arrays the jitted steps take (one process or several)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from deformable_detr_jax.training import mesh as mesh_lib
from deformable_detr_jax.training.step import TRAIN_KEYS


def stack_micro_batches(
    batches: Sequence[Mapping[str, np.ndarray]], shape: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    """`accum` host batches -> one `(accum, bs, ...)` batch of `TRAIN_KEYS`, images zero-padded
    (mask False) to the largest height and width among them, or to `shape`."""
    height = max(b["pixel_values"].shape[1] for b in batches)
    width = max(b["pixel_values"].shape[2] for b in batches)
    if shape is not None:
        height, width = max(height, shape[0]), max(width, shape[1])
    out = {}
    for key in TRAIN_KEYS:
        arrays = []
        for b in batches:
            array = np.asarray(b[key])
            if key in ("pixel_values", "pixel_mask"):
                pad = [(0, 0), (0, height - array.shape[1]), (0, width - array.shape[2])]
                array = np.pad(array, pad + [(0, 0)] * (array.ndim - 3))
            arrays.append(array)
        out[key] = np.stack(arrays)
    return out


def pad_images(batch: Mapping[str, np.ndarray], height: int, width: int) -> dict[str, np.ndarray]:
    """`pixel_values (bs, h, w, 3)` / `pixel_mask (bs, h, w)` zero-padded (mask False) to
    `(height, width)`; other entries unchanged."""
    out = dict(batch)
    for key in ("pixel_values", "pixel_mask"):
        array = np.asarray(batch[key])
        pad = [(0, 0), (0, height - array.shape[1]), (0, width - array.shape[2])]
        out[key] = np.pad(array, pad + [(0, 0)] * (array.ndim - 3))
    return out


def global_eval_batch(local: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's evaluation batch -> global arrays (image sizes agreed across processes)."""
    if jax.process_count() > 1:
        height, width = mesh_lib.agree_on_max(local["pixel_values"].shape[1:3])
        local = pad_images(local, height, width)
    return mesh_lib.host_to_global(local, mesh)


def global_train_batch(batches: Sequence[Mapping[str, np.ndarray]], mesh) -> dict[str, jax.Array]:
    """This process's micro-batches -> the global `(accum, bs, ...)` batch on the mesh. With
    several processes the padded image size is agreed first (each pads to the largest)."""
    local = stack_micro_batches(batches)
    if jax.process_count() > 1:
        shape = mesh_lib.agree_on_max(local["pixel_values"].shape[2:4])
        local = stack_micro_batches(batches, shape)
    return mesh_lib.host_to_global(local, mesh, batch_axis=1)
