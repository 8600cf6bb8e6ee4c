"""The training loop: data -> jitted steps -> evaluation, checkpoints, metrics; fresh or resumed.

The same loop runs as one process or as each process of a ``jax.distributed`` job. Every process
computes the same batch indices (a pure function of the step), reads from the memory-mapped training
split only the rows its own devices take (:meth:`mvjax.train.trainer.Trainer.step_rows`; the
validation split is small and read whole by each) and takes part in every step, evaluation and checkpoint (Orbax
writes each process's shards; process 0 writes the metadata). Process 0 alone writes ``run.json``,
``metrics.jsonl``, TensorBoard events and the log; the others wait for ``run.json`` at a barrier.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from tqdm import tqdm

from mvjax.io.checkpoint import load_gpt_stage, read_manifest
from mvjax.train.data import load_split
from mvjax.train.job import latest_checkpoint, peer_failure, resume_hint_for, set_resume_hint
from mvjax.train.model import TrainSpec
from mvjax.train.optim import OptimConfig
from mvjax.train.run import (
    LoopConfig,
    MetricsLog,
    RunError,
    batch_rows,
    checkpoint_manager,
    read_run_file,
    restore_checkpoint,
    run_configs,
    save_checkpoint,
    write_run_file,
)
from mvjax.train.sharding import MeshError, training_mesh
from mvjax.train.split_reader import open_split
from mvjax.train.trainer import Trainer


def _model_digest(model_dir: Path) -> str:
    return read_manifest(model_dir)["components"]["first_stage"]["params_sha256"]


def _check_data(data_manifest: dict, cfg, tok) -> None:
    pad = tok.offset - 1
    problems = []
    if int(data_manifest.get("pad_token", -1)) != pad:
        problems.append(f"pad token {data_manifest.get('pad_token')} (model: {pad})")
    ctx = int(data_manifest.get("ctx_window", 0))
    if not 0 < ctx <= cfg.block_size:
        problems.append(f"context window {ctx} (model block: {cfg.block_size})")
    if cfg.speaker_emb_dim is not None and int(data_manifest.get("speaker_emb_dim", -1)) != cfg.speaker_emb_dim:
        problems.append(f"speaker embedding size {data_manifest.get('speaker_emb_dim')} (model: {cfg.speaker_emb_dim})")
    if problems:
        raise RunError("the data was prepared for another model: " + "; ".join(problems))


def open_run(run_dir: Path, model_dir: Optional[Path], data_dir: Optional[Path], spec: TrainSpec, optim: OptimConfig,
             loop: LoopConfig, resume: bool, changed: dict) -> dict:
    """Create ``run.json`` for a fresh run, or check a resumed run's request against it. ``changed``:
    settings given explicitly on the command line (name -> value), compared on resume."""
    if (run_dir / "run.json").exists():
        if not resume:
            raise RunError(f"{run_dir} already holds a training run; pass --resume to continue it, or another --out")
        settings = read_run_file(run_dir)
        old_spec, old_optim, old_loop = run_configs(settings)
        current = {**old_spec.to_dict(), **old_optim.to_dict(), **vars(old_loop),
                   "model": settings["model"], "data": settings["data"]}
        clash = [k for k, v in changed.items()
                 if k not in ("steps", "model", "data") and k in current and _differs(current[k], v)]
        if clash:
            raise RunError(f"--resume continues the run as it was set up; it cannot change {', '.join(sorted(clash))}")
        if "steps" in changed and changed["steps"] != old_loop.steps:
            if old_optim.schedule != "constant":
                raise RunError("the learning-rate schedule depends on --steps: a cosine run cannot change it on resume")
            settings["loop"]["steps"] = int(changed["steps"])
            settings["optim"]["total_steps"] = int(changed["steps"])
            write_run_file(run_dir, {k: v for k, v in settings.items() if k not in ("format", "version")})
        return settings
    if resume:
        raise RunError(f"nothing to resume: {run_dir} holds no run.json")
    if model_dir is None or data_dir is None:
        raise RunError("a new run needs --model and --data")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunError(f"{run_dir} exists and is not empty; choose a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {"model": str(Path(model_dir).absolute()), "model_first_stage_sha256": _model_digest(Path(model_dir)),
                "data": str(Path(data_dir).absolute()), "spec": spec.to_dict(), "optim": optim.to_dict(),
                "loop": dict(vars(loop))}
    write_run_file(run_dir, settings)
    return settings


def _differs(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a or []) != list(b or [])
    if isinstance(a, float) or isinstance(b, float):
        return not math.isclose(float(a), float(b), rel_tol=1e-12)
    return a != b


def load_run_model(settings: dict):
    """(config, params, tokenizer) of the run's base first stage, checked against the recorded digest."""
    model_dir = Path(settings["model"])
    if _model_digest(model_dir) != settings.get("model_first_stage_sha256"):
        raise RunError(f"the base model {model_dir} changed since the run started (first-stage digest differs)")
    return load_gpt_stage(model_dir, "first_stage")


def _open_everywhere(run_dir: Path, *args) -> dict:
    """:func:`open_run` on process 0, then every other process reads the ``run.json`` it wrote. Process 0's
    outcome is broadcast first, so a refused run stops every process with an error, not a wait."""
    if jax.process_count() == 1:
        return open_run(run_dir, *args)
    from jax.experimental import multihost_utils  # multi-process only

    error = None
    if jax.process_index() == 0:
        try:
            open_run(run_dir, *args)
        except RunError as exc:
            error = exc
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if error is not None:
        raise error
    if failed:
        raise RunError("process 0 refused the run (its message says why)")
    return read_run_file(run_dir)


