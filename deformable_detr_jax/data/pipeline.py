"""Batches for training and evaluation: shard, shuffle, augment, pad to buckets, resume.

    source -> this process's shard -> per-epoch shuffle -> decode + augment + normalise (parallel)
           -> skip corrupt images -> pad images to a bucket and targets to `max_boxes` -> batch

Determinism: position `p` of a process's stream is record `shard[perm_e[p % len(shard)]]` of
epoch `e = p // len(shard)`, where the shard is fixed (records `process_index::process_count`)
and `perm_e` comes from `(seed, e)`; an example's augmentation draws from `(seed, e, index)`. So
the batches depend only on the settings, not on thread timing, and `state()` (the stream position
after the last batch handed out, with the counters) restores the exact next batch.

Two interchangeable backends produce identical batches: `"grain"` (`grain.MapDataset` ->
`to_iter_dataset` with reader threads, optional `mp_prefetch` worker processes, grain's iterator
state) and `"python"` (a thread pool reading ahead in order); `"auto"` picks grain when installed.

Batches are numpy dicts:
    pixel_values (bs, height, width, 3) float32, ImageNet-normalised, zero padding bottom-right
    pixel_mask   (bs, height, width) bool, True on real pixels
    labels       (bs, max_boxes) int32;  boxes (bs, max_boxes, 4) float32 cxcywh normalised to
                 the unpadded image;  mask (bs, max_boxes) bool, True on real boxes
    image_id (bs,) int64;  size, orig_size (bs, 2) int32 (height, width) after / before transforms
    valid        (bs,) bool: False on the filler entries of an evaluation's last batch
with (height, width) the smallest bucket holding the batch's largest image, so `jit` sees only
a handful of shapes.

Training stream: endless (or `num_epochs`), each shard cut to the same length on every process
(`len(source) // process_count`), batches may straddle epochs. Evaluation: every record once, in
order, and the same number of batches on every process (the last ones filled with `valid=False`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from deformable_detr_jax.data import transforms
from deformable_detr_jax.data.box_checks import DataError
from deformable_detr_jax.data.collation import collate
from deformable_detr_jax.data.streams import (
    GrainStream,
    Loader,
    Order,
    ThreadStream,
    grain_available,
)
from deformable_detr_jax.processing.image_processor import bucket_sizes

logger = logging.getLogger(__name__)


class NoReadableImagesError(DataError, RuntimeError):
    """Every image of a process's shard failed to read (wrong paths, a broken dataset)."""


BACKENDS = ("auto", "grain", "python")


