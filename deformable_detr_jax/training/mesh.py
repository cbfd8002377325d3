"""Devices for data-parallel training: `jax.distributed`, the data mesh, host <-> global arrays.

One mesh axis, `"data"`, spans every device of every host (`jax.make_mesh`). Parameters and
optimizer state are replicated on it (`P()`); a batch is split along its batch axis
(`P("data")`, or `P(None, "data")` for the `(accum, bs, ...)` batches of gradient accumulation).
Each process loads only its share of a batch (`data.make_batches(process_index=...)`) and
`host_to_global` assembles the global array from the per-process pieces
(`jax.make_array_from_process_local_data`); `gather_to_host` goes the other way for evaluation,
giving every process the whole (tiled) array.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

logger = logging.getLogger(__name__)

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """`jax.distributed.initialize` when this is one process of several; returns whether it ran.

    With `coordinator_address` ("host:port"), `num_processes` and `process_id` given, they are
    used (CPU hosts, tests on localhost). With `auto=True` and no address, JAX detects the
    cluster (Cloud TPU pods, SLURM, Open MPI). With neither, nothing happens: one process.
    Must run before anything touches a JAX device. On CPU, cross-process collectives go
    through gloo (`jax_cpu_collectives_implementation`).
    """
    if coordinator_address is None and not auto:
        return False
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ValueError(
            "coordinator_address needs num_processes and process_id too (or none of the three "
            "with auto=True on a cluster JAX can detect)"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    logger.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def make_data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `"data"` over `devices` (default: every device of every host).

    The axis is `AxisType.Auto`: shardings are given at the `jit` boundary and XLA's partitioner
    propagates them (the model code has no sharding annotations of its own).
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Split axis `batch_axis` over `"data"`, the others whole."""
    return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def host_to_global(
    local: Mapping[str, np.ndarray], mesh: Mesh, batch_axis: int = 0
) -> dict[str, jax.Array]:
    """This process's slice of a batch (numpy) -> global arrays split along `batch_axis`.

    Every process passes arrays of the same shape; the global batch axis is the local one times
    `jax.process_count()`, in process order.
    """
    sharding = batch_sharding(mesh, batch_axis)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local.items()
    }


def gather_to_host(tree: Any) -> Any:
    """Global arrays split along axis 0, or this process's numpy slices of such arrays ->
    numpy arrays of the whole (global) batch, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def agree_on_max(values: Sequence[int]) -> tuple[int, ...]:
    """The element-wise maximum of `values` over all processes (identity with one process)."""
    if jax.process_count() == 1:
        return tuple(int(v) for v in values)
    gathered = multihost_utils.process_allgather(np.asarray(values, dtype=np.int64))
    return tuple(int(v) for v in np.asarray(gathered).reshape(jax.process_count(), -1).max(0))


def all_gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, as a list in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), dtype=np.uint8)
    (longest,) = agree_on_max([data.size])
    padded = np.zeros((longest + 8,), dtype=np.uint8)
    padded[:8] = np.frombuffer(np.int64(data.size).tobytes(), dtype=np.uint8)
    padded[8 : 8 + data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(
        jax.process_count(), -1
    )
    out = []
    for row in gathered:
        size = int(np.frombuffer(row[:8].tobytes(), dtype=np.int64)[0])
        out.append(json.loads(row[8 : 8 + size].tobytes().decode()))
    return out


def any_process(flag: bool) -> bool:
    """Whether `flag` is True on at least one process (a host-side all-reduce)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(agree_on_max([int(bool(flag))])[0])
