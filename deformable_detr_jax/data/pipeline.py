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

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from deformable_detr_jax.data import transforms
from deformable_detr_jax.data.box_checks import DataError
from deformable_detr_jax.processing.image_processor import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    MIN_SIDE,
    ImageError,
    bucket_sizes,
)

logger = logging.getLogger(__name__)


class NoReadableImagesError(DataError, RuntimeError):
    """Every image of a process's shard failed to read (wrong paths, a broken dataset)."""


BACKENDS = ("auto", "grain", "python")
_PAD_BOX = (0.5, 0.5, 1.0, 1.0)  # a finite, valid box under mask False


def grain_available() -> bool:
    try:
        import grain  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- order


@functools.lru_cache(maxsize=4)
def _epoch_indices(order: _Order, epoch: int) -> np.ndarray:
    shard = np.arange(order.process_index, order.num_used, order.process_count, dtype=np.int64)
    if order.shuffle:
        shard = shard[np.random.default_rng([order.seed, epoch]).permutation(shard.size)]
    return shard


@dataclasses.dataclass(frozen=True)
class _Order:
    """Which record sits at each position of this process's stream."""

    num_records: int
    process_index: int
    process_count: int
    seed: int
    train: bool

    @property
    def shuffle(self) -> bool:
        return self.train

    @property
    def num_used(self) -> int:
        """Records that take part: training cuts the rest so that every shard has equal length."""
        if self.train:
            return self.num_records - self.num_records % self.process_count
        return self.num_records

    @property
    def shard_len(self) -> int:
        return len(range(self.process_index, self.num_used, self.process_count))

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, record index) at `position`."""
        epoch, offset = divmod(int(position), self.shard_len)
        return epoch, int(_epoch_indices(self, epoch)[offset])


# ----------------------------------------------------------------------------- one example


class _Loader:
    """position -> one decoded, augmented, normalised example (or a skip / filler marker).

    Picklable, so grain worker processes can run it."""

    def __init__(self, source, order: _Order, augment: transforms.AugmentConfig):
        self.source, self.order, self.augment = source, order, augment
        self._mean = np.float32(255) * np.asarray(IMAGENET_DEFAULT_MEAN, dtype=np.float32)
        self._std = np.float32(255) * np.asarray(IMAGENET_DEFAULT_STD, dtype=np.float32)

    def __call__(self, position: int) -> dict[str, Any]:
        if not self.order.train and position >= self.order.shard_len:
            return {"kind": "filler"}
        epoch, index = self.order.locate(position)
        try:
            record = self.source[index]
            if self.order.train:
                rng = np.random.default_rng([self.order.seed, epoch, index])
                sample = transforms.train_transform(record, rng, self.augment)
            else:
                sample = transforms.eval_transform(record, self.augment)
        except ImageError as err:
            return {"kind": "skipped", "what": self.source.describe(index), "reason": str(err)}
        image = sample["image"]
        return {
            "kind": "example",
            "image": (image.astype(np.float32) - self._mean) / self._std,
            "boxes": np.asarray(sample["boxes"], dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(sample["labels"], dtype=np.int32).reshape(-1),
            "image_id": int(record["image_id"]),
            "size": image.shape[:2],
            "orig_size": record["image"].shape[:2],
        }


# ----------------------------------------------------------------------------- element streams


class _ThreadStream:
    """Elements in position order; a thread pool computes up to `lookahead` of them ahead."""

    def __init__(self, loader: _Loader, length: int, num_threads: int, lookahead: int):
        self._loader, self._length = loader, length
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="data")
            if num_threads > 0
            else None
        )
        self._lookahead = max(lookahead, 1)
        self._position = 0  # next position handed out
        self._pending: collections.deque = collections.deque()

    def __next__(self) -> dict[str, Any]:
        if self._position >= self._length:
            raise StopIteration
        if self._pool is None:
            element = self._loader(self._position)
        else:
            submitted = self._position + len(self._pending)
            while len(self._pending) < self._lookahead and submitted < self._length:
                self._pending.append(self._pool.submit(self._loader, submitted))
                submitted += 1
            element = self._pending.popleft().result()
        self._position += 1
        return element

    def get_state(self) -> dict[str, Any]:
        return {"position": self._position}

    def set_state(self, state: dict[str, Any]) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._position = int(state["position"])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class _GrainStream:
    """The same elements through grain: `MapDataset.range(length).map(loader)`, read by threads,
    optionally in `num_workers` processes; state is grain's iterator state."""

    def __init__(self, loader, length: int, num_threads: int, lookahead: int, num_workers: int):
        import grain

        dataset = grain.MapDataset.range(length).map(loader)
        dataset = dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=max(num_threads, 1), prefetch_buffer_size=lookahead)
        )
        if num_workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults here)
                flags.FLAGS.mark_as_parsed()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        self._iterator = iter(dataset)

    def __next__(self) -> dict[str, Any]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


