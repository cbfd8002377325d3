"""PyTorch checkpoint files read with numpy alone: a restricted unpickler, never torch.

`torch.save` writes a pickle in which every tensor is a call
`torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
backward_hooks)` and every storage a persistent id `("storage", torch.FloatStorage, key,
location, numel)` whose bytes live outside the pickle:

- zip files (torch >= 1.6, the default): `<folder>/data.pkl` plus one entry
  `<folder>/data/<key>` per storage, and a `<folder>/byteorder` record ("little"/"big";
  absent in files older than torch 1.13, which were all written little-endian);
- legacy files (torch < 1.6, `_use_new_zipfile_serialization=False`): five pickles in a
  row (magic number, protocol version, system info, the object, the sorted storage
  keys), then each storage as an int64 element count and its little-endian bytes.

Safety: `RestrictedUnpickler.find_class` resolves only the exact globals in
`ALLOWED_GLOBALS`: the tensor/parameter rebuild functions (reimplemented here in numpy),
the typed storage classes and dtypes (as inert descriptors), `collections.OrderedDict`, and
`argparse.Namespace` (the `args` entry of fundamentalvision checkpoints, mapped to
`types.SimpleNamespace`). Any other global (`os.system`, `builtins.eval`, a model class of
a whole pickled `nn.Module`, ...) raises `UnsafeCheckpointError` before anything is
called. Tensors come back as `LazyTensor` records; `materialize` bounds-checks offset,
size and stride against the storage before it builds the numpy array, so a crafted pickle
cannot read outside the bytes of the file.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import struct
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from deformable_detr_jax.convert.errors import CheckpointFormatError, UnsafeCheckpointError

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
RESAVE_HINT = (
    "re-save it with a recent PyTorch: torch.save(torch.load(path, weights_only=False), new_path)"
)


@dataclasses.dataclass(frozen=True)
class StorageType:
    """What `torch.FloatStorage` & co. unpickle to: a name and the element dtype."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class TorchDType:
    """What `torch.float32` & co. unpickle to (used by `_rebuild_tensor_v3`)."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass
class LazyStorage:
    """One storage of the file: `numel` elements of `dtype` at element `offset` of `key`.

    `offset` is non-zero only for the storage views of torch < 1.0 legacy files.
    """

    key: str
    dtype: np.dtype
    numel: int
    offset: int = 0


@dataclasses.dataclass
class LazyTensor:
    """A tensor not read yet: a strided view of a storage (sizes/strides in elements)."""

    storage: Any
    storage_offset: Any
    size: Any
    stride: Any
    dtype: Any = None  # set by _rebuild_tensor_v3, whose storage is untyped bytes


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
_TORCH_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint64": np.uint64,
    "uint32": np.uint32,
    "uint16": np.uint16,
    "uint8": np.uint8,
    "bool": np.bool_,
    "complex64": np.complex64,
    "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}


def _rebuild_tensor(storage, storage_offset, size, stride):
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    return LazyTensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


# (module, name) -> what the pickle gets instead. Nothing else resolves.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch.storage", "UntypedStorage"): StorageType("UntypedStorage", np.dtype(np.uint8)),
    ("argparse", "Namespace"): types.SimpleNamespace,
    **{("torch", n): StorageType(n, np.dtype(d)) for n, d in _STORAGE_DTYPES.items()},
    **{("torch", n): TorchDType(n, np.dtype(d)) for n, d in _TORCH_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only `ALLOWED_GLOBALS`; storages via a callback."""

    def __init__(self, file: BinaryIO, persistent_load: Callable[[Any], Any], source: str):
        super().__init__(file)
        self._persistent_load = persistent_load
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"{self._source}: the pickle asks for the global {module}.{name}, which is "
                "not a tensor, storage or plain container; refusing to load it (nothing was "
                "executed). If this is a whole pickled model, load it in PyTorch and save "
                "model.state_dict() with torch.save."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent_load(pid)


