"""Data parallelism over the local devices, and multi-host setup.

Parameters are replicated and the batch is split along one mesh axis, ``data``. A batch
is padded to a multiple of the device count with copies of its first row (whose results
are dropped), so every device gets the same number of rows. Each process builds its mesh
from its own (addressable) devices: with several hosts, every process takes its own share
of the inputs (:func:`process_share`) and writes its own outputs, so nothing crosses hosts.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
T = TypeVar("T")


def local_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A one-axis mesh (``data``) over this process's devices (all local devices by default)."""
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def device_count(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else int(mesh.devices.size)


def padded_size(batch: int, mesh: Optional[Mesh]) -> int:
    """``batch`` rounded up to a multiple of the mesh's device count."""
    n = device_count(mesh)
    return -(-batch // n) * n


def pad_rows(array: np.ndarray, size: int) -> np.ndarray:
    """Pad axis 0 to ``size`` with copies of row 0."""
    array = np.asarray(array)
    if array.shape[0] == size:
        return array
    filler = np.repeat(array[:1], size - array.shape[0], axis=0)
    return np.concatenate([array, filler], axis=0)


def replicated(mesh: Optional[Mesh]):
    return None if mesh is None else NamedSharding(mesh, P())


def batch_sharded(mesh: Optional[Mesh]):
    return None if mesh is None else NamedSharding(mesh, P(DATA_AXIS))


def put_replicated(tree, mesh: Optional[Mesh]):
    """Copy a parameter pytree to every device of ``mesh`` (no-op without a mesh)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))


def put_batch(array, mesh: Optional[Mesh]):
    """Split axis 0 of ``array`` over the mesh (its size must divide evenly)."""
    if mesh is None:
        return jax.numpy.asarray(array)
    return jax.device_put(array, batch_sharded(mesh))


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """``jax.distributed.initialize`` with explicit arguments, or auto-detected ones (Slurm, TPU pods,
    ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``) when none are given."""
    kwargs = {}
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator is not None:
        kwargs["coordinator_address"] = coordinator
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)


def process_share(items: Sequence[T], process_index: Optional[int] = None, process_count: Optional[int] = None) -> list[tuple[int, T]]:
    """This process's share of ``items`` as (index, item) pairs: a round-robin split, so every item
    goes to exactly one process and the shares differ in size by at most one."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return [(i, item) for i, item in enumerate(items) if i % count == index]
