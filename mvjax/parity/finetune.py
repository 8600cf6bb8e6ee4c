"""The parity tool's ``finetune`` component: the reference's first-stage fine-tuning recipe."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from convert_weights.export import released_gpt_state
from mvjax.parity.fixture import Check, Fixture, close_check, exact_check
from mvjax.text.tokenizer import normalize_text
from mvjax.train.data import build_row
from mvjax.train.model import TrainSpec, merge_params, segments
from mvjax.train.optim import OptimConfig
from mvjax.train.trainer import Trainer


def _relative_check(component: str, name: str, got, ref, rel_tol: float) -> Check:
    got, ref = np.atleast_1d(np.asarray(got, np.float64)), np.atleast_1d(np.asarray(ref, np.float64))
    if got.shape != ref.shape:
        return Check(component, name, False, float("inf"), rel_tol, f"shape {got.shape} != {ref.shape}")
    err = float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-30)))
    return Check(component, name, bool(err <= rel_tol), err, rel_tol, "relative")


def check_finetune(fx: Fixture) -> Iterator[Check]:
    """The reference fine-tuning recipe on the stage-1 fixture model: the data pipeline's token rows,
    then AdamW steps on the fixture's batches (losses, gradient norms, per-position losses, validation
    losses, the trained parameters under their checkpoint names)."""
    ft = fx.npz("finetune/finetune_cases.npz")
    cfg, params, tok = fx.stage("first_stage")
    ctx, pad = int(ft["ctx_window"]), int(ft["pad_token"])
    codebook_size = (tok.offset - 1) // 2
    rows = [build_row(tok.encode(normalize_text(str(t))), ft[f"codes_{r}"], ctx, pad, codebook_size)
            for r, t in enumerate(ft["texts"])]
    yield exact_check("finetune", "token-rows", np.stack(rows), ft["tokens"])

    spec = TrainSpec(last_n_blocks=int(ft["last_n_blocks"]), dropout=0.0)
    optim = OptimConfig(learning_rate=float(ft["learning_rate"]), betas=tuple(float(b) for b in ft["betas"]),
                        weight_decay=float(ft["weight_decay"]), grad_clip=float(ft["grad_clip"]),
                        schedule="constant", min_lr=0.0, total_steps=int(ft["steps"]))
    trainer = Trainer(cfg, params, spec, optim, pad_token=pad)
    trained_layers = [s for s in segments(cfg, spec) if s.kind == "full"][0]
    ours = sorted([n for n in released_gpt_state(cfg, params)
                   if n.startswith("transformer.ln_f.") or any(n.startswith(f"transformer.h.{layer}.")
                                                               for layer in range(trained_layers.start, trained_layers.end))])
    names = sorted(str(n) for n in ft["trainable_names"])
    yield Check("finetune", "trainable-names", ours == names, 0.0 if ours == names else 1.0, 0.0,
                "" if ours == names else f"ours {ours} vs reference {names}")

    # Training is judged on the reference's own rows, so a row mismatch above cannot hide here.
    tokens, spk, order = ft["tokens"], ft["spk"], ft["order"]
    val, batch = ft["val_rows"], int(ft["batch_size"])
    state = trainer.init_state(0)
    yield _relative_check("finetune", "val-loss-before", trainer.evaluate(state["trainable"], tokens[val], spk[val], batch),
                          ft["val_loss_before"], 1e-4)
    yield close_check("finetune", "step0-token-losses",
                      trainer.token_losses(state["trainable"], tokens[order[0]], spk[order[0]]), ft["step0_token_losses"], 1e-4)
    losses, norms = [], []
    for idx in order:
        state, metrics = trainer.step(state, tokens[idx], spk[idx])
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    yield _relative_check("finetune", "train-losses", losses, ft["train_losses"], 1e-4)
    yield _relative_check("finetune", "grad-norms", norms, ft["grad_norms"], 1e-4)
    yield _relative_check("finetune", "val-loss-after", trainer.evaluate(state["trainable"], tokens[val], spk[val], batch),
                          ft["val_loss_after"], 1e-4)
    # AdamW divides each element's gradient by its own running magnitude: an element whose gradient
    # is near zero moves by a visible fraction of the learning rate on float rounding alone, so the
    # bulk of each tensor is held to 1e-6 and every element to 1e-4 (fixture README).
    trained = released_gpt_state(cfg, merge_params(cfg, spec, trainer.frozen, state["trainable"]))
    for name in names:
        ref = ft[f"param/{name}"]
        got = trained.get(name)
        if got is None or np.shape(got) != ref.shape:
            yield Check("finetune", f"param:{name}", False, float("inf"), 1e-4,
                        f"shape {None if got is None else np.shape(got)} != {ref.shape}")
            continue
        err = np.abs(np.asarray(got, np.float64) - ref)
        bulk = float(np.quantile(err, 0.999))
        yield Check("finetune", f"param:{name}:p99.9", bulk <= 1e-6, bulk, 1e-6)
        yield Check("finetune", f"param:{name}:all", float(err.max()) <= 1e-4, float(err.max()), 1e-4)

