"""Checkpoint readers: files written by real torch.save / safetensors, read without torch.

The equality test reads every file in a fresh interpreter in which importing torch raises,
and checks afterwards that torch is not in sys.modules. Malicious pickles must raise
UnsafeCheckpointError without running anything: the payload's side effect (creating a
file) is shown to work with plain `pickle.loads`, then shown not to happen here.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from deformable_detr_jax.convert import (
    CheckpointError,
    CheckpointFormatError,
    UnsafeCheckpointError,
    read_checkpoint,
    read_safetensors,
    read_state_dict,
    read_torch_legacy,
    read_torch_zip,
    sniff_format,
)

# torch dtype -> (integer view dtype for bit-exact export, numpy dtype of the reader)
_BIT_VIEWS = {
    torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
    torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
}


def _random_state_dict(seed: int) -> collections.OrderedDict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(24, generator=g)
    sd = collections.OrderedDict()
    sd["f32"] = torch.randn(3, 4, generator=g)
    sd["f64"] = torch.randn(2, 5, generator=g, dtype=torch.float64)
    sd["f16"] = torch.randn(7, generator=g).half()
    sd["bf16"] = torch.randn(2, 3, generator=g).bfloat16()
    sd["f8"] = torch.randn(5, generator=g).to(torch.float8_e4m3fn)
    sd["i64"] = torch.randint(-(2**40), 2**40, (3, 2), generator=g)
    sd["i32"] = torch.randint(-1000, 1000, (4,), generator=g, dtype=torch.int32)
    sd["i8"] = torch.randint(-100, 100, (4,), generator=g, dtype=torch.int8)
    sd["u8"] = torch.randint(0, 255, (4,), generator=g, dtype=torch.uint8)
    sd["bool"] = torch.rand(6, generator=g) > 0.5
    sd["c64"] = torch.randn(3, generator=g, dtype=torch.complex64)
    sd["transposed"] = torch.randn(3, 5, generator=g).t()
    sd["permuted_strided"] = torch.randn(4, 5, 6, generator=g).permute(2, 0, 1)[1:, :, ::2]
    sd["view_a"] = base[3:9]  # two views and the whole of one storage
    sd["view_b"] = base.view(4, 6)[1:, 2:5]
    sd["view_base"] = base
    sd["scalar"] = torch.tensor(2.5 + seed)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    return sd


def _reference(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype in _BIT_VIEWS:
        int_dtype, np_dtype = _BIT_VIEWS[t.dtype]
        return t.view(int_dtype).numpy().view(np_dtype)
    return t.numpy()


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key  # bit-exact, NaN-safe


_READ_WITHOUT_TORCH = r"""
import importlib.abc, pickle, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("the reader must not import torch")

sys.meta_path.insert(0, NoTorch())
from deformable_detr_jax.convert import read_checkpoint

results = {}
for path in sys.argv[2:]:
    results[path] = read_checkpoint(path)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch imported"
with open(sys.argv[1], "wb") as f:
    pickle.dump(results, f)
"""


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    """Files written by torch / safetensors, and what each should read back as."""
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import save_file as save_torch

    folder = tmp_path_factory.mktemp("saved")
    files = {}
    sd = _random_state_dict(0)
    want = {k: _reference(v) for k, v in sd.items()}

    torch.save(sd, folder / "zip.pth")
    files["zip.pth"] = (want, {})
    torch.save(_random_state_dict(1), folder / "legacy.pth", _use_new_zipfile_serialization=False)
    files["legacy.pth"] = ({k: _reference(v) for k, v in _random_state_dict(1).items()}, {})

    # fundamentalvision layout: model + optimizer (tensors, never read) + args Namespace.
    model = {k: v for k, v in _random_state_dict(2).items()}
    args = argparse.Namespace(lr=2e-4, backbone="resnet50", with_box_refine=True, nheads=8,
                              lr_drop_epochs=None, lr_backbone_names=["backbone.0"])  # fmt: skip
    checkpoint = {
        "model": model,
        "optimizer": {"state": {0: {"exp_avg": torch.randn(3)}}, "param_groups": [{"lr": 1e-4}]},
        "lr_scheduler": {"step_size": 40, "last_epoch": 7},
        "epoch": 7,
        "args": args,
    }
    want_meta = {
        "lr_scheduler": {"step_size": 40, "last_epoch": 7},
        "epoch": 7,
        "args": types.SimpleNamespace(**vars(args)),
    }
    for name, zipped in (("original.pth", True), ("original_legacy.pth", False)):
        torch.save(checkpoint, folder / name, _use_new_zipfile_serialization=zipped)
        files[name] = ({k: _reference(v) for k, v in model.items()}, want_meta)

    dense = {k: v.contiguous() for k, v in _random_state_dict(3).items() if k != "f8"}
    save_torch({k: v.detach().clone() for k, v in dense.items()}, folder / "torch.safetensors",
               metadata={"format": "pt"})  # fmt: skip
    files["torch.safetensors"] = ({k: _reference(v) for k, v in dense.items()}, {"format": "pt"})
    numpy_sd = {
        k: _reference(v) for k, v in dense.items() if v.dtype not in (torch.bfloat16, torch.bool)
    }
    save_numpy(numpy_sd, folder / "numpy.safetensors")
    files["numpy.safetensors"] = (numpy_sd, {})
    return folder, files


def test_real_files_read_exactly_without_importing_torch(saved_files, tmp_path):
    folder, files = saved_files
    out = tmp_path / "results.pkl"
    paths = [str(folder / name) for name in files]
    subprocess.run(
        [sys.executable, "-c", _READ_WITHOUT_TORCH, str(out), *paths],
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    with open(out, "rb") as f:
        results = pickle.load(f)
    for name, (want, want_meta) in files.items():
        state_dict, metadata = results[str(folder / name)]
        _assert_same(state_dict, want)
        assert metadata == want_meta, name


def test_views_are_independent_writable_copies(saved_files):
    folder, _ = saved_files
    sd = read_torch_zip(folder / "zip.pth")
    sd["view_a"][0] = 1234.0
    assert sd["view_base"][3] != 1234.0
    assert sd["transposed"].flags.c_contiguous and sd["transposed"].flags.writeable


def test_sniff_and_specific_readers(saved_files):
    folder, files = saved_files
    kinds = {"zip.pth": "torch_zip", "legacy.pth": "torch_legacy",
             "torch.safetensors": "safetensors"}  # fmt: skip
    for name, kind in kinds.items():
        assert sniff_format(folder / name) == kind
    _assert_same(read_torch_legacy(folder / "legacy.pth"), files["legacy.pth"][0])
    _assert_same(read_safetensors(folder / "numpy.safetensors"), files["numpy.safetensors"][0])
    _assert_same(read_state_dict(folder / "original.pth"), files["original.pth"][0])


def _rewrite_zip(src, dst, change):
    """Copies a torch zip, passing (name, bytes) through `change` -> bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info.filename)))


