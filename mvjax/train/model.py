"""The first stage as a function of its trainable parameters: what trains, LoRA adapters, the loss.

The converted parameter tree stacks the transformer blocks on a leading axis. For training it is
split once, outside any jit (:func:`split_params`), into

* ``frozen``: the embeddings, the final norm when it does not train, and the frozen blocks as
  contiguous *segments* (their own arrays, so no step ever slices or copies the big stack);
* ``trainable``: ``blocks`` (the last ``last_n_blocks`` blocks, stacked), ``ln_f`` (trained with
  them, as the reference recipe does) and ``lora`` (one adapter tree per LoRA segment).

:func:`forward` runs the segments in order, each under one ``lax.scan``. Everything before the
first segment that trains (or carries LoRA) runs under ``stop_gradient``: JAX then builds no
backward pass for it, so with only the last block training a step costs one forward pass, the
last block's backward and the head's. Segments with gradients flowing through are
rematerialised when there is more than one trainable layer (only each layer's input is kept).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mvjax.core.errors import MvjaxError
from mvjax.nn.config import GPTConfig
from mvjax.nn.gpt import GPT, Block, Norm, dropout

LORA_TARGETS = {"attn": ("c_attn", "c_proj"), "mlp": None}  # mlp: every matrix of the block's MLP
LOSS_MASKS = ("all", "audio")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainSpecError(MvjaxError, ValueError):
    """A training setup that does not fit the model (too many blocks, unknown LoRA target, ...)."""


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """What trains and how the loss is taken; everything the forward pass needs besides weights."""

    last_n_blocks: int = 1  # full blocks trained at the top of the stack (+ the final norm), as the reference
    lora_rank: int = 0  # 0 = no LoRA
    lora_alpha: Optional[float] = None  # adapter scale = alpha / rank; default alpha = rank (scale 1)
    lora_targets: tuple[str, ...] = ("attn", "mlp")
    lora_blocks: Optional[tuple[int, ...]] = None  # None = every block that does not train in full
    dropout: float = 0.1
    loss_mask: str = "all"  # "all": every position (the reference); "audio": audio targets + first end of audio
    compute_dtype: str = "float32"
    remat: Optional[bool] = None  # None: rematerialise when more than one layer carries gradients

    @property
    def lora_scale(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank) / max(self.lora_rank, 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        d["lora_blocks"] = None if self.lora_blocks is None else list(self.lora_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSpec":
        d = dict(d)
        d["lora_targets"] = tuple(d.get("lora_targets", ("attn", "mlp")))
        if d.get("lora_blocks") is not None:
            d["lora_blocks"] = tuple(int(b) for b in d["lora_blocks"])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Segment:
    kind: str  # "frozen" | "full" | "lora"
    start: int
    end: int

    @property
    def name(self) -> str:
        return f"{self.start}-{self.end - 1}"


def validate(cfg: GPTConfig, spec: TrainSpec) -> None:
    if not cfg.causal:
        raise TrainSpecError("fine-tuning is for the causal first stage")
    if not 0 <= spec.last_n_blocks <= cfg.n_layer:
        raise TrainSpecError(f"last_n_blocks must be in [0, {cfg.n_layer}] for this model, got {spec.last_n_blocks}")
    if spec.lora_rank < 0:
        raise TrainSpecError(f"lora_rank must be >= 0, got {spec.lora_rank}")
    if spec.lora_rank:
        unknown = [t for t in spec.lora_targets if t not in LORA_TARGETS]
        if unknown or not spec.lora_targets:
            raise TrainSpecError(f"unknown LoRA target(s) {unknown or '(none)'}; choose from {', '.join(LORA_TARGETS)}")
        bad = [b for b in (spec.lora_blocks or ()) if not 0 <= b < cfg.n_layer]
        if bad:
            raise TrainSpecError(f"LoRA block(s) {bad} outside [0, {cfg.n_layer - 1}]")
        both = set(spec.lora_blocks or ()) & set(range(cfg.n_layer - spec.last_n_blocks, cfg.n_layer))
        if both:
            raise TrainSpecError(f"block(s) {sorted(both)} both train in full and carry LoRA; choose one")
        if not lora_layers(cfg, spec):
            raise TrainSpecError("LoRA is on but every block trains in full; lower last_n_blocks")
    elif spec.last_n_blocks == 0:
        raise TrainSpecError("nothing to train: last_n_blocks is 0 and LoRA is off")
    if not 0.0 <= spec.dropout < 1.0:
        raise TrainSpecError(f"dropout must be in [0, 1), got {spec.dropout}")
    if spec.loss_mask not in LOSS_MASKS:
        raise TrainSpecError(f"loss_mask must be one of {LOSS_MASKS}, got {spec.loss_mask!r}")
    if spec.compute_dtype not in COMPUTE_DTYPES:
        raise TrainSpecError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {spec.compute_dtype!r}")


def lora_layers(cfg: GPTConfig, spec: TrainSpec) -> list[int]:
    if not spec.lora_rank:
        return []
    full = set(range(cfg.n_layer - spec.last_n_blocks, cfg.n_layer))
    chosen = range(cfg.n_layer) if spec.lora_blocks is None else sorted(set(spec.lora_blocks))
    return [b for b in chosen if b not in full]


def segments(cfg: GPTConfig, spec: TrainSpec) -> list[Segment]:
    """Consecutive layers of the same kind, bottom to top."""
    lora = set(lora_layers(cfg, spec))
    kinds = ["full" if layer >= cfg.n_layer - spec.last_n_blocks else "lora" if layer in lora else "frozen"
             for layer in range(cfg.n_layer)]
    out: list[Segment] = []
    for layer, kind in enumerate(kinds):
        if out and out[-1].kind == kind:
            out[-1] = Segment(kind, out[-1].start, layer + 1)
        else:
            out.append(Segment(kind, layer, layer + 1))
    return out


def _lora_matrices(cfg: GPTConfig, spec: TrainSpec) -> dict[str, tuple[int, int]]:
    """{"attn/c_attn": (in, out), ...} for the adapted matrices of one block."""
    d, h = cfg.n_embd, cfg.mlp_hidden
    out = {}
    if "attn" in spec.lora_targets:
        out["attn/c_attn"], out["attn/c_proj"] = (d, 3 * d), (d, d)
    if "mlp" in spec.lora_targets:
        if cfg.nonlinearity_type == "swiglu":
            out["mlp/w1"], out["mlp/w3"] = (d, h), (d, h)
        else:
            out["mlp/c_fc"] = (d, h)
        out["mlp/c_proj"] = (h, d)
    return out


def init_lora(cfg: GPTConfig, spec: TrainSpec, rng: jax.Array) -> dict:
    """Adapters for every LoRA segment: ``a`` uniform in +-1/sqrt(fan_in) (as torch's Linear init),
    ``b`` zero, so training starts from the base model's function exactly."""
    out = {}
    for seg in segments(cfg, spec):
        if seg.kind != "lora":
            continue
        tree: dict = {}
        for path, (fan_in, fan_out) in _lora_matrices(cfg, spec).items():
            rng, sub = jax.random.split(rng)
            n = seg.end - seg.start
            bound = 1.0 / math.sqrt(fan_in)
            part, name = path.split("/")
            tree.setdefault(part, {})[name] = {
                "a": jax.random.uniform(sub, (n, fan_in, spec.lora_rank), jnp.float32, -bound, bound),
                "b": jnp.zeros((n, spec.lora_rank, fan_out), jnp.float32),
            }
        out[seg.name] = tree
    return out


def _slice(tree, start: int, end: int):
    """Layers ``start:end`` as arrays of their own (a copy: a view would keep the whole stack alive). An
    abstract tree (``jax.ShapeDtypeStruct`` leaves: shapes only, to lower the step for the released shape
    without its weights) gives the slices' shapes."""
    def one(a):
        if isinstance(a, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((end - start,) + tuple(a.shape[1:]), a.dtype)
        return np.array(np.asarray(a)[start:end], copy=True)

    return jax.tree_util.tree_map(one, tree)


def split_params(cfg: GPTConfig, spec: TrainSpec, params: dict, rng: Optional[jax.Array] = None) -> tuple[dict, dict]:
    """(frozen, trainable) from a full converted parameter tree (see the module docstring); from an
    abstract tree (``jax.ShapeDtypeStruct`` leaves) their shapes (the LoRA adapters are made either way)."""
    validate(cfg, spec)
    if "blocks" not in params or "ln_f" not in params:
        raise TrainSpecError("parameters are not a float first-stage tree (a quantised model cannot be fine-tuned)")
    blocks = params["blocks"]
    frozen = {k: v for k, v in params.items() if k not in ("blocks", "ln_f")}
    frozen["segments"] = {}
    trainable: dict = {}
    for seg in segments(cfg, spec):
        if seg.kind == "full":
            trainable["blocks"] = _slice(blocks, seg.start, seg.end)
        else:
            frozen["segments"][seg.name] = _slice(blocks, seg.start, seg.end)
    if spec.last_n_blocks:
        trainable["ln_f"] = params["ln_f"]
    else:
        frozen["ln_f"] = params["ln_f"]
    if spec.lora_rank:
        trainable["lora"] = init_lora(cfg, spec, jax.random.PRNGKey(0) if rng is None else rng)
    return frozen, trainable


def merge_params(cfg: GPTConfig, spec: TrainSpec, frozen: dict, trainable: dict) -> dict:
    """The full converted tree again, LoRA folded into the weights (``W + scale * a @ b``): what export writes."""
    parts = []
    for seg in segments(cfg, spec):
        if seg.kind == "full":
            parts.append(trainable["blocks"])
            continue
        seg_params = frozen["segments"][seg.name]
        if seg.kind == "lora":
            seg_params = jax.tree_util.tree_map(np.asarray, seg_params)
            for part, mats in trainable["lora"][seg.name].items():
                for name, ab in mats.items():
                    kernel = seg_params[part][name]["kernel"]
                    delta = np.einsum("lir,lro->lio", np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32))
                    kernel = (kernel.astype(np.float32) + np.float32(spec.lora_scale) * delta).astype(kernel.dtype)
                    seg_params[part][name] = {**seg_params[part][name], "kernel": kernel}
        parts.append(seg_params)
    blocks = jax.tree_util.tree_map(lambda *xs: np.concatenate([np.asarray(x) for x in xs], axis=0), *parts)
    full = {k: v for k, v in frozen.items() if k != "segments"}
    full["blocks"] = blocks
    full["ln_f"] = trainable["ln_f"] if "ln_f" in trainable else frozen["ln_f"]
    return jax.tree_util.tree_map(np.asarray, full)


def causal_block(length: int) -> int:
    """Query-block size for causal attention in training: blocks of 256 once sequences are long enough
    for skipping the masked half to pay (0: one masked block)."""
    return 256 if length >= 1024 else 0


def _run_segment(cfg, spec, params, lora, x, mask, rng, deterministic: bool, remat: bool):
    rate = 0.0 if deterministic else spec.dropout
    block = Block(cfg, COMPUTE_DTYPES[spec.compute_dtype], rate, spec.lora_scale, causal_block(mask.shape[-1]))
    n = jax.tree_util.tree_leaves(params)[0].shape[0]

    def body(h, inputs):
        layer_params, layer_lora, key = inputs
        variables = {"params": layer_params}
        if layer_lora is not None:
            variables["lora"] = layer_lora
        h, _ = block.apply(variables, h, mask, rngs={"dropout": key} if rate else None)
        return h, None

    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    keys = jax.random.split(rng, n)
    x, _ = jax.lax.scan(body, x, (params, lora, keys))
    return x


def forward(cfg: GPTConfig, spec: TrainSpec, frozen: dict, trainable: dict, tokens, speaker_emb, rng,
            deterministic: bool = True):
    """Logits, one ``(B, T, V)`` float32 array per head, for ``tokens`` (B, H, T)."""
    dtype = COMPUTE_DTYPES[spec.compute_dtype]
    gpt = GPT(cfg, dtype)
    frozen = jax.lax.stop_gradient(frozen)
    length = tokens.shape[-1]
    x = gpt.apply({"params": frozen}, tokens, jnp.arange(length), speaker_emb, method=GPT.embed)
    rng, emb_key = jax.random.split(rng)
    if not deterministic and spec.dropout:
        x = dropout(x, spec.dropout, emb_key)
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    segs = segments(cfg, spec)
    grad_from = next(i for i, s in enumerate(segs) if s.kind != "frozen")
    grad_layers = sum(s.end - s.start for s in segs[grad_from:])
    remat = spec.remat if spec.remat is not None else grad_layers > 1
    for i, seg in enumerate(segs):
        rng, key = jax.random.split(rng)
        params = trainable["blocks"] if seg.kind == "full" else frozen["segments"][seg.name]
        lora = trainable["lora"][seg.name] if seg.kind == "lora" else None
        x = _run_segment(cfg, spec, params, lora, x, mask, key, deterministic, remat and i >= grad_from)
        if i + 1 == grad_from:
            x = jax.lax.stop_gradient(x)
    ln_f = trainable["ln_f"] if "ln_f" in trainable else frozen["ln_f"]
    x = Norm(cfg.norm_type, cfg.norm_eps, cfg.bias).apply({"params": ln_f}, x)
    return gpt.apply({"params": frozen}, x, method=GPT.heads)


def loss_weights(targets, pad_token: int, mode: str):
    """Which target positions count: every one ("all", the reference), or audio codes and the first
    end of audio ("audio": text and padding are given, not predicted)."""
    if mode == "all":
        return jnp.ones(targets.shape, jnp.float32)
    is_pad = targets == pad_token
    first_pad = is_pad & (jnp.cumsum(is_pad, axis=-1) == 1)
    return ((targets < pad_token) | first_pad).astype(jnp.float32)


def token_losses(logits: tuple, targets):
    """Per-position cross-entropy, ``(B, heads, T)``, in float32."""
    out = []
    for h, lg in enumerate(logits):
        logp = jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1)
        out.append(-jnp.take_along_axis(logp, targets[:, h, :, None], axis=-1)[..., 0])
    return jnp.stack(out, axis=1)


