"""Weight-only quantisation of the first stage (the 1.2B causal GPT decoded token by token).

Decoding reads every weight once per step, so the step time follows the bytes read. Two
storage modes for the decode-layout weight matrices (:func:`mvjax.nn.gpt_decode.prepare_decode_params`:
each layer's attention and MLP kernels in (out, in) layout, the speaker projection):

``"int8"``
    Symmetric, per output channel: ``w ~= q * scale[:, None]`` with ``q`` int8 in
    [-127, 127] and ``scale = max|w[o, :]| / 127`` float32 (a quarter of the float32 bytes).
    Stored as ``{"q": int8 (out, in), "scale": float32 (out,)}`` in place of the float matrix.
    On CPU the matmul runs in :mod:`mvjax.cpu_kernels` (int8 weights, activations rounded to
    15 bits per column, exact int32 sums): XLA's CPU backend cannot fuse the dequantisation
    into its dot and would materialise a float32 copy of every matrix each step. Elsewhere
    (GPU/TPU, or when the kernel cannot be built) it is ``dot(q.astype(f32), x) * scale``,
    which GPU compilers fuse.
``"bf16"``
    Matrices stored as bfloat16 and multiplied in bfloat16 with float32 accumulation. Meant
    for GPU/TPU: on a CPU without native bfloat16 (AVX2) XLA runs it slower than float32.

Norm scales, biases and the position table stay float32. The tied embedding / LM head
``wte`` (vocab x width) stays float32 by default: at the released shape it is 0.4 % of the
weights, so quantising it saves ~1 % of a step, while its error reaches the logits directly
(measured in benchmarks/RESULTS.md); ``embedding=True`` quantises it too (the embedding
lookup then dequantises the gathered rows).

:func:`prepare_quantized_params` quantises a converted parameter tree one matrix at a time,
so the float32 decode copy never exists in full; ``python -m convert_weights --quantize int8``
stores the result so loading never builds float32 weights at all.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mvjax.config import GPTConfig

MODES = ("int8", "bf16")
QUANTIZE_EMBEDDING = False  # default for wte: see the module docstring
INT8_MAX = 127


def check_mode(mode: Optional[str]) -> Optional[str]:
    """Normalise a quantisation option: None/"none"/"float32" -> None, else one of :data:`MODES`."""
    if mode is None or mode in ("none", "float32", "fp32", "f32"):
        return None
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)} (or None), not {mode!r}")
    return mode


# --- int8 per output channel ------------------------------------------------------------
@jax.jit
def quantize_rows(w: jnp.ndarray) -> dict:
    """Symmetric int8 per row (output channel) of a (out, in) matrix: ``{"q", "scale"}``."""
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=1)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(w / scale[:, None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return {"q": q, "scale": scale}


def dequantize(entry) -> jnp.ndarray:
    """The float32 matrix an int8 entry stands for (arrays are returned as float32)."""
    if is_quantized(entry):
        return entry["q"].astype(jnp.float32) * entry["scale"][:, None]
    return jnp.asarray(entry, jnp.float32)


def is_quantized(entry) -> bool:
    return isinstance(entry, dict) and "q" in entry and "scale" in entry


def int8_kernel_used() -> bool:
    """Whether :func:`int8_matmul` traces to the CPU kernel (:mod:`mvjax.cpu_kernels`) rather
    than :func:`int8_matmul_xla`: on the CPU backend when the kernel is built. Decided at trace
    time, so a jitted function keeps the choice it was first traced with."""
    if jax.default_backend() != "cpu":
        return False
    from mvjax.cpu_kernels import int8_matmul_available

    return int8_matmul_available()


def int8_matmul_xla(q: jnp.ndarray, scale: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """The plain-XLA int8 product ``dot(q.astype(f32), x) * scale[:, None]`` -> float32 (out, N):
    what :func:`int8_matmul` runs off CPU or where the kernel cannot be built. Float arithmetic
    throughout, so NaN/inf in ``x`` propagate as in a float32 matmul. GPU compilers fuse the
    conversion into the dot; on CPU XLA materialises the float32 copy of ``q``."""
    return jnp.dot(q.astype(jnp.float32), x.astype(jnp.float32), preferred_element_type=jnp.float32) * scale[:, None]


def int8_matmul(entry: dict, x: jnp.ndarray) -> jnp.ndarray:
    """``dequantize(entry) @ x`` for x (in, N) -> float32 (out, N), without a float32 weight copy on CPU
    (the decoder's int8 product: :func:`mvjax.nn.gpt_decode._matmul`)."""
    q, scale = entry["q"], entry["scale"]
    if int8_kernel_used():
        from mvjax.cpu_kernels import int8_matmul as kernel

        return kernel(q, scale, x)
    return int8_matmul_xla(q, scale, x)


# --- decode-layout trees ----------------------------------------------------------------
def _store_fn(mode: str, embedding: bool):
    def store(name: str, w):
        if name == "wte" and not embedding:
            return jnp.asarray(w, jnp.float32)
        stored = quantize_rows(w) if mode == "int8" else jnp.asarray(w).astype(jnp.bfloat16)
        # Wait for it, so the float temporaries of one matrix are freed before the next is made.
        return jax.block_until_ready(stored)

    return store


def prepare_quantized_params(config: GPTConfig, params, mode: str, *, embedding: bool = QUANTIZE_EMBEDDING,
                             consume: bool = False) -> dict:
    """A converted parameter tree -> the decode layout with quantised matrices, one matrix at a
    time (peak: ``params`` plus one layer in float32; ``consume``: see ``prepare_decode_params``)."""
    from mvjax.nn.gpt_decode import prepare_decode_params

    mode = check_mode(mode)
    if mode is None:
        raise ValueError("prepare_quantized_params needs a mode: " + ", ".join(MODES))
    return prepare_decode_params(config, params, store=_store_fn(mode, embedding), consume=consume)


def quantize_decode_params(prepared: dict, mode: str, *, embedding: bool = QUANTIZE_EMBEDDING) -> dict:
    """Quantise an already re-laid float tree (from ``prepare_decode_params``); returns a new tree
    (drop the float one to free it)."""
    mode = check_mode(mode)
    if mode is None:
        raise ValueError("quantize_decode_params needs a mode: " + ", ".join(MODES))
    if decode_params_mode(prepared) is not None:
        raise ValueError(f"these parameters are already quantised ({decode_params_mode(prepared)})")
    store = _store_fn(mode, embedding)
    out = {k: v for k, v in prepared.items() if k not in ("wte", "speaker_proj", "layers")}
    out["wte"] = store("wte", prepared["wte"])
    if "speaker_proj" in prepared:
        out["speaker_proj"] = store("speaker_proj", prepared["speaker_proj"])
    layers = []
    for lay in prepared["layers"]:
        new = {k: v for k, v in lay.items() if k not in ("attn", "mlp")}
        for group in ("attn", "mlp"):
            new[group] = {name: {**p, "w": store(name, p["w"])} for name, p in lay[group].items()}
        layers.append(new)
    out["layers"] = layers
    return out


def is_decode_layout(params) -> bool:
    """A tree already in the decode layout (e.g. restored from a quantised model directory)."""
    return isinstance(params, dict) and "layers" in params and "wte" in params


def decode_params_mode(prepared: dict) -> Optional[str]:
    """``"int8"``, ``"bf16"`` or None (float) for a decode-layout tree, judged by its first layer."""
    w = prepared["layers"][0]["attn"]["c_attn"]["w"] if prepared["layers"] else prepared["wte"]
    if is_quantized(w):
        return "int8"
    return "bf16" if jnp.dtype(w.dtype) == jnp.bfloat16 else None


def decoder_params(config: GPTConfig, params, dtype=None, quantize: Optional[str] = None,
                   consume: bool = False) -> dict:
    """What :class:`mvjax.decode.FirstStageDecoder` keeps: ``params`` re-laid for decoding, quantised
    when asked. A tree already in the decode layout (a quantised model directory) is used as is.
    ``consume``: empty ``params`` while re-laying it (lower peak memory; see ``prepare_decode_params``)."""
    from mvjax.nn.gpt_decode import prepare_decode_params

    quantize = check_mode(quantize)
    if is_decode_layout(params):
        stored = decode_params_mode(params)
        if quantize is not None and quantize != stored:
            raise ValueError(f"the first stage is stored as {stored or 'float32'}; cannot use quantize={quantize!r}")
        return params
    if quantize is None:
        return prepare_decode_params(config, params, dtype, consume=consume)
    return prepare_quantized_params(config, params, quantize, consume=consume)


def abstract_decode_params(config: GPTConfig, mode: Optional[str], *, embedding: bool = QUANTIZE_EMBEDDING) -> dict:
    """Shapes and dtypes (``jax.ShapeDtypeStruct``) of :func:`prepare_quantized_params`' output."""
    from mvjax.nn.gpt import abstract_params
    from mvjax.nn.gpt_decode import prepare_decode_params

    if check_mode(mode) is None:
        fn = functools.partial(prepare_decode_params, config)
    else:
        fn = functools.partial(prepare_quantized_params, config, mode=mode, embedding=embedding)
    return jax.eval_shape(fn, abstract_params(config))


def tree_nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


# --- fidelity --------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _guided_logits(config: GPTConfig, params: dict, tokens, spk, guidance):
    from mvjax.nn.gpt_decode import apply_tokens, init_cache
    from mvjax.sampling import guide

    batch, length = tokens.shape
    rows = jnp.concatenate([tokens, tokens], axis=0)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), rows.shape)
    cache = init_cache(config, 2 * batch, length)
    logits, _ = apply_tokens(config, params, rows, positions, jnp.concatenate([spk, jnp.zeros_like(spk)]), cache)
    return guide(logits[:batch], logits[batch:], guidance[:, None, None])


