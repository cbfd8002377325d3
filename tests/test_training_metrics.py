"""The training metrics (`deformable_detr_jax.training.metrics`): the JSONL log, TensorBoard
event files and the progress line, checked value by value against known inputs.

The package writes TensorBoard's file format itself (neither tensorboard nor TensorFlow is a
dependency, and neither is installed in CI), so the event files are read here by an
independent reader written from the format's specification: TFRecord framing (length, masked
CRC-32C of the length, data, masked CRC-32C of the data; the CRC computed bit by bit, not by
the package's table) around `tensorboard.Event` protocol buffers (wall_time = 1 double,
step = 2 varint, file_version = 3 string, summary = 5 { value = 1 { tag = 1 string,
simple_value = 2 float } }). The clock is replaced, so times, rates and ETAs are exact.
"""

from __future__ import annotations

import io
import json
import math
import struct
import types

import numpy as np
import pytest

from deformable_detr_jax.training import metrics
from deformable_detr_jax.training.metrics import EvalProgress, MetricsWriter, ProgressBar

# ----------------------------------------------------------------------------- a reader


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path) -> list[bytes]:
    blob, records, at = path.read_bytes(), [], 0
    while at < len(blob):
        header = blob[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", blob[at + 8 : at + 12])[0] == _masked(header), at
        data = blob[at + 12 : at + 12 + length]
        assert struct.unpack("<I", blob[at + 12 + length : at + 16 + length])[0] == _masked(data)
        records.append(data)
        at += 16 + length
    return records


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def _fields(data: bytes) -> list[tuple[int, int | float | bytes]]:
    """(field number, value) pairs of a protocol buffer message: the wire types used here."""
    out, at = [], 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 1:
            (value,), at = struct.unpack("<d", data[at : at + 8]), at + 8
        elif wire == 5:
            (value,), at = struct.unpack("<f", data[at : at + 4]), at + 4
        elif wire == 2:
            length, at = _varint(data, at)
            value, at = data[at : at + length], at + length
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        out.append((number, value))
    return out


def _event(record: bytes) -> dict:
    """An Event as {"wall_time", "step", "file_version", "scalars": {tag: value}}."""
    event = {"step": 0, "scalars": {}}
    for number, value in _fields(record):
        if number == 1:
            event["wall_time"] = value
        elif number == 2:
            event["step"] = value
        elif number == 3:
            event["file_version"] = value.decode()
        elif number == 5:
            for summary_field, entry in _fields(value):
                assert summary_field == 1
                parts = dict(_fields(entry))
                event["scalars"][parts[1].decode()] = parts[2]
        else:
            raise AssertionError(f"unexpected Event field {number}")
    return event


# ----------------------------------------------------------------------------- a clock


class _Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    """The metrics module's `time.time` and `time.perf_counter`, under the test's control."""
    fake = _Clock(1_700_000_000.25)
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(time=fake, perf_counter=fake))
    return fake


# ----------------------------------------------------------------------------- the writer


def test_metrics_writer_writes_jsonl_and_tensorboard_events(tmp_path, clock):
    writer = MetricsWriter(tmp_path)
    writer.write(5, {"loss": 1.5, "lr_default": 2e-4})
    clock.now += 10.0
    writer.write(10, {"loss": float("nan"), "grad_norm": 3.25})
    writer.write(10, {"AP": 0.25}, split="eval")
    writer.close()

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 5, "time": 1_700_000_000.25, "split": "train", "loss": 1.5, "lr_default": 2e-4},
        {"step": 10, "time": 1_700_000_010.25, "split": "train", "loss": "nan", "grad_norm": 3.25},
        {"step": 10, "time": 1_700_000_010.25, "split": "eval", "AP": 0.25},
    ]

    (path,) = (tmp_path / "tensorboard").iterdir()
    assert path.name.startswith("events.out.tfevents.1700000000.")
    header, *events = [_event(r) for r in _records(path)]
    assert header == {
        "wall_time": 1_700_000_000.25,
        "step": 0,
        "file_version": "brain.Event:2",
        "scalars": {},
    }
    assert [(e["wall_time"], e["step"]) for e in events] == [
        (1_700_000_000.25, 5),
        (1_700_000_010.25, 10),
        (1_700_000_010.25, 10),
    ]
    assert events[0]["scalars"] == {
        "train/loss": 1.5,
        "train/lr_default": pytest.approx(2e-4, rel=1e-7),  # stored as float32
    }
    assert math.isnan(events[1]["scalars"]["train/loss"])
    assert events[1]["scalars"]["train/grad_norm"] == 3.25
    assert events[2]["scalars"] == {"eval/AP": 0.25}


