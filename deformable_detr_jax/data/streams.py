"""The element stream under `Batches`: which record sits at each position of this process's
stream (`Order`), one decoded, augmented, normalised example per position (`Loader`), and the two
interchangeable backends that run the loader ahead of the consumer (`ThreadStream`,
`GrainStream`; see `pipeline.py`'s docstring for the determinism they keep)."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
from typing import Any

import numpy as np

from deformable_detr_jax.data import transforms
from deformable_detr_jax.processing.image_processor import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageError,
)


def grain_available() -> bool:
    try:
        import grain  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- order


@functools.lru_cache(maxsize=4)
def _epoch_indices(order: Order, epoch: int) -> np.ndarray:
    shard = np.arange(order.process_index, order.num_used, order.process_count, dtype=np.int64)
    if order.shuffle:
        shard = shard[np.random.default_rng([order.seed, epoch]).permutation(shard.size)]
    return shard


@dataclasses.dataclass(frozen=True)
class Order:
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


class Loader:
    """position -> one decoded, augmented, normalised example (or a skip / filler marker).

    Picklable, so grain worker processes can run it."""

    def __init__(self, source, order: Order, augment: transforms.AugmentConfig):
        self.source, self.order, self.augment = source, order, augment
        self.mean = np.float32(255) * np.asarray(IMAGENET_DEFAULT_MEAN, dtype=np.float32)
        self.std = np.float32(255) * np.asarray(IMAGENET_DEFAULT_STD, dtype=np.float32)

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
            "image": (image.astype(np.float32) - self.mean) / self.std,
            "boxes": np.asarray(sample["boxes"], dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(sample["labels"], dtype=np.int32).reshape(-1),
            "image_id": int(record["image_id"]),
            "size": image.shape[:2],
            "orig_size": record["image"].shape[:2],
        }


# ----------------------------------------------------------------------------- element streams


class ThreadStream:
    """Elements in position order; a thread pool computes up to `lookahead` of them ahead."""

    def __init__(self, loader: Loader, length: int, num_threads: int, lookahead: int):
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


class GrainStream:
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