def test_big_endian_byteorder_record(tmp_path):
    sd = {"w": torch.randn(3, 4).t(), "b": torch.randn(5).bfloat16(), "i": torch.arange(4)}
    torch.save(sd, tmp_path / "le.pth")
    itemsizes = {"0": 4, "1": 2, "2": 8}  # storages are numbered in save order: w, b, i
    with zipfile.ZipFile(tmp_path / "le.pth") as z:
        sizes = [z.getinfo(f"le/data/{k}").file_size for k in itemsizes]
    assert sizes == [48, 10, 32]

    def to_big_endian(name, data):
        if name.endswith("byteorder"):
            return b"big"
        key = name.rsplit("/", 1)[-1]
        if "/data/" in name:
            size = itemsizes[key]
            return np.frombuffer(data, f"<u{size}").astype(f">u{size}").tobytes()
        return data

    _rewrite_zip(tmp_path / "le.pth", tmp_path / "be.pth", to_big_endian)
    _assert_same(read_torch_zip(tmp_path / "be.pth"), {k: _reference(v) for k, v in sd.items()})


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


def test_whole_pickled_module_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 3), tmp_path / "module.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn.*state_dict"):
        read_state_dict(tmp_path / "module.pth")


class _StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if obj is _STORAGE:
            return ("storage", torch.FloatStorage, "0", "cpu", 4)
        return None


_STORAGE = object()


class _TensorCall:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return (
            torch._utils._rebuild_tensor_v2,
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


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_truncated_files(saved_files, tmp_path):
    folder, _ = saved_files
    for name, pattern in (
        ("zip.pth", "truncated or corrupt"),
        ("legacy.pth", "truncated"),
        ("torch.safetensors", "truncated"),
    ):
        data = (folder / name).read_bytes()
        cut = _write(tmp_path / name, data[: len(data) * 2 // 3])
        with pytest.raises(CheckpointFormatError, match=pattern) as info:
            read_state_dict(cut)
        assert str(cut) in str(info.value)


def test_corrupt_storage_bytes(saved_files, tmp_path):
    folder, _ = saved_files
    data = bytearray((folder / "zip.pth").read_bytes())
    with zipfile.ZipFile(folder / "zip.pth") as z:
        info = z.getinfo("zip/data/0")
    # Local header: 30 bytes, then the name and an extra field (torch pads it for alignment).
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    data[start] ^= 0xFF  # one flipped bit pattern inside a stored storage: bad CRC-32
    with pytest.raises(CheckpointFormatError, match="corrupt"):
        read_state_dict(_write(tmp_path / "flipped.pth", bytes(data)))


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
    path = _write(tmp_path / "weights.pth", content)
    with pytest.raises(CheckpointFormatError, match=pattern) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script / save
def test_other_archives(tmp_path):
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as z:
        z.writestr("a.txt", "hello")
    with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
        read_state_dict(tmp_path / "photos.zip")

    with tarfile.open(tmp_path / "old.pth", "w") as tar:
        info = tarfile.TarInfo("pickle")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(CheckpointFormatError, match=r"torch\.save\(torch\.load"):
        read_state_dict(tmp_path / "old.pth")

    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(CheckpointFormatError, match="TorchScript"):
        read_state_dict(tmp_path / "scripted.pt")

    with pytest.raises(CheckpointFormatError, match="directory"):
        read_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "absent.pth")


def test_legacy_with_wrong_protocol_says_resave(tmp_path):
    path = tmp_path / "odd_legacy.pth"
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 999, {}):
            pickle.dump(header, f, protocol=2)
    with pytest.raises(CheckpointFormatError, match=r"re-save it with a recent PyTorch"):
        read_state_dict(path)


def test_no_state_dict_inside(tmp_path):
    torch.save([torch.randn(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointFormatError, match="holds a list"):
        read_state_dict(tmp_path / "list.pth")
    torch.save({"epoch": 3, "note": "x"}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointFormatError, match=r"keys \['epoch', 'note'\]"):
        read_state_dict(tmp_path / "meta.pth")


def test_errors_are_value_errors():
    assert issubclass(UnsafeCheckpointError, CheckpointError)
    assert issubclass(CheckpointFormatError, ValueError)
