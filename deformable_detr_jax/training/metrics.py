"""Training metrics: a JSONL log, TensorBoard event files and a progress line.

    workdir/metrics.jsonl   one JSON object per logged step: {"step", "time", "split", ...}
    workdir/tensorboard/    events.out.tfevents.* (scalars, readable by TensorBoard)

The TensorBoard writer is the file format itself (TFRecord framing with masked CRC-32C around
`Event` protocol buffers holding `Summary.Value.simple_value`), a few dozen lines, so training
needs neither TensorFlow nor tensorboard installed. Only process 0 writes (`MetricsWriter`
does nothing elsewhere).
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

# ----------------------------------------------------------------------------- TFRecord / Event


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float,
    step: int,
    *,
    scalars: Mapping[str, float] | None = None,
    file_version: str | None = None,
) -> bytes:
    """A serialized `tensorboard.Event` (wall_time=1, step=2, file_version=3, summary=5)."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        summary = b""
        for tag, value in scalars.items():
            # Summary.Value: tag=1 (string), simple_value=2 (float)
            entry = _field_bytes(1, str(tag).encode()) + _varint(2 << 3 | 5)
            summary += _field_bytes(1, entry + struct.pack("<f", float(value)))
        out += _field_bytes(5, summary)
    return out


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", _masked_crc(length))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


def read_tfrecords(path: str | os.PathLike) -> list[bytes]:
    """The records of a TFRecord file, checking both CRCs (for tests and tools)."""
    records = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
                raise ValueError(f"{path}: corrupt record length")
            data = f.read(length)
            if struct.unpack("<I", f.read(4))[0] != _masked_crc(data):
                raise ValueError(f"{path}: corrupt record")
            records.append(data)
    return records


class TensorBoardWriter:
    """Appends scalar summaries to a new `events.out.tfevents.*` file in `logdir`."""

    def __init__(self, logdir: str | os.PathLike):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")  # noqa: SIM115 (closed in close())
        self._file.write(tfrecord(encode_event(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in values.items() if v is not None}
        self._file.write(tfrecord(encode_event(time.time(), int(step), scalars=finite)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ----------------------------------------------------------------------------- JSONL + both


def _json_number(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else str(value)  # "nan" / "inf" stay readable JSON


class MetricsWriter:
    """`write(step, {"loss": ...}, split="train")` to metrics.jsonl and TensorBoard (tag
    `split/name`). Inactive (writes nothing) when `active` is False, e.g. on processes > 0."""

    def __init__(
        self, workdir: str | os.PathLike, *, active: bool = True, tensorboard: bool = True
    ):
        self.active = active
        self.jsonl_path = os.path.join(os.fspath(workdir), "metrics.jsonl")
        self._jsonl = self._tb = None
        if active:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a")  # noqa: SIM115 (closed in close())
            if tensorboard:
                self._tb = TensorBoardWriter(os.path.join(os.fspath(workdir), "tensorboard"))

    def write(self, step: int, values: Mapping[str, float], *, split: str = "train") -> None:
        if not self.active:
            return
        record = {"step": int(step), "time": round(time.time(), 3), "split": split}
        record.update({k: _json_number(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.scalars(step, {f"{split}/{k}": float(v) for k, v in values.items()})

    def close(self) -> None:
        for f in (self._jsonl, self._tb):
            if f is not None:
                f.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- progress


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class ProgressBar:
    """`step 120/1000 [#####.....] 2.31 steps/s 18.5 img/s ETA 6m21s loss 1.234`.

    Rates are measured over the steps since the previous update; the loop calls `restart(step)`
    once the first step has compiled, so the first rate (and ETA) counts steps, not compiling. On
    a terminal the line redraws in place; otherwise it prints one line per update.
    `active=False` silences it (processes > 0).
    """

    def __init__(
        self,
        total_steps: int,
        images_per_step: int,
        *,
        start_step: int = 0,
        stream: TextIO | None = None,
        active: bool = True,
        width: int = 20,
    ):
        self.total, self.images_per_step = int(total_steps), int(images_per_step)
        self.stream = stream or sys.stderr
        self.active, self.width = active, width
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_step, self._last_time = int(start_step), time.perf_counter()
        self.steps_per_second = float("nan")

    def restart(self, step: int) -> None:
        """Measures the next rate from `step` on (after a compile: the first update's ETA is
        then the steps' own)."""
        self._last_step, self._last_time = int(step), time.perf_counter()

    def update(self, step: int, values: Mapping[str, float] | None = None) -> str:
        now = time.perf_counter()
        if step > self._last_step:
            self.steps_per_second = (step - self._last_step) / max(now - self._last_time, 1e-9)
            self._last_step, self._last_time = step, now
        rate = self.steps_per_second
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        filled = int(self.width * min(step / max(self.total, 1), 1.0))
        parts = [
            f"step {step}/{self.total}",
            "[" + "#" * filled + "." * (self.width - filled) + "]",
            f"{rate:.2f} steps/s",
            f"{rate * self.images_per_step:.1f} img/s",
            f"ETA {format_duration(eta) if math.isfinite(eta) else '?'}",
        ]
        parts += [f"{k} {float(v):.4g}" for k, v in (values or {}).items()]
        line = " ".join(parts)
        if self.active:
            self.stream.write(("\r" + line + "\x1b[K") if self._tty else line + "\n")
            self.stream.flush()
        return line

    def close(self) -> None:
        if self.active and self._tty:
            self.stream.write("\n")
            self.stream.flush()


class EvalProgress:
    """What an evaluation is doing: `evaluating 200 images...` when it starts, then at most one
    `evaluated 64/200 images (5 s)` line every `every` seconds while it runs (the first batch
    also compiles the evaluation step), through `log` (a `logging` call; None: silent)."""

    def __init__(self, total_images: int, images_per_batch: int, log=None, every: float = 5.0):
        self.total, self.per_batch = int(total_images), max(int(images_per_batch), 1)
        self.log, self.every = log, every

    def wrap(self, batches):
        """Yields `batches`, logging the progress as they are consumed."""
        if self.log is not None:
            batches_count = -(-self.total // self.per_batch)
            self.log(
                "evaluating %d images (%d batches of %d; the first compiles the evaluation "
                "step)...",
                self.total,
                batches_count,
                self.per_batch,
            )
        start = last = time.perf_counter()
        for done, batch in enumerate(batches):
            now = time.perf_counter()
            if self.log is not None and done and now - last >= self.every:
                images = min(done * self.per_batch, self.total)
                self.log("evaluated %d/%d images (%.0f s)", images, self.total, now - start)
                last = now
            yield batch
