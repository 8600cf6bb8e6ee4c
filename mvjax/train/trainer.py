"""One jitted training step (gradient accumulation inside it), evaluation, data parallel over devices.

The state is a plain dict, so Orbax saves it as it is::

    {"step": int32 (), "rng": uint32 (2,), "trainable": {...}, "opt_state": optax state}

A step takes ``rows`` of shape (accumulation, batch, hierarchies, T + 1) and the matching speaker
embeddings (accumulation, batch, S). With a mesh, the batch axis is split over all its devices
and the weights, gradients and optimiser state are laid out by :mod:`mvjax.train.sharding`
(replicated, or sharded over an ``fsdp`` axis); XLA combines the gradients across devices, so the
loss and the update are those of one device on the whole batch. The compiled functions are given
their input and output shardings, so the state stays where it is from step to step, also when the
mesh spans several processes (``jax.distributed``). Dropout keys are ``fold_in(rng, step)``, so a
resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from mvjax.core.parallel import device_count
from mvjax.nn.config import GPTConfig
from mvjax.train.model import (
    TrainSpec,
    TrainSpecError,
    loss_sums,
    mean_loss,
    split_params,
)
from mvjax.train.optim import OptimConfig, learning_rate_schedule, make_optimizer
from mvjax.train.sharding import abstract_device_bytes, batch_sharding, put, replicated, tree_shardings


def new_state(tx: optax.GradientTransformation, trainable: dict, seed: int = 0) -> dict:
    """The training state (layout in the module docstring) at step 0."""
    trainable = jax.tree_util.tree_map(jnp.asarray, trainable)
    return {
        "step": jnp.zeros((), jnp.int32),
        "rng": jnp.asarray(jax.random.key_data(jax.random.PRNGKey(seed)), jnp.uint32),
        "trainable": trainable,
        "opt_state": tx.init(trainable),
    }


def _stored_as(a, dtype):
    """A frozen weight at the compute dtype (floats only; an abstract leaf gives the new shape and dtype)."""
    if not np.issubdtype(a.dtype, np.floating):
        return a
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a.shape, dtype)
    return np.asarray(a).astype(dtype)


class Trainer:
    """Holds the frozen weights and the compiled step; the trainable state travels in and out."""

    def __init__(self, config: GPTConfig, params: dict, spec: TrainSpec, optim: OptimConfig, pad_token: int,
                 mesh: Optional[Mesh] = None, lora_seed: int = 0):
        """``params``: the converted first-stage tree; or an abstract one (``jax.ShapeDtypeStruct`` leaves),
        which makes a trainer that only traces and lowers (``trainer._step.trace(...)``; what
        ``python -m benchmarks.lowering`` does for the released shape without allocating its weights)."""
        self.config, self.spec, self.optim, self.pad_token, self.mesh = config, spec, optim, int(pad_token), mesh
        abstract = any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree_util.tree_leaves(params))
        self.frozen, self.initial_trainable = split_params(config, spec, params, jax.random.PRNGKey(lora_seed))
        self.tx = make_optimizer(optim, self.initial_trainable)
        self.schedule = learning_rate_schedule(optim)
        if spec.compute_dtype != "float32":
            # Frozen weights never update: stored at the compute precision, they take half the memory and
            # are not cast again every step. Trainable weights stay float32 (the optimiser's masters).
            dtype = jnp.dtype(spec.compute_dtype)
            self.frozen = jax.tree_util.tree_map(functools.partial(_stored_as, dtype=dtype), self.frozen)
        self.frozen_shardings = self.state_shardings = None
        if mesh is not None:
            self.frozen_shardings = tree_shardings(self.frozen, mesh)
            self.state_shardings = self._state_shardings()
        if not abstract:
            # Frozen weights go to the devices once: passed as host arrays, every step would copy them again.
            self.frozen = (jax.device_put(self.frozen) if mesh is None else put(self.frozen, self.frozen_shardings))
        # The frozen weights are an argument of every compiled function, never a closure: closed over,
        # XLA would bake them into the executable as constants (a second copy, and slow compiles).
        if mesh is None:
            self._step = jax.jit(self._step_impl, donate_argnums=(0,))
            self._eval = jax.jit(self._eval_impl)
            self._init = jax.jit(self._init_impl, static_argnums=(1,))
        else:
            rows, by_row, one = batch_sharding(mesh, 4, 1), batch_sharding(mesh, 3, 1), replicated(mesh)
            self._step = jax.jit(self._step_impl, donate_argnums=(0,),
                                 in_shardings=(self.state_shardings, self.frozen_shardings, rows, by_row),
                                 out_shardings=(self.state_shardings, one))
            trainable = self.state_shardings["trainable"]
            self._eval = jax.jit(self._eval_impl, out_shardings=(one, one),
                                 in_shardings=(self.frozen_shardings, trainable, batch_sharding(mesh, 3, 0),
                                               batch_sharding(mesh, 2, 0), batch_sharding(mesh, 1, 0)))
            self._init = jax.jit(self._init_impl, static_argnums=(1,), in_shardings=(trainable,),
                                 out_shardings=self.state_shardings)
        self._losses = jax.jit(self._token_losses_impl)

    # State ---------------------------------------------------------------------------------
    def _state_shardings(self) -> dict:
        """The state's layout: trainable weights and optimiser moments by the sharding rule, step and RNG
        replicated (the rule would split the two words of the key)."""
        shapes = jax.eval_shape(lambda t: new_state(self.tx, t, 0), self.initial_trainable)
        one = replicated(self.mesh)
        return {"step": one, "rng": one, "trainable": tree_shardings(shapes["trainable"], self.mesh),
                "opt_state": tree_shardings(shapes["opt_state"], self.mesh)}

    def _init_impl(self, trainable, seed):
        return new_state(self.tx, trainable, seed)

    def init_state(self, seed: int = 0) -> dict:
        """The step-0 state, made on the devices in its final layout (no device ever holds it whole)."""
        trainable = self.initial_trainable
        if self.mesh is not None:
            trainable = put(trainable, self.state_shardings["trainable"])
        return self._init(trainable, int(seed))

    def place(self, state: dict) -> dict:
        """Lay a state out over the mesh as the step expects it (no-op without one)."""
        if self.mesh is None:
            return state
        return jax.device_put(state, self.state_shardings)

    def abstract_state(self) -> dict:
        """Shapes and dtypes of the state, with its shardings when there is a mesh (what a checkpoint restores
        into: each process then reads only its own devices' shards)."""
        shapes = jax.eval_shape(lambda t: new_state(self.tx, t, 0), self.initial_trainable)
        if self.mesh is None:
            return shapes
        return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      shapes, self.state_shardings)

    def bytes_per_device(self) -> dict:
        """Bytes one device holds of the weights (frozen and trainable), the gradients and the optimiser state,
        from shapes and the layout alone (works for an abstract trainer): the peak of these, activations aside,
        is their sum during the update, when the gradients are alive beside the state."""
        shapes = jax.eval_shape(lambda t: new_state(self.tx, t, 0), self.initial_trainable)
        if self.mesh is None:
            def count(tree, _):
                return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
                           for a in jax.tree_util.tree_leaves(tree))
            lay = {"trainable": None, "opt_state": None}
            frozen_lay = None
        else:
            count, lay, frozen_lay = abstract_device_bytes, self.state_shardings, self.frozen_shardings
        frozen = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), self.frozen)
        trainable = count(shapes["trainable"], lay["trainable"])
        return {"frozen": count(frozen, frozen_lay), "trainable": trainable, "grads": trainable,
                "opt_state": count(shapes["opt_state"], lay["opt_state"])}

    # Batches -------------------------------------------------------------------------------
    def _put(self, array, batch_axis: int):
        """A batch split over every device of the mesh; each process copies in only its own devices' rows."""
        if self.mesh is None:
            return jnp.asarray(array)
        array = np.asarray(array)
        n = device_count(self.mesh)
        if array.shape[batch_axis] % n:
            raise TrainSpecError(f"batch of {array.shape[batch_axis]} rows does not split over {n} devices")
        return put(array, batch_sharding(self.mesh, array.ndim, batch_axis))

    def _gather(self, read, idx: np.ndarray, row_shape: tuple, dtype, batch_axis: int):
        """The batch ``read(ids)`` of row ids ``idx`` (shape idx.shape + row_shape), split over the mesh along
        ``batch_axis``, each process reading only the rows of ``idx`` that land on its own devices: the callback
        gets a device's index into the global batch and reads just those rows (``read`` checks what it reads)."""
        shape = tuple(idx.shape) + tuple(row_shape)
        if self.mesh is None:
            return jnp.asarray(read(idx.reshape(-1)).reshape(shape))
        n = device_count(self.mesh)
        if idx.shape[batch_axis] % n:
            raise TrainSpecError(f"batch of {idx.shape[batch_axis]} rows does not split over {n} devices")

        def rows_of(index):
            ids = idx[tuple(index[: idx.ndim])]
            rows = read(ids.reshape(-1)).reshape(ids.shape + tuple(row_shape))
            return rows[(slice(None),) * idx.ndim + tuple(index[idx.ndim:])]

        return jax.make_array_from_callback(shape, batch_sharding(self.mesh, len(shape), batch_axis), rows_of,
                                            dtype=dtype)

    # Step ----------------------------------------------------------------------------------
    def _grads(self, frozen, trainable, rows, spk, key):
        def loss_fn(t):
            loss, _ = mean_loss(self.config, self.spec, frozen, t, rows, spk, key, self.pad_token,
                                deterministic=not self.spec.dropout)
            return loss

        return jax.value_and_grad(loss_fn)(trainable)

    def _step_impl(self, state, frozen, rows, spk):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl="threefry2x32"), state["step"])
        trainable = state["trainable"]
        accumulation = rows.shape[0]
        if accumulation == 1:
            loss, grads = self._grads(frozen, trainable, rows[0], spk[0], jax.random.fold_in(step_key, 0))
        else:
            def micro(carry, inputs):
                loss_sum, grad_sum = carry
                r, s, i = inputs
                loss, grads = self._grads(frozen, trainable, r, s, jax.random.fold_in(step_key, i))
                return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
            (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros),
                                            (rows, spk, jnp.arange(accumulation)))
            loss = loss / accumulation
            grads = jax.tree_util.tree_map(lambda g: g / accumulation, grads)
        if self.mesh is not None:  # gradients laid out as their weights (reduce-scattered under fsdp)
            grads = jax.lax.with_sharding_constraint(grads, self.state_shardings["trainable"])
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], trainable)
        new_state = {
            "step": state["step"] + 1,
            "rng": state["rng"],
            "trainable": optax.apply_updates(trainable, updates),
            "opt_state": opt_state,
        }
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.schedule(state["step"])}
        return new_state, metrics

    def step(self, state: dict, rows: np.ndarray, spk: np.ndarray) -> tuple[dict, dict]:
        """One optimiser update. rows: (accumulation, batch, H, T+1) int; spk: (accumulation, batch, S)."""
        rows = np.asarray(rows, np.int32)
        spk = np.asarray(spk, np.float32)
        if rows.ndim == 3:
            rows, spk = rows[None], spk[None]
        return self._step(state, self.frozen, self._put(rows, 1), self._put(spk, 1))

    def step_rows(self, state: dict, split, idx) -> tuple[dict, dict]:
        """One optimiser update on rows ``idx`` (accumulation, batch) of ``split`` (a
        :class:`mvjax.train.split_reader.SplitReader`, or anything with its ``tokens``/``spk`` shapes and
        ``tokens_rows``/``spk_rows`` readers). The same update as :meth:`step` on ``split``'s arrays indexed by
        ``idx``, but each process reads only the rows its own devices hold (the whole batch without a mesh)."""
        idx = np.asarray(idx, np.int64)
        if idx.ndim == 1:
            idx = idx[None]
        rows = self._gather(split.tokens_rows, idx, split.tokens.shape[1:], np.int32, 1)
        spk = self._gather(split.spk_rows, idx, split.spk.shape[1:], np.float32, 1)
        return self._step(state, self.frozen, rows, spk)

    # Evaluation ----------------------------------------------------------------------------
    def _eval_impl(self, frozen, trainable, rows, spk, row_weight):
        total, weight, _ = loss_sums(self.config, self.spec, frozen, trainable, rows, spk, jax.random.PRNGKey(0),
                                     self.pad_token, deterministic=True, row_weight=row_weight)
        return total, weight

    def evaluate(self, trainable: dict, rows: np.ndarray, spk: np.ndarray, batch_size: int) -> float:
        """Mean loss over every counted position of ``rows`` (N, H, T+1): per head, then over heads.
        The last partial batch is padded with copies that carry no weight, so one program serves all."""
        rows = np.asarray(rows, np.int32)
        spk = np.asarray(spk, np.float32)
        n = rows.shape[0]
        if n == 0:
            return float("nan")
        total = weight = 0.0
        for start in range(0, n, batch_size):
            idx = np.arange(start, start + batch_size)
            real = (idx < n).astype(np.float32)
            idx = np.minimum(idx, n - 1)
            t, w = self._eval(self.frozen, trainable, self._put(rows[idx], 0), self._put(spk[idx], 0), self._put(real, 0))
            total = total + np.asarray(t, np.float64)
            weight = weight + np.asarray(w, np.float64)
        return float(np.mean(total / np.maximum(weight, 1.0)))

    def _token_losses_impl(self, frozen, trainable, rows, spk):
        _, losses = mean_loss(self.config, self.spec, frozen, trainable, rows, spk, jax.random.PRNGKey(0),
                              self.pad_token, deterministic=True)
        return losses

    def token_losses(self, trainable: dict, rows: np.ndarray, spk: np.ndarray) -> np.ndarray:
        """Per-position losses (B, H, T) without dropout."""
        return np.asarray(self._losses(self.frozen, trainable, jnp.asarray(rows, jnp.int32), jnp.asarray(spk, jnp.float32)))

