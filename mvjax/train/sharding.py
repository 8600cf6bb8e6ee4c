"""Where training arrays live: a ``("data", "fsdp")`` mesh over every device of every process.

The batch is split over *all* devices (both axes: each device computes the loss of its own rows).
Parameters, their gradients and the optimiser's moments are sharded over the ``fsdp`` axis of K
devices and replicated over ``data`` (the other ``devices / K``), so each device holds about 1/K of
them; XLA gathers a weight where a step needs it whole and reduce-scatters its gradient back.

The rule for one array (:func:`shard_spec`): split it along its **largest dimension that K
divides** (the first such when several tie); arrays with fewer than :data:`MIN_SHARDED_ELEMENTS`
elements (norm gains, biases, scalars such as Adam's step count), and arrays with no dimension K
divides, are replicated: for them a gather costs more than the bytes it saves. The optimiser
state follows the same rule, so each moment sits with its parameter. With K = 1 everything is
replicated: plain data parallelism, as before.

Arrays are built with :func:`put` (``jax.make_array_from_callback``): each process supplies only the
shards of its own devices, which is what makes the same code run on one process or on several
(``jax.distributed``), where no process can place data on another's devices.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mvjax.core.errors import MvjaxError
from mvjax.core.parallel import DATA_AXIS

FSDP_AXIS = "fsdp"
MIN_SHARDED_ELEMENTS = 1024


class MeshError(MvjaxError, ValueError):
    """A sharding request the devices cannot meet (K does not divide the device count, ...)."""


def training_mesh(fsdp: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """``(data, fsdp)`` over ``devices`` (default: every device of every process, in JAX's order, which
    keeps each fsdp group on as few processes as possible: the weight gathers are the busiest traffic)."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise MeshError(f"--fsdp {fsdp} does not divide the {len(devices)} devices of this job")
    return Mesh(np.array(devices).reshape(len(devices) // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS))


def fsdp_degree(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else int(dict(mesh.shape).get(FSDP_AXIS, 1))


def shard_spec(shape: Sequence[int], k: int) -> P:
    """The partition of one array of ``shape`` over an fsdp axis of ``k`` devices (rule in the module docstring)."""
    shape = tuple(int(d) for d in shape)
    if k <= 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_ELEMENTS:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % k == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], -i))
    spec = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return P(*spec)


def tree_shardings(tree, mesh: Mesh):
    """A NamedSharding per leaf of ``tree`` (arrays or ``ShapeDtypeStruct``) by :func:`shard_spec`."""
    k = fsdp_degree(mesh)
    return jax.tree_util.tree_map(lambda a: NamedSharding(mesh, shard_spec(np.shape(a), k)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, axis: int) -> NamedSharding:
    """Axis ``axis`` of an ``ndim``-dimensional batch split over every device of the mesh."""
    spec = [None] * ndim
    spec[axis] = tuple(mesh.axis_names)
    return NamedSharding(mesh, P(*spec))


def put(tree, shardings):
    """Host arrays -> global jax.Arrays with ``shardings`` (a tree of them, or one for every leaf); each
    process copies only the slices its own devices hold (every process passes the same values)."""
    def one(a, sharding):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda a: one(a, shardings), tree)
    return jax.tree_util.tree_map(one, tree, shardings)


def device_bytes(tree) -> dict:
    """Bytes each device holds of ``tree`` (its jax.Arrays' addressable shards): {device id: bytes}."""
    out: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


def abstract_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of an abstract ``tree`` (``ShapeDtypeStruct`` leaves) laid out by ``shardings``:
    the largest shard of each leaf (every device holds the same amount under :func:`shard_spec`)."""
    total = 0
    for a, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        total += int(np.prod(s.shard_shape(tuple(a.shape)), dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return total
