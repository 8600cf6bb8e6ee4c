"""Reading a training run back: the full fine-tuned first stage of one of its checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import jax

from mvjax.nn.config import GPTConfig
from mvjax.train.loop import load_run_model
from mvjax.train.model import merge_params, split_params
from mvjax.train.optim import make_optimizer
from mvjax.train.run import (
    RunError,
    checkpoint_manager,
    pick_step,
    read_run_file,
    restore_checkpoint,
    run_configs,
)
from mvjax.train.trainer import new_state


@dataclasses.dataclass(frozen=True)
class ExportSource:
    base_model: Path  # the converted model the run started from
    config: GPTConfig
    params: dict  # the full first-stage tree, trained blocks in place and LoRA merged into the weights
    step: int
    tokenizer_spec: object
    run_dir: Path
    settings: dict


def restore_for_export(run_dir: Union[str, Path], step: Optional[Union[int, str]] = None) -> ExportSource:
    """The first stage of checkpoint ``step`` (an int, ``"best"``, or None / ``"latest"``) of ``run_dir``."""
    run_dir = Path(run_dir)
    settings = read_run_file(run_dir)
    spec, optim, loop = run_configs(settings)
    if not (run_dir / "checkpoints").is_dir():
        raise RunError(f"{run_dir} has no checkpoints yet")
    cfg, params, tok = load_run_model(settings)
    frozen, trainable = split_params(cfg, spec, params)
    del params
    abstract = jax.eval_shape(lambda: new_state(make_optimizer(optim, trainable), trainable))
    manager = checkpoint_manager(run_dir, loop.keep, read_only=True)
    try:
        chosen = pick_step(manager, step)
        state, _ = restore_checkpoint(manager, chosen, abstract)
    finally:
        manager.close()
    full = merge_params(cfg, spec, frozen, state["trainable"])
    return ExportSource(Path(settings["model"]), cfg, full, chosen, tok.spec, run_dir, settings)