class _Quiet:
    """The metrics log of processes other than 0: they write nothing."""

    def write(self, *args) -> None:
        pass

    def close(self) -> None:
        pass


def train(run_dir: Path, model_dir: Optional[Path], data_dir: Optional[Path], spec: TrainSpec, optim: OptimConfig,
          loop: LoopConfig, resume: bool = False, changed: Optional[dict] = None,
          log: Callable[[str], None] = print, progress: bool = True, fsdp: int = 1) -> dict:
    """Train (or resume) a run; returns a summary (final step, last losses, best validation loss).

    ``fsdp``: devices over which weights, gradients and optimiser state are sharded (see
    :mod:`mvjax.train.sharding`); a setting of this invocation, not of the run, so a resumed run may
    use another degree or another number of processes and devices."""
    run_dir = Path(run_dir)
    main = jax.process_index() == 0
    if not main:
        log, progress = (lambda message: None), False
    settings = _open_everywhere(run_dir, model_dir, data_dir, spec, optim, loop, resume, changed or {})
    spec, optim, loop = run_configs(settings)
    cfg, params, tok = load_run_model(settings)
    train_split = open_split(Path(settings["data"]), "train")  # headers only: rows are read as steps take them
    _check_data(train_split.manifest, cfg, tok)
    try:
        val_split = load_split(Path(settings["data"]), "val")
    except FileNotFoundError:
        val_split = None
    devices = jax.device_count()
    try:
        mesh = training_mesh(fsdp) if devices > 1 or fsdp > 1 else None
    except MeshError as exc:
        raise RunError(str(exc)) from None
    if mesh is not None and loop.batch_size % devices:
        raise RunError(f"--batch-size {loop.batch_size} does not split over {devices} devices")
    trainer = Trainer(cfg, params, spec, optim, tok.offset - 1, mesh=mesh, lora_seed=loop.seed)
    del params
    manager = checkpoint_manager(run_dir, loop.keep)
    state, start = trainer.init_state(loop.seed), 0
    if resume and manager.latest_step() is not None:
        start = int(manager.latest_step())
        state, meta = restore_checkpoint(manager, start, trainer.abstract_state())
        state = trainer.place(state)
        if int(meta.get("rows_seen", -1)) != start * loop.rows_per_step:
            raise RunError(f"checkpoint {start} records a data position that does not match its step")
        log(f"resuming at step {start} (data row {start * loop.rows_per_step})")
    metrics = MetricsLog(run_dir, start, log) if main else _Quiet()
    n_train, ctx = len(train_split), train_split.ctx_window
    log(f"training {n_train} rows ({0 if val_split is None else len(val_split.tokens)} validation), "
        f"{loop.rows_per_step} rows x {ctx} tokens per step, steps {start}..{loop.steps}")

    def evaluate(step: int) -> Optional[float]:
        if val_split is None or not len(val_split.tokens):
            return None
        rows = val_split.tokens if not loop.eval_rows else val_split.tokens[: loop.eval_rows]
        spk = val_split.spk[: len(rows)]
        value = trainer.evaluate(state["trainable"], rows, spk, loop.batch_size)
        metrics.write("eval", step, {"val_loss": value})
        return value

    best = None
    if start == 0:
        best = evaluate(0)
        if best is not None:
            log(f"step 0: validation loss {best:.4f}")
    bar = _progress(loop.steps, start, progress)
    last = {}
    set_resume_hint(resume_hint_for(start if start else None))
    try:
        for step in range(start, loop.steps):
            idx = batch_rows(n_train, step * loop.rows_per_step, loop.rows_per_step, loop.seed)
            t0 = time.perf_counter()
            state, m = trainer.step_rows(state, train_split, idx.reshape(loop.grad_accum, loop.batch_size))
            last = {k: float(v) for k, v in m.items()}
            seconds = time.perf_counter() - t0
            last.update(step_time_s=seconds, tokens_per_s=loop.rows_per_step * ctx / seconds)
            done = step + 1
            metrics.write("train", done, last)
            val = None
            if done % loop.eval_every == 0 or done == loop.steps:
                val = evaluate(done)
                if val is not None:
                    best = val if best is None else min(best, val)
                    log(f"step {done}: loss {last['loss']:.4f}, validation loss {val:.4f}")
            if done % loop.save_interval == 0 or done == loop.steps:
                save_checkpoint(manager, state, {"step": done, "rows_seen": done * loop.rows_per_step,
                                                 "loss": last["loss"], "val_loss": val}, val)
                set_resume_hint(resume_hint_for(done))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
    except Exception as exc:
        failure = peer_failure(exc)
        if failure is None:
            raise
        # A peer is gone: waiting for Orbax's barriers or closing would wait for it. Leave at once, naming the
        # last checkpoint committed on disk (the one being written when the peer died may be complete).
        manager = None
        set_resume_hint(resume_hint_for(latest_checkpoint(run_dir)))
        failure = peer_failure(exc)
        raise failure from None
    finally:
        if bar is not None:
            bar.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
        metrics.close()
    return {"step": loop.steps, "last": last, "best_val_loss": best}


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc="training", unit="step", file=sys.stderr,
                disable=not sys.stderr.isatty())

