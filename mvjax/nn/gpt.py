"""The MetaVoice GPT, both stages, as one functional Flax module.

One implementation serves the causal first stage (RMSNorm, SwiGLU, tied heads) and
the non-causal second stage (LayerNorm, GELU, several input tables and heads);
every choice is read from :class:`mvjax.nn.config.GPTConfig`.

Parameter tree (plain nested dicts; layer weights stacked on a leading axis so the
blocks run under one ``nn.scan``)::

    wte_{i}/embedding        (vocab_i, width)    input table of hierarchy i
    wpe/embedding            (block, width)      learned positions
    speaker_proj/kernel      (speaker_dim, width) only when the stage is speaker-conditioned
    blocks/ln_1/{scale,bias} (layers, width)     bias only for LayerNorm with bias
    blocks/attn/c_attn/{kernel,bias}  (layers, width, 3*width)   q | k | v, heads contiguous
    blocks/attn/c_proj/{kernel,bias}  (layers, width, width)
    blocks/ln_2/...
    blocks/mlp/{w1,w3,c_proj}         SwiGLU, or blocks/mlp/{c_fc,c_proj} for GELU
    ln_f/{scale,bias}
    lm_head_{i}/kernel       (width, target_vocab_i)   absent when the heads are tied
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvjax.nn.config import GPTConfig

# The reference's slow-path GPT masks the speaker embedding before this token when
# ``spk_emb_on_text`` is False (a constant in its source, not a config value).
SPEAKER_MASK_END_OF_TEXT = 1537


class Norm(nn.Module):
    """RMSNorm (``x * rsqrt(mean(x^2) + eps) * w``, in float32) or LayerNorm (two-pass variance)."""

    kind: str
    eps: float
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,))
        x32 = x.astype(jnp.float32)
        if self.kind == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            return y.astype(x.dtype) * scale.astype(x.dtype)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (width,)).astype(jnp.float32)
        return y.astype(x.dtype)


class Dense(nn.Dense):
    """``nn.Dense`` plus an optional low-rank adapter (LoRA) read from the ``lora`` collection.

    Without a ``lora`` collection (inference, full fine-tuning) this is exactly ``nn.Dense``. When
    the collection holds ``a`` (in, r) and ``b`` (r, out) for this layer, the output gains
    ``lora_scale * (x @ a) @ b`` (computed unmerged, so training never forms the full-size update).
    """

    lora_scale: float = 1.0

    def __call__(self, x):
        y = super().__call__(x)
        if self.has_variable("lora", "a"):
            a = self.get_variable("lora", "a").astype(y.dtype)
            b = self.get_variable("lora", "b").astype(y.dtype)
            y = y + (x.astype(y.dtype) @ a @ b) * jnp.asarray(self.lora_scale, y.dtype)
        return y


def _dense(features: int, use_bias: bool, name: str, dtype, lora_scale: float = 1.0) -> Dense:
    return Dense(
        features,
        use_bias=use_bias,
        name=name,
        dtype=dtype,
        kernel_init=nn.initializers.normal(0.02),
        lora_scale=lora_scale,
    )


def attention(q, k, v, mask, probs_dropout=None):
    """Scaled dot-product attention. q: (B, Tq, H, hd); k, v: (B, Tk, H, hd); mask: bool, broadcast to (B, H, Tq, Tk).
    ``probs_dropout`` (training only) is applied to the attention weights, as torch's SDPA ``dropout_p`` does."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if probs_dropout is not None:
        probs = probs_dropout(probs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def causal_attention_blocks(q, k, v, block: int, probs_dropout=None):
    """Causal attention in query blocks, each over only the keys it can see: the same rows of the same
    softmax as :func:`attention` with a causal mask (masked weights are exactly 0 there), at a little over
    half the work for long sequences. ``probs_dropout(probs, i)`` gets the block index ``i``."""
    length = q.shape[1]
    outs = []
    for i, start in enumerate(range(0, length, block)):
        end = min(start + block, length)
        mask = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        drop = None if probs_dropout is None else (lambda p, i=i: probs_dropout(p, i))
        outs.append(attention(q[:, start:end], k[:, :end], v[:, :end], mask[None, None], drop))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _fmix32(h):
    """murmur3's 32-bit finaliser: every input bit reaches every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def dropout(x, rate: float, key):
    """Inverted dropout whose keep/drop bits are a counter hash of each element's index under two 32-bit
    seeds drawn from ``key``. Threefry bits for a 16 x 2048 x 2048 attention map cost ~0.6 s per layer on
    a CPU, which made dropout a third of a released-shape training step; this costs a few integer ops per
    element. (Bernoulli(1 - rate) per element, independent across elements, as torch's dropout.)"""
    if not rate:
        return x
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
    bits = _fmix32(_fmix32(index ^ seeds[0]) + seeds[1])
    threshold = jnp.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
    return jnp.where(bits >= threshold, x / (1.0 - rate), 0).astype(x.dtype)


class SelfAttention(nn.Module):
    config: GPTConfig
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0  # training only: on the attention weights and after c_proj, as the reference
    lora_scale: float = 1.0
    causal_block: int = 0  # training only: causal attention in query blocks of this size (0: one masked block)

    @nn.compact
    def __call__(self, x, mask):
        """x: (B, T, D) -> (B, T, D). (Token-by-token decoding uses mvjax.nn.gpt_decode.)"""
        cfg = self.config
        batch, length, width = x.shape
        qkv = _dense(3 * width, cfg.bias, "c_attn", self.dtype, self.lora_scale)(x)
        qkv = qkv.reshape(batch, length, 3, cfg.n_head, cfg.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        rate = self.dropout_rate
        if self.causal_block and cfg.causal:
            drop = None
            if rate:
                key = self.make_rng("dropout")
                drop = lambda p, i: dropout(p, rate, jax.random.fold_in(key, i))  # noqa: E731
            y = causal_attention_blocks(q, k, v, self.causal_block, drop)
        else:
            drop = (lambda p: dropout(p, rate, self.make_rng("dropout"))) if rate else None
            y = attention(q, k, v, mask, drop)
        y = _dense(width, cfg.bias, "c_proj", self.dtype, self.lora_scale)(y.reshape(batch, length, width))
        return dropout(y, rate, self.make_rng("dropout")) if rate else y


class MLP(nn.Module):
    config: GPTConfig
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0  # training only: after c_proj, as the reference
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        hidden = cfg.mlp_hidden
        s = self.lora_scale
        if cfg.nonlinearity_type == "swiglu":
            h = nn.silu(_dense(hidden, cfg.bias, "w1", self.dtype, s)(x)) * _dense(hidden, cfg.bias, "w3", self.dtype, s)(x)
        else:
            h = nn.gelu(_dense(hidden, cfg.bias, "c_fc", self.dtype, s)(x), approximate=False)  # torch.nn.GELU(): erf form
        y = _dense(cfg.n_embd, cfg.bias, "c_proj", self.dtype, s)(h)
        return dropout(y, self.dropout_rate, self.make_rng("dropout")) if self.dropout_rate else y


class Block(nn.Module):
    """Pre-norm residual block, written as a scan body ``(x, mask) -> (x, None)``.

    ``dropout_rate``, ``lora_scale`` and ``causal_block`` only matter in training (:mod:`mvjax.train.model`)."""

    config: GPTConfig
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0
    lora_scale: float = 1.0
    causal_block: int = 0

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        rate, s = self.dropout_rate, self.lora_scale
        attn = SelfAttention(cfg, self.dtype, rate, s, self.causal_block, name="attn")
        x = x + attn(Norm(cfg.norm_type, cfg.norm_eps, cfg.bias, name="ln_1")(x), mask)
        x = x + MLP(cfg, self.dtype, rate, s, name="mlp")(Norm(cfg.norm_type, cfg.norm_eps, cfg.bias, name="ln_2")(x))
        return x, None


class GPT(nn.Module):
    """``tokens (batch, hierarchies, time)`` -> one ``(batch, time, vocab)`` logits array per head."""

    config: GPTConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        emb_init = nn.initializers.normal(0.02)
        self.wtes = [nn.Embed(v, cfg.n_embd, embedding_init=emb_init, name=f"wte_{i}") for i, v in enumerate(cfg.vocab_sizes)]
        self.wpe = nn.Embed(cfg.block_size, cfg.n_embd, embedding_init=emb_init, name="wpe")
        if cfg.speaker_emb_dim is not None:
            self.speaker_proj = _dense(cfg.n_embd, False, "speaker_proj", self.dtype)
        self.blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=cfg.n_layer,
        )(cfg, self.dtype, name="blocks")
        self.ln_f = Norm(cfg.norm_type, cfg.norm_eps, cfg.bias, name="ln_f")
        if not cfg.tied_heads:
            self.lm_heads = [_dense(v, False, f"lm_head_{i}", self.dtype) for i, v in enumerate(cfg.output_vocab_sizes)]

    def embed(self, tokens, positions, speaker_emb):
        """Sum of the input tables, learned positions and (optionally) the projected speaker.

        tokens: (B, H, T) int; positions: (T,) or (B, T) int; speaker_emb: (B, S) or None.
        """
        cfg = self.config
        if tokens.shape[1] != len(cfg.vocab_sizes):
            raise ValueError(f"tokens have {tokens.shape[1]} hierarchies, the model has {len(cfg.vocab_sizes)} input tables")
        x = jnp.zeros(tokens.shape[:1] + tokens.shape[2:] + (cfg.n_embd,), jnp.float32)
        for i, wte in enumerate(self.wtes):
            x = x + wte(tokens[:, i, :]).astype(jnp.float32)
        pos = self.wpe(positions).astype(jnp.float32)
        x = x + (pos if pos.ndim == 3 else pos[None])
        if speaker_emb is not None:
            if cfg.speaker_emb_dim is None:
                raise ValueError("this stage was trained without speaker conditioning; pass speaker_emb=None")
            speaker_term = self.speaker_proj(speaker_emb.astype(self.dtype)).astype(jnp.float32)[:, None, :]  # (B, 1, D)
            if not cfg.spk_emb_on_text:
                seen_eot = jnp.cumsum(tokens[:, 0, :] == SPEAKER_MASK_END_OF_TEXT, axis=-1) > 0
                speaker_term = speaker_term * seen_eot[:, :, None].astype(speaker_term.dtype)
            x = x + speaker_term
        return x.astype(self.dtype)

    def heads(self, x):
        if self.config.tied_heads:
            return tuple(
                jnp.einsum("btd,vd->btv", x, wte.embedding.astype(x.dtype)).astype(jnp.float32)
                for wte in self.wtes
            )
        return tuple(head(x).astype(jnp.float32) for head in self.lm_heads)

    def hidden(self, tokens, speaker_emb: Optional[jnp.ndarray] = None, positions: Optional[jnp.ndarray] = None):
        """The final normalised states (B, T, D) the heads read."""
        cfg = self.config
        length = tokens.shape[-1]
        if length > cfg.block_size:
            raise ValueError(f"sequence of length {length} exceeds the block size {cfg.block_size}")
        if positions is None:
            positions = jnp.arange(length)
        x = self.embed(tokens, positions, speaker_emb)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None] if cfg.causal else None
        x, _ = self.blocks(x, mask)
        return self.ln_f(x)

    def __call__(self, tokens, speaker_emb: Optional[jnp.ndarray] = None, positions: Optional[jnp.ndarray] = None):
        return self.heads(self.hidden(tokens, speaker_emb, positions))


def init_params(config: GPTConfig, rng: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters in the converted layout (for tests and benchmarks)."""
    tokens = jnp.zeros((1, len(config.vocab_sizes), 1), jnp.int32)
    speaker_emb = None if config.speaker_emb_dim is None else jnp.zeros((1, config.speaker_emb_dim), dtype)
    params = GPT(config).init(rng, tokens, speaker_emb)["params"]
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)


def abstract_params(config: GPTConfig) -> dict:
    """Shapes and dtypes of the parameter tree, from ``jax.eval_shape`` (no memory allocated)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def forward(config: GPTConfig, params, tokens, speaker_emb=None) -> Sequence[jnp.ndarray]:
    return GPT(config).apply({"params": params}, tokens, speaker_emb)


def forward_hidden(config: GPTConfig, params, tokens, speaker_emb=None) -> jnp.ndarray:
    """The states (B, T, D) before the heads (:func:`head_logits` finishes :func:`forward`)."""
    return GPT(config).apply({"params": params}, tokens, speaker_emb, method=GPT.hidden)


def head_logits(config: GPTConfig, params, x) -> Sequence[jnp.ndarray]:
    """Each head's logits (B, T', vocab) for states ``x`` (B, T', D), e.g. a window of :func:`forward_hidden`'s."""
    return GPT(config).apply({"params": params}, x, method=GPT.heads)