def guided_logits(config: GPTConfig, params: dict, tokens, speaker_emb, guidance) -> jnp.ndarray:
    """Teacher-forced next-token logits of the decoder, as sampled: ``tokens`` (B, T) run through
    :func:`mvjax.nn.gpt_decode.apply_tokens` in one pass as a conditioned and an unconditioned row
    each (``speaker_emb`` (B, S)), mixed with ``guidance`` (scalar or (B,)); float32 (B, T, V),
    position t predicting token t + 1. ``params``: a decode-layout tree (float or quantised)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    batch = tokens.shape[0]
    spk = jnp.asarray(speaker_emb, jnp.float32).reshape(batch, -1)
    guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (batch,))
    return _guided_logits(config, params, tokens, spk, guidance)


def compare_logits(ref, other, temperature: float = 1.0) -> dict:
    """Per-position agreement of next-token distributions ``softmax(logits / temperature)``:
    ``kl`` = KL(ref || other) in nats, ``agree`` = same argmax, both (..., ) arrays."""
    ref = jnp.asarray(ref, jnp.float32) / temperature
    other = jnp.asarray(other, jnp.float32) / temperature
    logp, logq = jax.nn.log_softmax(ref, axis=-1), jax.nn.log_softmax(other, axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    agree = jnp.argmax(ref, axis=-1) == jnp.argmax(other, axis=-1)
    return {"kl": jnp.maximum(kl, 0.0), "agree": agree}
