"""Weight-only quantisation of the first stage (the 1.2B causal GPT decoded token by token).

Decoding reads every weight once per step, so the step time follows the bytes read. Two
storage modes for the decode-layout weight matrices (:func:`mvjax.nn.gpt_decode.prepare_decode_params`:
each layer's attention and MLP kernels in (out, in) layout, the speaker projection):

``"int8"``
    Symmetric, per output channel: ``w ~= q * scale[:, None]`` with ``q`` int8 in
    [-127, 127] and ``scale = max|w[o, :]| / 127`` float32 (a quarter of the float32 bytes).
    Stored as ``{"q": int8 (out, in), "scale": float32 (out,)}`` in place of the float matrix.
    On CPU the matmul runs in :mod:`mvjax.kernels.int8` (int8 weights, activations rounded to
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

from mvjax.nn.config import GPTConfig
from mvjax.nn.gpt import abstract_params
from mvjax.nn.gpt_decode import prepare_decode_params

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


def is_quantized(entry) -> bool:
    return isinstance(entry, dict) and "q" in entry and "scale" in entry


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
    mode = check_mode(mode)
    if mode is None:
        raise ValueError("prepare_quantized_params needs a mode: " + ", ".join(MODES))
    return prepare_decode_params(config, params, store=_store_fn(mode, embedding), consume=consume)


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
    """What :class:`mvjax.inference.decode.FirstStageDecoder` keeps: ``params`` re-laid for decoding, quantised
    when asked. A tree already in the decode layout (a quantised model directory) is used as is.
    ``consume``: empty ``params`` while re-laying it (lower peak memory; see ``prepare_decode_params``)."""
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
    if check_mode(mode) is None:
        fn = functools.partial(prepare_decode_params, config)
    else:
        fn = functools.partial(prepare_quantized_params, config, mode=mode, embedding=embedding)
    return jax.eval_shape(fn, abstract_params(config))


def tree_nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
