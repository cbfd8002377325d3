"""Checkpoint readers on files crafted here without torch: malicious pickles, tensors outside
their storage, bad files (files written by real torch.save: tests/test_convert_readers_torch_files.py).

Malicious pickles must raise UnsafeCheckpointError without running anything: the payload's
side effect (creating a file) is shown to work with plain `pickle.loads`, then shown not to
happen here.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from deformable_detr_jax.convert import (
    CheckpointError,
    CheckpointFormatError,
    UnsafeCheckpointError,
    read_checkpoint,
    read_state_dict,
)


def assert_same_state_dict(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key  # bit-exact, NaN-safe


# ------------------------------------------------------------------------------------------
# Malicious pickles.


def _torch_zip(path, pickle_bytes: bytes, storages: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


def _os_system_pickle(command: str) -> bytes:
    """`GLOBAL 'os system'` + REDUCE, inside a dict as a state dict value."""
    cmd = command.encode()
    call = b"cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R"
    return b"\x80\x02}X\x01\x00\x00\x00w" + call + b"s."


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_payloads_are_live_with_plain_pickle(tmp_path):
    """The payloads below really execute under pickle.loads (so the tests can fail)."""
    marker = tmp_path / "ran"
    pickle.loads(_os_system_pickle(f"touch {marker}"))
    assert marker.exists()


@pytest.mark.parametrize(
    "make_pickle",
    [
        pytest.param(lambda cmd: _os_system_pickle(cmd), id="GLOBAL-os-system"),
        pytest.param(lambda cmd: pickle.dumps({"w": _Evil(cmd)}, protocol=2), id="posix-p2"),
        pytest.param(lambda cmd: pickle.dumps([_Evil(cmd)], protocol=4), id="STACK_GLOBAL-p4"),
        pytest.param(
            lambda cmd: (
                b"\x80\x02cbuiltins\neval\nX"
                + struct.pack("<I", len(f"__import__('os').system('{cmd}')"))
                + f"__import__('os').system('{cmd}')".encode()
                + b"\x85R."
            ),
            id="builtins-eval",
        ),
    ],
)
def test_foreign_global_refused_not_executed(tmp_path, make_pickle):
    marker = tmp_path / "pwned"
    _torch_zip(tmp_path / "evil.pth", make_pickle(f"touch {marker}"))
    with pytest.raises(UnsafeCheckpointError, match=r"global .*(system|eval)"):
        read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_foreign_global_in_legacy_file_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil_legacy.pth", "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(_os_system_pickle(f"touch {marker}"))
        pickle.dump([], f, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        read_checkpoint(tmp_path / "evil_legacy.pth")
    assert not marker.exists()


class _Global:
    """Pickled as `GLOBAL module name`: a reference to torch's objects without torch."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's REDUCE wants a callable; never called here
        raise AssertionError(f"{self.module}.{self.name} called")


class _StoragePickler(pickle._Pickler):
    """The pure-Python pickler, writing `_Global`s as GLOBAL opcodes and `_STORAGE` as torch's
    persistent storage record, as `torch.save` writes them."""

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[_Global] = lambda self, obj: self.write(
        pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode()
    )

    def persistent_id(self, obj):
        if obj is _STORAGE:
            return ("storage", _Global("torch", "FloatStorage"), "0", "cpu", 4)
        return None


_STORAGE = object()


class _TensorCall:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return (
            _Global("torch._utils", "_rebuild_tensor_v2"),
            (_STORAGE, *self.args, False, collections.OrderedDict()),
        )


@pytest.mark.parametrize(
    "offset, size, stride",
    [(0, (100, 100), (100, 1)), (3, (2,), (1,)), (0, (2, 2), (-1, 1)), (-1, (1,), (1,))],
)
def test_tensor_outside_its_storage_refused(tmp_path, offset, size, stride):
    buffer = io.BytesIO()
    _StoragePickler(buffer, protocol=2).dump({"w": _TensorCall(offset, size, stride)})
    _torch_zip(tmp_path / "oob.pth", buffer.getvalue(), {"0": np.arange(4, dtype="<f4").tobytes()})
    with pytest.raises(CheckpointFormatError, match="w"):
        read_state_dict(tmp_path / "oob.pth")


def test_in_bounds_crafted_tensor_reads(tmp_path):
    """The crafting above is right: the same pickle in bounds reads back."""
    buffer = io.BytesIO()
    _StoragePickler(buffer, protocol=2).dump({"w": _TensorCall(1, (3,), (1,))})
    _torch_zip(tmp_path / "ok.pth", buffer.getvalue(), {"0": np.arange(4, dtype="<f4").tobytes()})
    np.testing.assert_array_equal(read_state_dict(tmp_path / "ok.pth")["w"], [1.0, 2.0, 3.0])


# ------------------------------------------------------------------------------------------
# Bad files: typed errors that name the path and the problem.


def write_file(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4, "JPEG"),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "PNG"),
        (b"model weights, see README\nline two\n", "text file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n", "git lfs pull"),
        (b"<!DOCTYPE html><html></html>", "HTML"),
        (b"\x00\x01\x02\x03garbage" * 10, "unknown binary"),
        (b"", "empty"),
        (pickle.dumps({"a": 1}, protocol=2), "bare pickle"),
    ],
)
def test_wrong_file_types(tmp_path, content, pattern):
    path = write_file(tmp_path / "weights.pth", content)
    with pytest.raises(CheckpointFormatError, match=pattern) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_legacy_with_wrong_protocol_says_resave(tmp_path):
    path = tmp_path / "odd_legacy.pth"
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 999, {}):
            pickle.dump(header, f, protocol=2)
    with pytest.raises(CheckpointFormatError, match=r"re-save it with a recent PyTorch"):
        read_state_dict(path)


def test_errors_are_value_errors():
    assert issubclass(UnsafeCheckpointError, CheckpointError)
    assert issubclass(CheckpointFormatError, ValueError)
