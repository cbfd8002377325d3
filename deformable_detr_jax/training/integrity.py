"""Checksums of what a training checkpoint holds, written with each save and checked on restore.

orbax (tensorstore, OCDBT, zstd) checks the structure of what it reads but not the values: a
flipped bit inside a compressed chunk's literals decompresses without error into a different
number. So every save records, in its `meta` item, a CRC-32 of each state array's bytes (with its
dtype and shape) and of the JSON data item, and a CRC-32 of the meta item itself; a restore
recomputes them. CRC-32 detects every 1- or 2-bit error and every burst of up to 32 bits, and any
other corruption with probability 1 - 2^-32, at about 3 GB/s on one core (BENCHMARKS.md).

Arrays are named by their dot-joined tree path (`params.model.backbone...kernel`,
`opt_state.1.inner_states.default.inner_state.0.mu...`), the same whether the tree is the
`TrainState` or the nested dicts orbax restores without a target.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

FORMAT = 1  # meta["integrity"]["format"]


def key_name(key: Any) -> str:
    """One path entry (`DictKey`, `GetAttrKey`, `SequenceKey`, ...) as a plain string."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path: tuple[Any, ...]) -> str:
    return ".".join(key_name(k) for k in path)


def host_array(value: Any) -> np.ndarray:
    """A numpy copy of a (replicated) leaf: one device's copy is the whole array."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        if not value.sharding.is_fully_replicated:
            raise ValueError(
                "checksums need replicated arrays (this process holds only part of one)"
            )
        value = value.addressable_data(0)
    return np.asarray(jax.device_get(value))


def array_checksum(value: Any) -> str:
    """`"crc32:<hex>"` over dtype, shape and the C-order bytes of `value`."""
    array = np.ascontiguousarray(host_array(value))
    crc = zlib.crc32(f"{array.dtype.str}{array.shape}".encode())
    crc = zlib.crc32(memoryview(array).cast("B"), crc) if array.size else crc
    return f"crc32:{crc:08x}"


def tree_checksums(tree: Any) -> dict[str, str]:
    """`{path name: checksum}` of every array leaf of `tree`."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {path_name(path): array_checksum(leaf) for path, leaf in leaves}


def json_checksum(obj: Any) -> str:
    """Checksum of a JSON-able object in its canonical form (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return f"crc32:{zlib.crc32(text.encode()):08x}"


def seal(meta: Mapping[str, Any], state: Any, data: Any) -> dict[str, Any]:
    """`meta` with an `integrity` entry: checksums of `state`'s arrays, of `data` and of meta."""
    # the JSON round trip that orbax's JsonSave / JsonRestore make (tuples -> lists, int keys ->
    # strings), so that the checksums are of what will be read back
    sealed = json.loads(json.dumps({k: v for k, v in meta.items() if k != "integrity"}))
    data = json.loads(json.dumps(data))
    integrity = {"format": FORMAT, "state": tree_checksums(state), "data": json_checksum(data)}
    integrity["meta"] = json_checksum({**sealed, "integrity": integrity})
    sealed["integrity"] = integrity
    return sealed


def problems(meta: Mapping[str, Any], state: Any, data: Any) -> list[str] | None:
    """What does not match the checksums `seal` wrote: [] when everything does, None when the
    checkpoint carries no checksums (written before they existed)."""
    integrity = meta.get("integrity")
    if not isinstance(integrity, Mapping):
        return None
    found = []
    expected_meta = integrity.get("meta")
    unsealed = {k: v for k, v in meta.items() if k != "integrity"}
    rest = {k: v for k, v in integrity.items() if k != "meta"}
    if json_checksum({**unsealed, "integrity": rest}) != expected_meta:
        found.append("the meta item does not match its checksum")
    if json_checksum(data) != integrity.get("data"):
        found.append("the data item does not match its checksum")
    expected = dict(integrity.get("state") or {})
    actual = tree_checksums(state)
    wrong = sorted(k for k in actual if k in expected and actual[k] != expected[k])
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if wrong:
        found.append(
            f"{len(wrong)} array(s) do not match their checksums (e.g. {', '.join(wrong[:3])})"
        )
    if missing or extra:
        found.append(
            f"the arrays differ from those checksummed ({len(missing)} missing, {len(extra)} "
            f"unexpected: {', '.join((missing + extra)[:3])})"
        )
    return found