def _text(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _storage_record(pid: Any, source: str) -> tuple[StorageType, str, int, Any]:
    """Validates a persistent id `("storage", type, key, location, numel[, view])`."""
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or _text(pid[0]) != "storage":
        raise CheckpointFormatError(f"{source}: unsupported persistent id {pid!r} in the pickle")
    storage_type, key, numel = pid[1], _text(pid[2]), pid[4]
    if not isinstance(storage_type, StorageType) or not isinstance(key, str):
        raise CheckpointFormatError(f"{source}: malformed storage record {pid!r}")
    if not isinstance(numel, int) or numel < 0:
        raise CheckpointFormatError(f"{source}: storage {key} has invalid size {numel!r}")
    return storage_type, key, numel, pid[5] if len(pid) == 6 else None


class _StorageTable:
    """persistent_load: one `LazyStorage` per key, checked for a consistent dtype."""

    def __init__(self, source: str):
        self.source = source
        self.storages: dict[str, LazyStorage] = {}

    def __call__(self, pid: Any) -> LazyStorage:
        storage_type, key, numel, view = _storage_record(pid, self.source)
        root = self.storages.setdefault(key, LazyStorage(key, storage_type.dtype, numel))
        if root.dtype != storage_type.dtype:
            raise CheckpointFormatError(
                f"{self.source}: storage {key} is read as both {root.dtype} and "
                f"{storage_type.dtype}"
            )
        if view is None:
            return root
        view_key, offset, view_numel = view  # torch < 1.0 storage views (legacy files)
        if not all(isinstance(v, int) and v >= 0 for v in (offset, view_numel)):
            raise CheckpointFormatError(f"{self.source}: malformed storage view {view!r}")
        return LazyStorage(key, root.dtype, view_numel, offset)


def _unpickle(data: BinaryIO, persistent_load: Callable[[Any], Any], source: str) -> Any:
    try:
        return RestrictedUnpickler(data, persistent_load, source).load()
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except Exception as e:  # a corrupt pickle fails in many ways; all mean the same
        raise CheckpointFormatError(
            f"{source}: the pickle is corrupt or truncated ({type(e).__name__}: {e})"
        ) from None


def _no_persistent_ids(pid: Any) -> Any:
    raise CheckpointFormatError(f"unexpected persistent id {pid!r}")


# ------------------------------------------------------------------------------------------
# Tensors from storages.


def lazy_tensors(obj: Any) -> list[LazyTensor]:
    """Every `LazyTensor` inside nested dicts / lists / tuples / namespaces."""
    found, stack, seen = [], [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, LazyTensor):
            found.append(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, types.SimpleNamespace):
            stack.extend(vars(item).values())
    return found


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        return tuple(value)
    return None


def materialize(
    tensor: LazyTensor, buffers: Mapping[str, np.ndarray], *, big_endian: bool, name: str
) -> np.ndarray:
    """The numpy array of a lazy tensor; `buffers` maps storage key -> its bytes (uint8).

    Offsets, sizes and strides are checked against the storage, so the strided view never
    reaches outside it; the result is a fresh C-contiguous array in native byte order.
    """
    storage = tensor.storage
    if not isinstance(storage, LazyStorage):
        raise CheckpointFormatError(f"{name}: the tensor's storage is {type(storage).__name__}")
    dtype = np.dtype(storage.dtype)
    if tensor.dtype is not None:
        if not isinstance(tensor.dtype, TorchDType):
            raise CheckpointFormatError(f"{name}: unsupported tensor dtype {tensor.dtype!r}")
        dtype = np.dtype(tensor.dtype.dtype)
    size, stride, offset = _int_tuple(tensor.size), _int_tuple(tensor.stride), tensor.storage_offset
    if size is None or stride is None or len(size) != len(stride):
        raise CheckpointFormatError(f"{name}: invalid size {tensor.size!r} / {tensor.stride!r}")
    if not isinstance(offset, int) or offset < 0:
        raise CheckpointFormatError(f"{name}: invalid storage offset {offset!r}")
    if 0 in size:
        return np.zeros(size, dtype)
    raw = buffers[storage.key]
    start = storage.offset * storage.dtype.itemsize
    stop = start + storage.numel * storage.dtype.itemsize
    if stop > raw.size or (stop - start) % dtype.itemsize:
        raise CheckpointFormatError(
            f"{name}: storage {storage.key} holds {raw.size} bytes, the pickle says "
            f"{storage.numel} x {storage.dtype} from byte {start}"
        )
    elements = raw[start:stop].view(dtype)
    if dtype.itemsize > 1 and big_endian != (sys.byteorder == "big"):
        elements = elements.byteswap()  # (ml_dtypes and complex swap per component)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= elements.size:
        raise CheckpointFormatError(
            f"{name}: size {size}, stride {stride}, offset {offset} reach element {last} "
            f"of a storage of {elements.size} elements (file corrupt?)"
        )
    view = np.lib.stride_tricks.as_strided(
        elements[offset:],
        shape=size,
        strides=tuple(s * dtype.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view, order="C", copy=True)


# ------------------------------------------------------------------------------------------
# The two container layouts. Each returns (object with LazyTensors, storage loader).

StorageLoader = Callable[[set[str]], dict[str, np.ndarray]]


def open_torch_zip(file: BinaryIO, source: str) -> tuple[Any, StorageLoader, bool]:
    """Unpickles `data.pkl` of a torch zip file; returns (object, loader, big_endian)."""
    import zipfile

    try:
        archive = zipfile.ZipFile(file)
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointFormatError(
            f"{source}: not a readable zip archive ({e}); the file is truncated or corrupt, "
            "download it again"
        ) from None
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointFormatError(
            f"{source}: a zip archive but not a PyTorch checkpoint (expected one "
            f"<folder>/data.pkl, found {len(pickles)}; first entries: {names[:5]})"
        )
    prefix = pickles[0][: -len("data.pkl")]
    if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
        raise CheckpointFormatError(
            f"{source}: a TorchScript archive (torch.jit.save), not a state dict; load it in "
            "PyTorch and torch.save(model.state_dict(), path)"
        )
    byteorder = "little"
    if f"{prefix}byteorder" in names:
        byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointFormatError(f"{source}: unknown byteorder record {byteorder!r}")

    def read(name: str) -> bytes:
        try:
            return archive.read(name)
        except KeyError:
            raise CheckpointFormatError(
                f"{source}: the archive has no entry {name}; the file is incomplete"
            ) from None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:  # e.g. bad CRC-32
            raise CheckpointFormatError(
                f"{source}: entry {name} is corrupt ({e}); download the file again"
            ) from None

    table = _StorageTable(source)
    obj = _unpickle(io.BytesIO(read(pickles[0])), table, source)

    def load(keys: set[str]) -> dict[str, np.ndarray]:
        return {key: np.frombuffer(read(f"{prefix}data/{key}"), np.uint8) for key in keys}

    return obj, load, byteorder == "big"


def open_torch_legacy(file: BinaryIO, source: str) -> tuple[Any, StorageLoader, bool]:
    """Unpickles a legacy (torch < 1.6, non-zip) file; returns (object, loader, False)."""
    header = [_unpickle(file, _no_persistent_ids, source) for _ in range(3)]
    if header[0] != LEGACY_MAGIC_NUMBER or header[1] != LEGACY_PROTOCOL_VERSION:
        raise CheckpointFormatError(
            f"{source}: not a legacy PyTorch file (magic {header[0]!r}, protocol "
            f"{header[1]!r}); {RESAVE_HINT}"
        )
    table = _StorageTable(source)
    obj = _unpickle(file, table, source)
    keys = _unpickle(file, _no_persistent_ids, source)
    if not isinstance(keys, list) or set(map(_text, keys)) != set(table.storages):
        raise CheckpointFormatError(
            f"{source}: the storage list does not match the tensors of the pickle; {RESAVE_HINT}"
        )
    data_start = file.tell()

    def load(wanted: set[str]) -> dict[str, np.ndarray]:
        file.seek(data_start)
        out = {}
        for key in map(_text, keys):
            storage = table.storages[key]
            head = file.read(8)
            if len(head) < 8:
                raise CheckpointFormatError(f"{source}: truncated before storage {key}")
            (numel,) = struct.unpack("<q", head)
            nbytes = numel * storage.dtype.itemsize
            if numel != storage.numel:
                raise CheckpointFormatError(
                    f"{source}: storage {key} has {numel} elements, the pickle says "
                    f"{storage.numel}; {RESAVE_HINT}"
                )
            if key not in wanted:
                file.seek(nbytes, io.SEEK_CUR)
                continue
            data = file.read(nbytes)
            if len(data) < nbytes:
                raise CheckpointFormatError(
                    f"{source}: truncated inside storage {key} ({len(data)} of {nbytes} "
                    "bytes); download the file again"
                )
            out[key] = np.frombuffer(data, np.uint8)
        return out

    return obj, load, False