def test_metrics_writer_without_tensorboard_and_inactive(tmp_path, clock):
    """`tensorboard=False` writes the JSONL log alone; an inactive writer (processes > 0)
    writes nothing at all."""
    writer = MetricsWriter(tmp_path / "plain", tensorboard=False)
    writer.write(1, {"loss": 0.5})
    writer.close()
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["metrics.jsonl"]
    assert json.loads((tmp_path / "plain" / "metrics.jsonl").read_text())["loss"] == 0.5

    silent = MetricsWriter(tmp_path / "silent", active=False)
    silent.write(1, {"loss": 0.5})
    silent.close()
    assert not (tmp_path / "silent").exists()


# ----------------------------------------------------------------------------- the progress line


def test_progress_line_values_and_eta(clock):
    stream = io.StringIO()
    bar = ProgressBar(100, 8, start_step=0, stream=stream)
    clock.now += 5.0  # 10 steps in 5 s: 2 steps/s, 16 img/s, 90 steps left: 45 s
    first = bar.update(10, {"loss": 2.0, "lr": 1e-4})
    assert first == (
        "step 10/100 [##..................] 2.00 steps/s 16.0 img/s ETA 0m45s loss 2 lr 0.0001"
    )
    clock.now += 30.0  # 30 more steps in 30 s (the rate of the last interval only)
    second = bar.update(40)
    assert second == "step 40/100 [########............] 1.00 steps/s 8.0 img/s ETA 1m00s"
    bar.close()
    assert stream.getvalue() == first + "\n" + second + "\n"  # not a terminal: one line each


def test_progress_line_hours_unknown_rate_and_terminal(clock):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    bar = ProgressBar(10_000, 2, start_step=100, stream=stream, width=10)
    before = bar.update(100)  # no step since the start: no rate yet
    assert before == "step 100/10000 [..........] nan steps/s nan img/s ETA ?"
    clock.now += 200.0  # 100 steps in 200 s: 9800 left at 0.5 steps/s = 5 h 26 m 40 s
    line = bar.update(200, {"loss": 0.123456})
    assert line == "step 200/10000 [..........] 0.50 steps/s 1.0 img/s ETA 5h26m40s loss 0.1235"
    bar.close()
    assert stream.getvalue() == f"\r{before}\x1b[K\r{line}\x1b[K\n"  # redrawn in place


def test_progress_rate_after_a_restart_leaves_the_compiling_out(clock):
    stream = io.StringIO()
    bar = ProgressBar(1000, 8, stream=stream)
    clock.now += 40.0  # step 1: tracing and compiling
    bar.restart(1)
    clock.now += 4.9  # steps 2..50 at 10 steps/s: 950 left take 95 s
    line = bar.update(50)
    assert line == "step 50/1000 [#...................] 10.00 steps/s 80.0 img/s ETA 1m35s"
    clock.now += 10.0  # later lines: the interval since the previous line, as before
    assert bar.update(100).startswith("step 100/1000 [##..................] 5.00 steps/s")


def test_evaluation_progress_says_what_it_does_every_few_seconds(clock):
    said = []
    batches = [{"index": i, "value": np.random.default_rng(i).random(3)} for i in range(6)]
    progress = EvalProgress(44, 8, lambda *args: said.append(args[0] % args[1:]), every=5.0)
    seen = []
    for batch in progress.wrap(iter(batches)):
        seen.append(batch)
        clock.now += 3.0  # each batch takes 3 s
    assert seen == batches  # passed through, in order
    assert said == [
        "evaluating 44 images (6 batches of 8; the first compiles the evaluation step)...",
        "evaluated 16/44 images (6 s)",  # after 2 batches: 6 s since the start
        "evaluated 32/44 images (12 s)",  # 6 s since the previous line
    ]
    quiet = EvalProgress(44, 8, None)
    assert list(quiet.wrap(iter(batches))) == batches


def test_inactive_progress_prints_nothing(clock):
    stream = io.StringIO()
    bar = ProgressBar(10, 1, stream=stream, active=False)
    clock.now += 1.0
    assert bar.update(5).startswith("step 5/10 [##########..........] 5.00 steps/s")
    bar.close()
    assert stream.getvalue() == ""
