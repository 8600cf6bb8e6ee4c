"""``python -m mvjax.finetune train``: every hyperparameter a flag (or a key of ``--config FILE``).

Defaults are the reference recipe (``fam/llm/finetune.py``): the last block and the final norm
train, AdamW at 3e-5 with betas 0.9/0.95 and weight decay 0.1 on matrices, gradients clipped to
norm 1.0, batch 2, dropout 0.1, constant learning rate, loss over every position, two epochs.
Batches split over every device of the job (the default batch rounded up to a multiple of their
count). ``--fsdp K`` shards weights, gradients and optimiser state over K devices (data parallel
over the rest; :mod:`mvjax.train.sharding`). Several processes form one job through
``jax.distributed``: ``--coordinator HOST:PORT --num-processes N --process-id I`` on each, the
``JAX_*`` variables, or a cluster JAX detects by itself (Slurm, TPU pods, ...). Every process
runs this same command with the same ``--out`` (a shared filesystem); process 0 writes the run's
files and the log.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mvjax.core.errors import MvjaxError
from mvjax.train.split_reader import open_split


class TrainUsageError(MvjaxError, ValueError):
    """A bad command line or config file."""


# flag -> (type, default, help). Defaults None mean "derived" (said in the help).
OPTIONS = {
    "steps": (int, None, "optimiser steps (default: two epochs over the training rows, as the reference)"),
    "batch_size": (int, 2, "rows per micro-batch, split over all local devices (when not given, rounded up to a "
                           "multiple of their count)"),
    "grad_accum": (int, 1, "micro-batches per optimiser step (gradient accumulation)"),
    "learning_rate": (float, 3e-5, "peak learning rate"),
    "schedule": (str, "constant", "constant (the reference) or cosine (warmup, then cosine decay to --min-lr)"),
    "warmup_steps": (int, 0, "linear warmup steps (cosine and constant alike; step 0 already trains)"),
    "min_lr": (float, 3e-6, "cosine's final learning rate"),
    "weight_decay": (float, 0.1, "decoupled weight decay on matrices (never on norm gains)"),
    "beta1": (float, 0.9, "AdamW beta1"),
    "beta2": (float, 0.95, "AdamW beta2"),
    "grad_clip": (float, 1.0, "clip the global gradient norm to this (0 = off)"),
    "last_n_blocks": (int, None, "top blocks trained in full, with the final norm (default 1; 0 when LoRA is on)"),
    "lora_rank": (int, 0, "LoRA rank (0 = off)"),
    "lora_alpha": (float, None, "LoRA alpha; the adapter scale is alpha / rank (default alpha = rank)"),
    "lora_targets": (str, "attn,mlp", "comma-separated: attn (c_attn, c_proj), mlp (every MLP matrix)"),
    "lora_blocks": (str, "all", "blocks that carry LoRA: all, or indices/ranges such as 0-11,20"),
    "dropout": (float, 0.1, "dropout in every block and on the embeddings while training (the reference's 0.1)"),
    "loss_mask": (str, "all", "all: every position (the reference); audio: audio targets and the first end of audio"),
    "compute_dtype": (str, "float32", "float32, or bfloat16 compute with float32 master weights (GPU/TPU)"),
    "eval_every": (int, 100, "validation loss every N steps (and at the end)"),
    "save_every": (int, 0, "checkpoint every N steps (default: at every evaluation, and at the end)"),
    "keep": (int, 3, "checkpoints kept besides the best by validation loss"),
    "eval_rows": (int, 0, "validation rows per evaluation (0 = all)"),
    "seed": (int, 1337, "data order, dropout and LoRA initialisation"),
}


AT_LEAST_ONE = ("steps", "batch_size", "grad_accum", "eval_every", "keep")
NOT_NEGATIVE = ("warmup_steps", "last_n_blocks", "lora_rank", "save_every", "eval_rows", "seed", "min_lr",
                "weight_decay", "grad_clip", "dropout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model: converted dir, released-checkpoint dir or hub id (new runs)")
    parser.add_argument("--demo", action="store_true", help="base model: the small random demo model (for trying the tools)")
    parser.add_argument("--data", help="DATA directory written by `prepare` (new runs)")
    parser.add_argument("--out", required=True, help="RUN directory (created; must be new unless --resume)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--config", help="JSON or TOML file of settings (keys as the flags, - or _); flags win")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--fsdp", type=int, default=1,
                        help="shard weights, gradients and optimiser state over this many devices (data parallel "
                             "over the rest; must divide the device count; may change on --resume)")
    job = parser.add_argument_group("multi-process (jax.distributed; Slurm and TPU pods are detected by JAX)")
    job.add_argument("--coordinator", help="HOST:PORT of process 0")
    job.add_argument("--num-processes", type=int, help="processes in the job")
    job.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")
    for name, (kind, default, text) in OPTIONS.items():
        shown = f" (default {default})" if default is not None and "(default" not in text else ""  # said once
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text + shown)


def _read_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TrainUsageError(f"--config file not found: {p}")
    if p.stat().st_size > 1 << 20:
        raise TrainUsageError(f"--config {p} is larger than 1 MiB")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            import tomllib  # here: Python 3.11+ only (on 3.10 a .toml config is refused as unparsable)

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - either parser's error becomes one line
        raise TrainUsageError(f"--config {p} cannot be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise TrainUsageError(f"--config {p} must hold a table/object of settings")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in OPTIONS:
            raise TrainUsageError(f"--config {p}: unknown setting {key!r}")
        kind = OPTIONS[name][0]
        try:
            out[name] = kind(value) if not (kind is int and isinstance(value, float) and not value.is_integer()) else None
        except (TypeError, ValueError):
            out[name] = None
        if out[name] is None or isinstance(value, bool):
            raise TrainUsageError(f"--config {p}: {key} must be a {kind.__name__}, got {value!r}")
    return out


def _blocks(text: str) -> tuple[int, ...] | None:
    if text.strip() == "all":
        return None
    out = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise TrainUsageError(f"--lora-blocks must be 'all' or indices/ranges like 0-11,20, got {text!r}") from None
    if not out:
        raise TrainUsageError("--lora-blocks names no block")
    return tuple(out)


def settings_from_args(args) -> tuple[dict, dict]:
    """(every setting with defaults filled, the settings given explicitly)."""
    explicit = _read_config(args.config) if args.config else {}
    for name in OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            explicit[name] = value
    for name, value in explicit.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise TrainUsageError(f"{flag} must be a finite number")
        if name in AT_LEAST_ONE and value is not None and value < 1:
            raise TrainUsageError(f"{flag} must be at least 1, got {value}")
        if name in NOT_NEGATIVE and value is not None and value < 0:
            raise TrainUsageError(f"{flag} must be 0 or more, got {value}")
    values = {name: explicit.get(name, default) for name, (_, default, _) in OPTIONS.items()}
    if values["last_n_blocks"] is None:
        values["last_n_blocks"] = 0 if values["lora_rank"] else 1
    return values, explicit


def build_configs(values: dict, n_train_rows: int):
    # heavy (jax, flax, optax, orbax): python -m mvjax.finetune --help builds this command's parser
    from mvjax.train.model import TrainSpec
    from mvjax.train.optim import OptimConfig
    from mvjax.train.run import LoopConfig

    steps = values["steps"]
    if steps is None:
        steps = 2 * max(1, math.ceil(n_train_rows / (values["batch_size"] * values["grad_accum"])))
    spec = TrainSpec(last_n_blocks=values["last_n_blocks"], lora_rank=values["lora_rank"],
                     lora_alpha=values["lora_alpha"],
                     lora_targets=tuple(t.strip() for t in values["lora_targets"].split(",") if t.strip()),
                     lora_blocks=_blocks(values["lora_blocks"]), dropout=values["dropout"],
                     loss_mask=values["loss_mask"], compute_dtype=values["compute_dtype"])
    optim = OptimConfig(learning_rate=values["learning_rate"], betas=(values["beta1"], values["beta2"]),
                        weight_decay=values["weight_decay"], grad_clip=values["grad_clip"],
                        schedule=values["schedule"], warmup_steps=values["warmup_steps"],
                        min_lr=min(values["min_lr"], values["learning_rate"]), total_steps=steps)
    loop = LoopConfig(steps=steps, batch_size=values["batch_size"], grad_accum=values["grad_accum"],
                      seed=values["seed"], eval_every=values["eval_every"], save_every=values["save_every"],
                      keep=values["keep"], eval_rows=values["eval_rows"])
    return spec, optim, loop


def join_job(args) -> None:
    """Join a ``jax.distributed`` job when this is one of several processes (flags, ``JAX_*``, or a cluster JAX
    detects); then check ``--fsdp`` against the job's devices. Before anything touches a device."""
    import jax  # heavy

    from mvjax.core.parallel import ClusterError
    from mvjax.train.job import join

    if args.num_processes is not None and args.num_processes < 1:
        raise TrainUsageError(f"--num-processes must be at least 1, got {args.num_processes}")
    if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or 1 << 30):
        raise TrainUsageError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
    try:
        join(args.coordinator, args.num_processes, args.process_id)
    except ClusterError as exc:
        raise TrainUsageError(str(exc)) from None
    if args.fsdp < 1 or jax.device_count() % args.fsdp:
        raise TrainUsageError(f"--fsdp {args.fsdp} does not divide the {jax.device_count()} devices of this job")