# ----------------------------------------------------------------------------- batching


def _round_up(side: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if bucket >= side:
            return bucket
    return side


def collate(
    examples: Sequence[dict[str, Any]],
    batch_size: int,
    max_boxes: int,
    *,
    buckets: Sequence[int] | None = None,
    pad_to: tuple[int, int] | None = None,
    filler_shape: tuple[int, int] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Pad `examples` (the `_Loader`'s dicts, at most `batch_size`) into one batch.

    Images go to `pad_to`, else to the batch's largest height and width each rounded up to
    `buckets`; missing entries are fillers (`valid` False, all masks False). Boxes past `max_boxes`
    are dropped. Returns the batch and how many boxes were dropped.
    """
    sizes = [ex["size"] for ex in examples]
    if pad_to is not None:
        height, width = pad_to
    elif sizes:
        height = max(h for h, _ in sizes)
        width = max(w for _, w in sizes)
        if buckets:
            height, width = _round_up(height, buckets), _round_up(width, buckets)
    elif filler_shape is not None:
        height, width = filler_shape
    else:
        height = width = min(buckets) if buckets else MIN_SIDE
    batch = {
        "pixel_values": np.zeros((batch_size, height, width, 3), dtype=np.float32),
        "pixel_mask": np.zeros((batch_size, height, width), dtype=bool),
        "labels": np.zeros((batch_size, max_boxes), dtype=np.int32),
        "boxes": np.tile(np.asarray(_PAD_BOX, dtype=np.float32), (batch_size, max_boxes, 1)),
        "mask": np.zeros((batch_size, max_boxes), dtype=bool),
        "image_id": np.full((batch_size,), -1, dtype=np.int64),
        "size": np.zeros((batch_size, 2), dtype=np.int32),
        "orig_size": np.zeros((batch_size, 2), dtype=np.int32),
        "valid": np.zeros((batch_size,), dtype=bool),
    }
    dropped = 0
    for i, ex in enumerate(examples):
        h, w = ex["size"]
        if h > height or w > width:
            raise ValueError(
                f"image {ex['image_id']} is {h} x {w} after transforms, larger than the padded "
                f"size {height} x {width}; raise pad_to or lower the augmentation sizes"
            )
        batch["pixel_values"][i, :h, :w] = ex["image"]
        batch["pixel_mask"][i, :h, :w] = True
        n = min(len(ex["labels"]), max_boxes)
        if len(ex["labels"]) > max_boxes:
            dropped += len(ex["labels"]) - max_boxes
            logger.warning(
                "image %d has %d boxes; keeping the first max_boxes=%d",
                ex["image_id"],
                len(ex["labels"]),
                max_boxes,
            )
        batch["labels"][i, :n] = ex["labels"][:n]
        batch["boxes"][i, :n] = ex["boxes"][:n]
        batch["mask"][i, :n] = True
        batch["image_id"][i] = ex["image_id"]
        batch["size"][i] = ex["size"]
        batch["orig_size"][i] = ex["orig_size"]
        batch["valid"][i] = True
    return batch, dropped


class Batches:
    """Iterator of padded batches (module docstring) with `state()` / `restore(state)` and
    `stats` (`skipped_images`, `dropped_boxes`, `batches`). Build it with `make_batches`."""

    def __init__(
        self,
        stream,
        loader: _Loader,
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
      source: a random-access source (`sources.py`, `shapes.py`).
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
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(max_boxes, (int, np.integer)) or max_boxes < 1:
        raise ValueError(f"max_boxes must be a positive int, got {max_boxes!r}")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
        )
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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "grain" if grain_available() else "python"
    if backend == "grain" and not grain_available():
        raise ImportError("backend='grain' needs grain: `pip install grain`")
    if num_workers and backend != "grain":
        raise ValueError("num_workers > 0 runs grain worker processes; use backend='grain'")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be positive or None (endless), got {num_epochs}")

    order = _Order(num_records, int(process_index), int(process_count), int(seed), bool(train))
    num_batches = None
    if train:
        epochs = num_epochs if num_epochs is not None else (2**62) // max(order.shard_len, 1)
        length = order.shard_len * epochs
    else:  # every process runs the same number of batches, the longest shard's
        num_batches = math.ceil(math.ceil(num_records / process_count) / batch_size)
        length = num_batches * batch_size
    num_threads = min(4, os.cpu_count() or 1) if num_threads is None else int(num_threads)
    lookahead = 2 * batch_size if lookahead is None else int(lookahead)
    loader = _Loader(source, order, augment)
    if backend == "grain":
        stream = _GrainStream(loader, length, num_threads, lookahead, int(num_workers))
    else:
        stream = _ThreadStream(loader, length, num_threads, lookahead)
    settings = {
        "backend": backend,
        "num_records": num_records,
        "process_index": int(process_index),
        "process_count": int(process_count),
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
