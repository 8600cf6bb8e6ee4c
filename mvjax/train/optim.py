"""The optimiser: the reference recipe's AdamW and clipping in optax, plus warmup + cosine decay.

The reference (``fam/llm/finetune.py``) uses ``torch.optim.AdamW`` with decoupled weight decay on
parameters of two or more dimensions only, eps 1e-8, and clips the global gradient norm with
``torch.nn.utils.clip_grad_norm_`` (scale ``max_norm / (norm + 1e-6)`` when the norm exceeds
``max_norm``). Its optional cosine schedule divides by zero at step 0 with its defaults
(``lr_decay_iters = 0``) and spends its first warmup step at learning rate 0; ours starts warmup
at ``lr / warmup_steps`` and decays from the end of warmup to ``min_lr`` at the last step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from mvjax.core.errors import MvjaxError

SCHEDULES = ("constant", "cosine")


class OptimError(MvjaxError, ValueError):
    """An optimiser setting out of range."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 = off
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 3e-6  # cosine's floor, reached at total_steps
    total_steps: int = 1

    def __post_init__(self):
        checks = [
            (self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate must be > 0"),
            (all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2, "betas must be two numbers in [0, 1)"),
            (self.eps > 0, "eps must be > 0"),
            (self.weight_decay >= 0 and math.isfinite(self.weight_decay), "weight_decay must be >= 0"),
            (self.grad_clip >= 0 and math.isfinite(self.grad_clip), "grad_clip must be >= 0 (0 = off)"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.min_lr <= self.learning_rate, "min_lr must be in [0, learning_rate]"),
            (self.total_steps >= 1, "total_steps must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise OptimError(message)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OptimConfig":
        d = dict(d)
        d["betas"] = tuple(float(b) for b in d.get("betas", (0.9, 0.95)))
        return cls(**d)


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Step (0-based, counted in optimiser updates) -> learning rate; finite at every step."""
    peak, floor, warmup = cfg.learning_rate, cfg.min_lr, cfg.warmup_steps
    decay = max(cfg.total_steps - 1 - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1.0) / max(warmup, 1)
        if cfg.schedule == "constant":
            after = jnp.asarray(peak, jnp.float32)
        else:
            ratio = jnp.clip((step - warmup) / decay, 0.0, 1.0)
            after = floor + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (peak - floor)
        return jnp.where(step < warmup, warm, after)

    return schedule


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale by ``max_norm / (norm + 1e-6)`` when that is below 1."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
        return jax.tree_util.tree_map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(trainable: dict) -> dict:
    """True for parameters that are matrices in the reference (two or more dimensions per layer:
    the stacked ``blocks`` and ``lora`` trees carry a leading layer axis), False for norm gains."""
    def per_leaf(path, leaf):
        stacked = any(getattr(k, "key", None) in ("blocks", "lora") for k in path[:1])
        return (leaf.ndim - (1 if stacked else 0)) >= 2

    return jax.tree_util.tree_map_with_path(per_leaf, trainable)


def make_optimizer(cfg: OptimConfig, trainable: dict) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip:
        parts.append(clip_by_global_norm_like_torch(cfg.grad_clip))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.betas[0], b2=cfg.betas[1], eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask(trainable)))
    return optax.chain(*parts)