def fit_devices(values: dict, explicit: dict, resume: bool, log=print) -> None:
    """For a new run, a batch that splits over every device of the job: the default is rounded up to a multiple
    of the device count (and said), an explicit batch that does not split is an error. A resumed run keeps its
    recorded batch (the loop checks it against the devices)."""
    import jax  # heavy

    if resume:  # a resumed run keeps its recorded batch (the loop checks it against the devices)
        return
    devices, batch = jax.device_count(), values["batch_size"]
    if batch % devices == 0:
        return
    if "batch_size" in explicit:
        raise TrainUsageError(f"--batch-size {batch} does not split over {devices} devices: "
                              f"use a multiple of {devices}")
    values["batch_size"] = -(-batch // devices) * devices
    log(f"batch size {values['batch_size']}: the default {batch} rounded up to split over {devices} devices")


def run(args) -> int:
    # heavy (jax, the model and training stack): see build_configs
    from mvjax.io.checkpoint import gpt_stage_config
    from mvjax.train.loop import train
    from mvjax.train.model import validate

    values, explicit = settings_from_args(args)
    if not args.resume and (bool(args.model) == bool(args.demo) or not args.data):
        raise TrainUsageError("a new run needs --data and one of --model / --demo (or --resume to continue --out)")
    join_job(args)
    import jax  # heavy; loaded by join_job

    main = jax.process_index() == 0
    fit_devices(values, explicit, args.resume, log=print if main else (lambda message: None))
    out = Path(args.out)
    model_dir = data_dir = None
    n_rows = 1
    if not args.resume:
        from mvjax.sources.resolve import resolve_model  # heavy: as above

        data_dir = Path(args.data)
        n_rows = len(open_split(data_dir, "train"))  # headers only: no process reads the whole split
        if args.demo:
            from mvjax.sources.demo import demo_model_dir  # heavy: as above (scipy too)

            model_dir = demo_model_dir()
        else:
            model_dir = resolve_model(args.model)
    spec, optim, loop = build_configs(values, n_rows)
    if model_dir is not None:  # settings checked against the model's shape before any weight loads
        validate(gpt_stage_config(model_dir, "first_stage"), spec)
    changed = dict(explicit)
    if "beta1" in changed or "beta2" in changed:
        changed["betas"] = [changed.pop("beta1", values["beta1"]), changed.pop("beta2", values["beta2"])]
    if "lora_targets" in changed:
        changed["lora_targets"] = list(spec.lora_targets)
    if "lora_blocks" in changed:
        changed["lora_blocks"] = None if spec.lora_blocks is None else list(spec.lora_blocks)
    summary = train(out, model_dir, data_dir, spec, optim, loop, resume=args.resume, changed=changed,
                    progress=not args.no_progress, fsdp=args.fsdp)
    if not main:
        return 0
    last, best = summary["last"], summary["best_val_loss"]
    print(f"done: step {summary['step']}" + (f", loss {last['loss']:.4f}" if last else "")
          + (f", best validation loss {best:.4f}" if best is not None else "") + f"; run in {out}")
    return 0