def loss_sums(cfg, spec, frozen, trainable, rows, speaker_emb, rng, pad_token: int, deterministic: bool,
              row_weight=None):
    """(sum of weighted losses per head, weight per head, per-position losses) for rows (B, H, T+1);
    ``row_weight`` (B,) scales each row's weights (0 for padding rows)."""
    inputs, targets = rows[..., :-1], rows[..., 1:]
    spk = speaker_emb if cfg.speaker_emb_dim is not None else None
    losses = token_losses(forward(cfg, spec, frozen, trainable, inputs, spk, rng, deterministic), targets)
    weights = loss_weights(targets, pad_token, spec.loss_mask)
    if row_weight is not None:
        weights = weights * row_weight[:, None, None]
    return jnp.sum(losses * weights, axis=(0, 2)), jnp.sum(weights, axis=(0, 2)), losses


def mean_loss(cfg, spec, frozen, trainable, rows, speaker_emb, rng, pad_token: int, deterministic: bool = False):
    """The reference's loss: per head, the (weighted) mean over every position of the batch; then the
    mean over heads. Returns (loss, per-position losses)."""
    total, weight, losses = loss_sums(cfg, spec, frozen, trainable, rows, speaker_emb, rng, pad_token, deterministic)
    return jnp.mean(total / jnp.maximum(weight, 1.0)), losses