class Batches:
    """Iterator of padded batches (module docstring) with `state()` / `restore(state)` and
    `stats` (`skipped_images`, `dropped_boxes`, `batches`). Build it with `make_batches`."""

    def __init__(
        self,
        stream,
        loader: Loader,
        settings: dict[str, Any],
        *,
        batch_size: int,
        max_boxes: int,
        buckets,
        pad_to,
        num_batches: int | None,
        num_labels: int | None,
    ):
        self._stream, self._loader, self._settings = stream, loader, settings
        self.batch_size, self.max_boxes = batch_size, max_boxes
        self.buckets, self.pad_to, self.num_labels = buckets, pad_to, num_labels
        self.num_batches = num_batches  # evaluation: batches per process; training: None
        self.train = loader.order.train
        self.shard_len = loader.order.shard_len
        self.stats = {"skipped_images": 0, "dropped_boxes": 0, "batches": 0}
        self._consecutive_skips = 0
        self._last_shape: tuple[int, int] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Batches per pass over this process's shard (training batches straddle epochs)."""
        return max(self.shard_len // self.batch_size, 1)

    def __iter__(self) -> Batches:
        return self

    def _skip(self, element: dict[str, Any]) -> None:
        self.stats["skipped_images"] += 1
        self._consecutive_skips += 1
        logger.warning(
            "skipping %s: %s (%d images skipped so far)",
            element["what"],
            element["reason"],
            self.stats["skipped_images"],
        )
        if self._consecutive_skips >= self.shard_len:
            raise NoReadableImagesError(
                f"no image of this process's shard ({self.shard_len} records) could be read; the "
                f"last: {element['what']}: {element['reason']}. Check the dataset paths and files."
            )

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self.stats["batches"] >= self.num_batches:
            raise StopIteration
        examples, exhausted = [], False
        while len(examples) < self.batch_size:
            try:
                element = next(self._stream)
            except StopIteration:
                exhausted = True
                break
            if element["kind"] == "skipped":
                self._skip(element)
            elif element["kind"] == "example":
                self._consecutive_skips = 0
                examples.append(element)
        if exhausted and self.train:  # a finite training stream drops its last partial batch
            raise StopIteration
        if exhausted and not examples and self.num_batches is None:
            raise StopIteration
        batch, dropped = collate(
            examples,
            self.batch_size,
            self.max_boxes,
            buckets=self.buckets,
            pad_to=self.pad_to,
            filler_shape=self._last_shape,
        )
        self._last_shape = batch["pixel_mask"].shape[1:]
        self.stats["dropped_boxes"] += dropped
        self.stats["batches"] += 1
        if self.num_labels is not None:
            from deformable_detr_jax.criterion.loss import validate_targets

            validate_targets(batch["labels"], batch["boxes"], batch["mask"], self.num_labels)
        return batch

    def state(self) -> dict[str, Any]:
        """Where the next batch starts, plus the counters and the settings it belongs to."""
        return {
            "stream": self._stream.get_state(),
            "stats": dict(self.stats),
            "settings": dict(self._settings),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly after the batch at which `state()` was taken."""
        saved = dict(state.get("settings", {}))
        differ = {k: (saved.get(k), v) for k, v in self._settings.items() if saved.get(k) != v}
        if differ:
            raise ValueError(
                "the data state was saved with other settings (saved, now): "
                + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in differ.items())
                + "; restore it with the same data settings and process layout"
            )
        self._stream.set_state(state["stream"])
        self.stats = {k: int(v) for k, v in state["stats"].items()}
        self._consecutive_skips = 0

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_batches(
    source,
    *,
    batch_size: int,
    train: bool = True,
    seed: int = 0,
    augment: transforms.AugmentConfig | None = None,
    max_boxes: int = 100,
    buckets: Sequence[int] | None = None,
    pad_to: tuple[int, int] | None = None,
    num_labels: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    num_threads: int | None = None,
    num_workers: int = 0,
    lookahead: int | None = None,
    backend: str = "auto",
    state: dict[str, Any] | None = None,
) -> Batches:
    """Batches of `source` for this process (see the module docstring).

    Args:
      source: a random-access source (`coco_json.py`, `yolo.py`, `tfds_coco.py`,
        `hf_datasets.py`, `shapes.py`).
      batch_size: images per batch on this process.
      train: augmented, shuffled, endless stream (or `num_epochs` epochs); else the evaluation
        transform over every record once.
      augment: sizes of the transforms (default: the DETR COCO recipe).
      max_boxes: targets padded (or cut) to this many boxes per image.
      buckets: allowed padded side lengths; default `bucket_sizes(largest output side, 128)`.
      pad_to: (height, width) every batch is padded to instead (one compiled shape).
      num_labels: the model's; checked against the source and each batch's targets.
      process_index, process_count: this host's shard; default `jax.process_index()` / `_count()`.
      num_epochs: training passes over the shard (None: endless); the last partial batch is dropped.
      num_threads, num_workers: reader threads (0: read in the caller's thread); grain worker
        processes (0: none).
      lookahead: examples prepared ahead of the one handed out (default 2 * batch_size).
      backend: "grain", "python" or "auto" (grain when installed).
      state: a `Batches.state()` to resume from.
    """
    augment = transforms.AugmentConfig() if augment is None else augment
    _check_positive(batch_size=batch_size, max_boxes=max_boxes)
    process_index, process_count = _process_layout(process_index, process_count)
    num_records = len(source)
    if num_records < process_count:
        raise ValueError(
            f"the data source has {num_records} images, fewer than the {process_count} processes"
        )
    source_labels = getattr(source, "num_labels", None)
    if num_labels is not None and source_labels is not None and source_labels > num_labels:
        raise ValueError(
            f"the data has {source_labels} classes (label ids up to {source_labels - 1}) but the "
            f"model has num_labels={num_labels}; set the model's num_labels to {source_labels} or more"
        )
    pad_to, buckets = _padding(augment, train, pad_to, buckets)
    backend = _resolve_backend(backend, num_workers)
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be positive or None (endless), got {num_epochs}")

    order = Order(num_records, process_index, process_count, int(seed), bool(train))
    length, num_batches = _stream_length(order, batch_size, num_epochs)
    num_threads = min(4, os.cpu_count() or 1) if num_threads is None else int(num_threads)
    lookahead = 2 * batch_size if lookahead is None else int(lookahead)
    loader = Loader(source, order, augment)
    if backend == "grain":
        stream = GrainStream(loader, length, num_threads, lookahead, int(num_workers))
    else:
        stream = ThreadStream(loader, length, num_threads, lookahead)
    settings = {
        "backend": backend,
        "num_records": num_records,
        "process_index": process_index,
        "process_count": process_count,
        "seed": int(seed),
        "train": bool(train),
        "batch_size": int(batch_size),
        "num_workers": int(num_workers),
    }
    batches = Batches(
        stream,
        loader,
        settings,
        batch_size=int(batch_size),
        max_boxes=int(max_boxes),
        buckets=None if pad_to else buckets,
        pad_to=pad_to,
        num_batches=num_batches,
        num_labels=num_labels if num_labels is not None else source_labels,
    )
    if state is not None:
        batches.restore(state)
    return batches


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """This host's (process_index, process_count): jax's where not given, checked."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
        )
    return int(process_index), int(process_count)


def _padding(
    augment: transforms.AugmentConfig,
    train: bool,
    pad_to: tuple[int, int] | None,
    buckets: Sequence[int] | None,
) -> tuple[tuple[int, int] | None, tuple[int, ...]]:
    """(pad_to, buckets) checked against the largest image side the transforms output."""
    largest = augment.max_size if train else augment.eval_max_size
    if pad_to is not None:
        pad_to = (int(pad_to[0]), int(pad_to[1]))
        if min(pad_to) < largest:
            raise ValueError(
                f"pad_to={pad_to} is smaller than the largest image side the transforms output "
                f"({largest}, augment.{'max_size' if train else 'eval_max_size'}); raise pad_to "
                "or lower the augmentation sizes"
            )
    buckets = (
        bucket_sizes(largest, 128) if buckets is None else tuple(sorted(int(b) for b in buckets))
    )
    if not buckets or min(buckets) < 1 or max(buckets) < largest:
        raise ValueError(
            f"buckets={buckets} must be positive and reach the largest image side the transforms "
            f"output ({largest}); add a bucket >= {largest}"
        )
    return pad_to, buckets


def _resolve_backend(backend: str, num_workers: int) -> str:
    """ "grain" or "python" for `backend` ("auto": grain when installed), checked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "grain" if grain_available() else "python"
    if backend == "grain" and not grain_available():
        raise ImportError("backend='grain' needs grain: `pip install grain`")
    if num_workers and backend != "grain":
        raise ValueError("num_workers > 0 runs grain worker processes; use backend='grain'")
    return backend


def _stream_length(order: Order, batch_size: int, num_epochs: int | None) -> tuple[int, int | None]:
    """(positions in the stream, batches per process: None for training)."""
    if order.train:
        epochs = num_epochs if num_epochs is not None else (2**62) // max(order.shard_len, 1)
        return order.shard_len * epochs, None
    # evaluation: every process runs the same number of batches, the longest shard's
    num_batches = math.ceil(math.ceil(order.num_records / order.process_count) / batch_size)
    return num_batches * batch_size, num_batches
