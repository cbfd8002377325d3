"""Checkpoint files -> `{key: np.ndarray}`, chosen by content, never importing torch.

`read_state_dict(path)` looks at the first bytes, not the file name:

| content                                   | reader                                  |
| ----------------------------------------- | --------------------------------------- |
| 8-byte header length + `{` (safetensors)  | `read_safetensors` (safetensors numpy)  |
| `PK\\x03\\x04` zip with `<folder>/data.pkl` | `read_torch_zip` (torch >= 1.6)         |
| pickled legacy magic number               | `read_torch_legacy` (torch < 1.6)       |
| tar archive (torch < 0.4)                 | `CheckpointFormatError`: re-save it     |
| anything else                             | `CheckpointFormatError` saying what it looks like |

PyTorch files go through the restricted unpickler of `torch_pickle` (allow-list of globals,
bounds-checked strided views). A fundamentalvision training checkpoint is a dict
`{"model": state_dict, "optimizer": ..., "lr_scheduler": ..., "epoch": int, "args":
argparse.Namespace}`: `read_checkpoint` returns the `model` entry as the state dict and
the tensor-free entries (`args` as a `types.SimpleNamespace`, `epoch`, ...) as metadata;
tensors outside the state dict (optimizer moments) are never read.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from deformable_detr_jax.convert import torch_pickle
from deformable_detr_jax.convert.errors import CheckpointFormatError

# Top-level entries that hold the state dict in training checkpoints, in order of preference.
STATE_DICT_ENTRIES = ("model", "state_dict", "model_state_dict")

_LEGACY_MAGIC = torch_pickle.LEGACY_MAGIC_NUMBER.to_bytes(10, "little")

# Leading bytes of files people pass by mistake -> what to call them.
_KNOWN_MAGICS = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5?)"),
    (b"\x93NUMPY", "a NumPy .npy file"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"BZh", "a bzip2 archive (unpack it first)"),
    (b"\xfd7zXZ\x00", "an xz archive (unpack it first)"),
    (b"version https://git-lfs", "a Git LFS pointer, not the weights (run `git lfs pull`)"),
    (b"<!DOCTYPE", "an HTML page (download the file itself, not its web page)"),
    (b"<html", "an HTML page (download the file itself, not its web page)"),
)


def _check_file(path: str) -> int:
    if os.path.isdir(path):
        raise CheckpointFormatError(
            f"{path} is a directory; pass the weights file inside it (model.safetensors, "
            "pytorch_model.bin or a .pth)"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointFormatError(f"{path} is empty (0 bytes); download it again")
    return size


def sniff_format(path: str | os.PathLike) -> str:
    """`"safetensors"`, `"torch_zip"` or `"torch_legacy"`; raises for anything else."""
    path = os.fspath(path)
    size = _check_file(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "torch_zip"
    if head.startswith(b"\x80") and _LEGACY_MAGIC in head[:32]:
        return "torch_legacy"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "safetensors"
    if head[257:262] == b"ustar":
        raise CheckpointFormatError(
            f"{path} is a tar archive: a PyTorch < 0.4 checkpoint (or not a checkpoint); "
            f"{torch_pickle.RESAVE_HINT}"
        )
    for magic, what in _KNOWN_MAGICS:
        if head.startswith(magic):
            raise CheckpointFormatError(f"{path} is {what}, not a checkpoint")
    if head.startswith(b"\x80"):
        raise CheckpointFormatError(
            f"{path} is a bare pickle, not a torch.save file; load it in PyTorch and "
            "torch.save(state_dict, path)"
        )
    what = "a text file" if _is_text(head) else f"an unknown binary file (starts {head[:8]!r})"
    raise CheckpointFormatError(
        f"{path} is {what}, not a checkpoint; expected .safetensors or a torch.save file "
        "(.bin/.pth)"
    )


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict, metadata) of a checkpoint file of any supported format.

    Metadata: the safetensors header metadata, or the tensor-free top-level entries of a
    training checkpoint (e.g. `args` as a `types.SimpleNamespace`, `epoch`).

    Raises:
      CheckpointFormatError: not a checkpoint, truncated, corrupt, or no state dict in it.
      UnsafeCheckpointError: the pickle names a global outside the allow-list.
      FileNotFoundError: no file at `path`.
    """
    path = os.fspath(path)
    kind = sniff_format(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    return _read_torch(path, kind)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """`{key: np.ndarray}` of a .safetensors / torch zip / legacy torch file (by content)."""
    return read_checkpoint(path)[0]


def read_torch_zip(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a torch >= 1.6 zip file (`torch.save` default), without torch."""
    return _read_torch(os.fspath(path), "torch_zip")[0]


def read_torch_legacy(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a torch < 1.6 file (`_use_new_zipfile_serialization=False`)."""
    return _read_torch(os.fspath(path), "torch_legacy")[0]


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (bfloat16 as `ml_dtypes.bfloat16`)."""
    return _read_safetensors(os.fspath(path))[0]


# ------------------------------------------------------------------------------------------


def _read_torch(path: str, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    _check_file(path)
    opener = {
        "torch_zip": torch_pickle.open_torch_zip,
        "torch_legacy": torch_pickle.open_torch_legacy,
    }
    with open(path, "rb") as f:
        obj, load_storages, big_endian = opener[kind](f, path)
        state_dict, metadata = _select_state_dict(obj, path)
        tensors = {id(t): (k, t) for k, t in state_dict.items()}
        buffers = load_storages({t.storage.key for _, t in tensors.values() if _has_storage(t)})
        arrays = {
            i: torch_pickle.materialize(t, buffers, big_endian=big_endian, name=f"{path}: {k}")
            for i, (k, t) in tensors.items()
        }
    return {k: arrays[id(t)] for k, t in state_dict.items()}, metadata


def _has_storage(tensor: torch_pickle.LazyTensor) -> bool:
    return isinstance(tensor.storage, torch_pickle.LazyStorage)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch_pickle.LazyTensor) for v in obj.values())
    )


def _select_state_dict(obj: Any, path: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """The `{key: LazyTensor}` mapping in a loaded torch file, and tensor-free metadata."""
    if _is_state_dict(obj):
        return obj, {}
    if isinstance(obj, Mapping):
        for entry in STATE_DICT_ENTRIES:
            if _is_state_dict(obj.get(entry)):
                metadata = {
                    k: v
                    for k, v in obj.items()
                    if k != entry and isinstance(k, str) and not torch_pickle.lazy_tensors(v)
                }
                return obj[entry], metadata
        keys = ", ".join(repr(k) for k in list(obj)[:10])
        raise CheckpointFormatError(
            f"{path}: no state dict found; the file holds a dict with keys [{keys}], "
            f"expected a dict of tensors or one under {', '.join(STATE_DICT_ENTRIES)}"
        )
    raise CheckpointFormatError(
        f"{path}: no state dict found; the file holds a {type(obj).__name__}, expected a "
        "dict of tensors"
    )


def _safetensors_header(path: str, size: int) -> dict[str, Any]:
    """Parses and checks the header so truncation is reported before any read."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if 8 + length > size:
            raise CheckpointFormatError(
                f"{path}: safetensors header says {length} bytes but the file has {size - 8} "
                "after it; the file is truncated, download it again"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointFormatError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2
    ]
    if len(ends) != len(header) - ("__metadata__" in header):
        raise CheckpointFormatError(f"{path}: corrupt safetensors header (entries without offsets)")
    data_size = size - 8 - length
    if ends and max(ends) > data_size:
        raise CheckpointFormatError(
            f"{path}: safetensors header needs {max(ends)} bytes of tensor data, the file has "
            f"{data_size}; the file is truncated, download it again"
        )
    return header


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import ml_dtypes  # noqa: F401  (registers bfloat16 & float8 with numpy for safetensors)

    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise ImportError(
            "reading .safetensors needs the `safetensors` package: pip install safetensors"
        ) from None
    size = _check_file(path)
    _safetensors_header(path, size)
    try:
        with safe_open(path, framework="np") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: np.array(f.get_tensor(key)) for key in f.keys()}
    except (SafetensorError, TypeError, ValueError, OSError) as e:
        raise CheckpointFormatError(f"{path}: unreadable safetensors file ({e})") from None
    return tensors, metadata
