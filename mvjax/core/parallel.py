"""Data parallelism over the local devices, and multi-host setup.

Parameters are replicated and the batch is split along one mesh axis, ``data``. A batch
is padded to a multiple of the device count with copies of its first row (whose results
are dropped), so every device gets the same number of rows. Each process builds its mesh
from its own (addressable) devices: with several hosts, every process takes its own share
of the inputs (:func:`process_share`) and writes its own outputs, so nothing crosses hosts.
Processes find each other from explicit settings, the ``JAX_*`` variables, or a cluster that
JAX itself detects (:func:`initialize_distributed`).
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mvjax.core.errors import MvjaxError

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


class ClusterError(MvjaxError, RuntimeError):
    """The multi-process setup cannot be worked out (a bad cluster environment)."""


def detected_cluster() -> Optional[tuple[str, int]]:
    """(name, process count) of the cluster environment ``jax.distributed.initialize()`` would detect by
    itself (Slurm, Open MPI, Cloud TPU pods, Kubernetes; never the opt-in mpi4py), or None outside one.

    JAX keeps its cluster environments in a private module; if a JAX release moves them, this says so
    once (a warning) and returns None: the run is then one process unless told otherwise."""
    try:
        from jax._src.clusters import ClusterEnv  # inside the try: a private module a JAX release may move

        envs = [env for env in ClusterEnv._cluster_types if not env.opt_in_only_method]
    except (ImportError, AttributeError) as exc:
        logging.getLogger("mvjax").warning(
            "cannot ask this JAX for its cluster environments (%s): Slurm/TPU pods are not detected; give "
            "--coordinator/--num-processes/--process-id or the JAX_* variables for several processes", exc)
        return None
    env = next((env for env in envs if env.is_env_present()), None)
    if env is None:
        return None
    try:
        count = int(env.get_process_count())
    except (KeyError, ValueError, TypeError) as exc:
        raise ClusterError(f"a {env.name} environment was detected but its task count cannot be read: {exc}") from None
    return env.name, count


def _env_int(name: str) -> Optional[int]:
    text = os.environ.get(name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ClusterError(f"{name} must be an integer, not {text!r}") from None


def requested_processes(num_processes: Optional[int] = None) -> tuple[int, Optional[str]]:
    """(how many processes this run is one of, the cluster JAX detects or None): ``num_processes``,
    else ``JAX_NUM_PROCESSES``, else the detected cluster's task count, else 1. Touches no device."""
    cluster = detected_cluster()
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if num_processes is None:
        num_processes = 1 if cluster is None else cluster[1]
    return num_processes, None if cluster is None else cluster[0]


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, **options) -> bool:
    """Start ``jax.distributed`` when this run is one of several processes; True if it did.

    Explicit arguments or the ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``
    variables are passed on (JAX fills in the rest from a cluster environment). Without them, a cluster
    that JAX detects (:func:`detected_cluster`: Slurm, TPU pods, ...) with more than one task starts
    ``jax.distributed.initialize()`` with no arguments, as JAX would; a one-task job needs no coordinator
    and stays a plain single process. ``options`` go to ``jax.distributed.initialize`` as they are (timeouts).
    Call it before anything touches a device."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    given = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    count, cluster = requested_processes(given)
    if coordinator is None:
        if count <= 1:
            return False
        if cluster is None:
            raise ClusterError("--num-processes needs --coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS) outside "
                               "a cluster that JAX detects (Slurm, TPU pods, ...)")
    kwargs = {"coordinator_address": coordinator, "num_processes": given, "process_id": process_id}
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None}, **options)
    return True


def process_share(items: Sequence[T], process_index: Optional[int] = None, process_count: Optional[int] = None) -> list[tuple[int, T]]:
    """This process's share of ``items`` as (index, item) pairs: a round-robin split, so every item
    goes to exactly one process and the shares differ in size by at most one."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return [(i, item) for i, item in enumerate(items) if i % count == index]
