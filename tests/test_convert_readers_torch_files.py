"""Checkpoint readers on files written by real torch.save / safetensors.torch, read without torch.

The equality test reads every file in a fresh interpreter in which importing torch raises,
and checks afterwards that torch is not in sys.modules. (Crafted and malicious files written
without torch: tests/test_convert_readers.py.)
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import struct
import sys
import tarfile
import types
import zipfile

import numpy as np
import pytest

from deformable_detr_jax.convert import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    read_safetensors,
    read_state_dict,
    read_torch_legacy,
    read_torch_zip,
    sniff_format,
)
from tests import subprocess_utils
from tests.test_convert_readers import assert_same_state_dict, write_file

pytestmark = pytest.mark.torch

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


def _random_state_dict(seed: int) -> collections.OrderedDict:
    import torch

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


def _reference(t) -> np.ndarray:
    """A torch tensor's values as numpy, bfloat16/float8 bit-exact (through an integer view)."""
    import ml_dtypes
    import torch

    # torch dtype -> (integer view dtype for bit-exact export, numpy dtype of the reader)
    bit_views = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
    }
    t = t.detach().contiguous()
    if t.dtype in bit_views:
        int_dtype, np_dtype = bit_views[t.dtype]
        return t.view(int_dtype).numpy().view(np_dtype)
    return t.numpy()


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    """Files written by torch / safetensors, and what each should read back as."""
    import torch
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
    args = argparse.Namespace(
        lr=2e-4,
        backbone="resnet50",
        with_box_refine=True,
        nheads=8,
        lr_drop_epochs=None,
        lr_backbone_names=["backbone.0"],
    )
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
    save_torch(
        {k: v.detach().clone() for k, v in dense.items()},
        folder / "torch.safetensors",
        metadata={"format": "pt"},
    )
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
    subprocess_utils.run(
        [sys.executable, "-c", _READ_WITHOUT_TORCH, str(out), *paths],
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    with open(out, "rb") as f:
        results = pickle.load(f)
    for name, (want, want_meta) in files.items():
        state_dict, metadata = results[str(folder / name)]
        assert_same_state_dict(state_dict, want)
        assert metadata == want_meta, name


def test_views_are_independent_writable_copies(saved_files):

    folder, _ = saved_files
    sd = read_torch_zip(folder / "zip.pth")
    sd["view_a"][0] = 1234.0
    assert sd["view_base"][3] != 1234.0
    assert sd["transposed"].flags.c_contiguous and sd["transposed"].flags.writeable


def test_sniff_and_specific_readers(saved_files):

    folder, files = saved_files
    kinds = {
        "zip.pth": "torch_zip",
        "legacy.pth": "torch_legacy",
        "torch.safetensors": "safetensors",
    }
    for name, kind in kinds.items():
        assert sniff_format(folder / name) == kind
    assert_same_state_dict(read_torch_legacy(folder / "legacy.pth"), files["legacy.pth"][0])
    assert_same_state_dict(
        read_safetensors(folder / "numpy.safetensors"), files["numpy.safetensors"][0]
    )
    assert_same_state_dict(read_state_dict(folder / "original.pth"), files["original.pth"][0])


def _rewrite_zip(src, dst, change):
    """Copies a torch zip, passing (name, bytes) through `change` -> bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info.filename)))


def test_big_endian_byteorder_record(tmp_path):
    import torch

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
    assert_same_state_dict(
        read_torch_zip(tmp_path / "be.pth"), {k: _reference(v) for k, v in sd.items()}
    )


def test_whole_pickled_module_refused(tmp_path):
    import torch

    torch.save(torch.nn.Linear(2, 3), tmp_path / "module.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn.*state_dict"):
        read_state_dict(tmp_path / "module.pth")


def test_truncated_files(saved_files, tmp_path):

    folder, _ = saved_files
    for name, pattern in (
        ("zip.pth", "truncated or corrupt"),
        ("legacy.pth", "truncated"),
        ("torch.safetensors", "truncated"),
    ):
        data = (folder / name).read_bytes()
        cut = write_file(tmp_path / name, data[: len(data) * 2 // 3])
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
        read_state_dict(write_file(tmp_path / "flipped.pth", bytes(data)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script / save
def test_other_archives(tmp_path):
    import torch

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


def test_no_state_dict_inside(tmp_path):
    import torch

    torch.save([torch.randn(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointFormatError, match="holds a list"):
        read_state_dict(tmp_path / "list.pth")
    torch.save({"epoch": 3, "note": "x"}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointFormatError, match=r"keys \['epoch', 'note'\]"):
        read_state_dict(tmp_path / "meta.pth")
