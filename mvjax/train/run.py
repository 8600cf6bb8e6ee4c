"""A training run on disk: its settings, Orbax checkpoints, metrics, resume and restore.

Layout of ``RUN``::

    RUN/run.json              every setting (model, data, what trains, optimiser, loop), written first
    RUN/checkpoints/<step>/   Orbax CheckpointManager: ``state`` (trainable params, optimiser state,
                              step, RNG) and ``meta`` (data position, losses); the last ``keep``
                              and the best by validation loss are kept
    RUN/metrics.jsonl         one JSON object per logged event (train step, eval)
    RUN/tensorboard/          TensorBoard event files (with the ``train`` extra: tensorboardX)

The frozen weights are not copied: they are read again from the model named in ``run.json``,
whose first-stage digest must still match. Batches are a pure function of the step (per-epoch
permutations seeded by ``seed``), and dropout keys are ``fold_in(rng, step)``, so a run resumed
from a checkpoint takes the same steps as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from mvjax.core.atomic import write_bytes
from mvjax.core.errors import MvjaxError
from mvjax.train.model import TrainSpec
from mvjax.train.optim import OptimConfig

RUN_FORMAT = "mvjax-finetune-run"
RUN_VERSION = 1


class RunError(MvjaxError, ValueError):
    """A run directory that is missing, incompatible with the request, or damaged."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int = 1000
    batch_size: int = 2
    grad_accum: int = 1
    seed: int = 1337
    eval_every: int = 100
    save_every: int = 0  # 0 = at every evaluation
    keep: int = 3  # last N checkpoints kept, besides the best by validation loss
    eval_rows: int = 0  # 0 = every validation row

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "keep"):
            if getattr(self, name) < 1:
                raise RunError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.save_every < 0 or self.eval_rows < 0:
            raise RunError("save_every and eval_rows must be >= 0")
        if not 0 <= self.seed < 2**32:
            raise RunError(f"seed must be in [0, 2^32 - 1], got {self.seed}")

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def save_interval(self) -> int:
        return self.save_every or self.eval_every


def batch_rows(n_rows: int, start: int, count: int, seed: int) -> np.ndarray:
    """Rows ``start .. start + count`` of the endless stream of per-epoch shuffles of ``n_rows`` rows
    (epoch ``e`` is ``permutation(n_rows)`` from a generator seeded by ``(seed, e)``)."""
    out = np.empty(count, np.int64)
    for i, pos in enumerate(range(start, start + count)):
        epoch, offset = divmod(pos, n_rows)
        out[i] = _permutation(n_rows, seed, epoch)[offset]
    return out


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


# run.json ------------------------------------------------------------------------------------
def write_run_file(run_dir: Path, settings: dict) -> None:
    body = {"format": RUN_FORMAT, "version": RUN_VERSION, **settings}
    write_bytes(run_dir / "run.json", (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


def read_run_file(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a training run (no run.json)")
    try:
        settings = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is damaged: {exc}") from None
    if settings.get("format") != RUN_FORMAT or settings.get("version") != RUN_VERSION:
        raise RunError(f"{path} is not a version-{RUN_VERSION} {RUN_FORMAT} file")
    return settings


def run_configs(settings: dict) -> tuple[TrainSpec, OptimConfig, LoopConfig]:
    try:
        return (TrainSpec.from_dict(settings["spec"]), OptimConfig.from_dict(settings["optim"]),
                LoopConfig(**settings["loop"]))
    except (KeyError, TypeError) as exc:
        raise RunError(f"run.json lacks or mangles a setting: {exc}") from None


# Checkpoints ---------------------------------------------------------------------------------
def checkpoint_manager(run_dir: Path, keep: int, read_only: bool = False):
    policy = AnyPreservationPolicy([
        LatestN(n=keep),
        BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options,
                                 item_names=("state", "meta"))


def save_checkpoint(manager, state: dict, meta: dict, val_loss: Optional[float]) -> None:
    metrics = {"val_loss": float(val_loss)} if val_loss is not None and math.isfinite(val_loss) else None
    manager.save(int(meta["step"]), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave(meta)), metrics=metrics)


def pick_step(manager, step) -> int:
    """``step``: an int, ``"best"`` (lowest validation loss) or None / ``"latest"``."""
    steps = list(manager.all_steps())
    if not steps:
        raise RunError("the run has no checkpoint yet")
    if step in (None, "latest"):
        return int(manager.latest_step())
    if step == "best":
        scored = []
        for s in steps:
            meta = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            val = meta.get("val_loss") if isinstance(meta, dict) else None
            if isinstance(val, (int, float)) and math.isfinite(val):
                scored.append((float(val), int(s)))
        if not scored:
            raise RunError("no checkpoint of this run has a validation loss (no validation data?)")
        return min(scored)[1]
    if int(step) not in steps:
        raise RunError(f"no checkpoint at step {step}; the run keeps {sorted(steps)}")
    return int(step)


def _placed(abstract_state: dict) -> dict:
    """Every leaf with a sharding: a checkpoint written by another set of devices (other processes, another
    mesh) restores only into an explicit layout; leaves without one go to this process's first device."""
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda a: a if getattr(a, "sharding", None) is not None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here),
        abstract_state)


def restore_checkpoint(manager, step: int, abstract_state: dict) -> tuple[dict, dict]:
    """The state and metadata of checkpoint ``step``, laid out as ``abstract_state`` says (or on one device);
    under jax.distributed every process reads only the shards of its own devices."""
    abstract_state = _placed(abstract_state)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
    except Exception as exc:  # noqa: BLE001 - orbax raises many types for a damaged checkpoint
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"checkpoint {step} cannot be restored: {detail}") from None
    return restored["state"], dict(restored["meta"])


# Metrics -------------------------------------------------------------------------------------
class MetricsLog:
    """``metrics.jsonl`` (rewritten without the entries after ``resume_step`` on resume, so a killed run
    leaves no steps its continuation repeats) and TensorBoard events when tensorboardX is installed."""

    def __init__(self, run_dir: Path, resume_step: int, log: Callable[[str], None]):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
            write_bytes(self.path, ("\n".join(kept) + "\n" if kept else "").encode())
        self._fh = open(self.path, "a")
        self.writer = None
        try:
            from tensorboardX import SummaryWriter  # optional (mvjax[train]) and ~1 s to import
        except ImportError:
            log("TensorBoard events off: pip install 'mvjax[train]' (tensorboardX) to write them")
        else:
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, kind: str, step: int, values: dict) -> None:
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3),
                  **{k: float(v) for k, v in values.items()}}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{kind}/{key}", float(value), int(step))
            self.writer.flush()

    def close(self) -> None:
        self._fh.close()
        if self.writer is not None:
            self.writer.close()
