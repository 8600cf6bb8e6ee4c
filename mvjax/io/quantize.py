"""Weight-only quantisation of the first stage (the 1.2B causal GPT decoded token by token).

Decoding reads every weight once per step, so the step time follows the bytes read. Three
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
``"int4"``
    Group-wise affine 4-bit, groups of :data:`INT4_GROUP` inputs: ``w ~= scale * q + min`` per
    group, ``q`` in 0..15, ``scale`` and ``min`` float16, in the fixed layout of
    :mod:`mvjax.kernels.int4` (``{"q4": uint8 (out, in // 2), "scale", "min": float16 (out, in // G)}``;
    4.5 bits a weight at G = 64, 0.14 of float32's bytes). :func:`quantize_groups` picks each
    group's scale and minimum by a small search that minimises the group's squared error
    (calibration-free; see there); codes are chosen against the float16-rounded pair actually
    stored. The products run in :func:`mvjax.kernels.int4.int4_matmul`.
    The speaker projection stays float32 in this mode (see :data:`INT4_KEEP_FLOAT`).
``"bf16"``
    Matrices stored as bfloat16 and multiplied in bfloat16 with float32 accumulation. Meant
    for GPU/TPU: on a CPU without native bfloat16 (AVX2) XLA runs it slower than float32.

Norm scales, biases and the position table stay float32. The tied embedding / LM head
``wte`` (vocab x width) stays float32 by default: at the released shape it is 0.4 % of the
weights, so quantising it saves ~1 % of an int8 step (21 MB of the 0.73 GB an int4 step reads:
int4 would save 2.5 %), while its error reaches the logits directly, undamped by any later
layer (measured in benchmarks/RESULTS.md); ``embedding=True`` quantises it too (the embedding
lookup then dequantises the gathered rows). The position table is read one row per token, so
its bytes never enter a step's time.

:func:`prepare_quantized_params` quantises a converted parameter tree one matrix at a time,
so the float32 decode copy never exists in full; ``python -m convert_weights --quantize int8``
(or ``int4``) stores the result so loading never builds float32 weights at all.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mvjax.kernels.int4 import INT4_LEVELS, is_int4, pack_codes
from mvjax.nn.config import GPTConfig
from mvjax.nn.gpt import abstract_params
from mvjax.nn.gpt_decode import prepare_decode_params

MODES = ("int8", "bf16", "int4")
QUANTIZE_EMBEDDING = False  # default for wte: see the module docstring
INT8_MAX = 127
# Inputs per int4 scale/minimum pair. 64 (4.5 bits a weight): at the released shape 32 would add
# 0.5 bit a weight (0.77 GB of weights, over the 0.75 GB budget) for a 13 % lower relative weight
# error (N(0, 1): 0.0734 vs 0.0848); 128 saves 0.25 bit (5.6 % of the bytes) for a 10 % higher one
# (0.0937). ``python -m benchmarks.quantize --int4-error`` measures them.
INT4_GROUP = 64
# Range fractions the int4 search starts from (1.0: the full range, its codes refitted). Relative RMS
# error at G = 64 (``python -m benchmarks.quantize --int4-error``): N(0, 1) 0.0897 round to nearest ->
# 0.0848; Student-t (3 d.o.f., heavier tails, as trained weights have) 0.1311 -> 0.1209; the fixture
# model 0.0893 -> 0.0845. Three fractions gave ~0.6 % more error than these five, nine ~0.5 % less
# (1024 x 2048 draws); each costs about 0.1 s per 12.6 M weights on two cores (~50 s for the released
# first stage, against ~5 s for round to nearest).
INT4_SEARCH = (1.0, 0.93, 0.86, 0.79, 0.72)
# Matrices that stay float32 in int4 mode. The speaker projection (2048 x 256 at the released shape,
# 2.1 MB float32 = 0.3 % of an int4 step's bytes) is multiplied into every position of a conditioned
# row: its 4-bit error would be a bias on every position's input that no later token averages out,
# for 1.8 MB saved. Fixture model, teacher-forced (320 positions): mean KL(float32 || int4) 3.98e-2
# with it float32, 4.07e-2 with it int4; an int4 wte as well: 7.26e-2 (round to nearest instead of
# the search: 4.57e-2).
INT4_KEEP_FLOAT = ("speaker_proj",)


def check_mode(mode: Optional[str]) -> Optional[str]:
    """Normalise a quantisation option: None/"none"/"float32" -> None, else one of :data:`MODES`."""
    if mode is None or mode in ("none", "float32", "fp32", "f32"):
        return None
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)} (or None), not {mode!r}")
    return mode


def matrix_shape(entry) -> tuple[int, int]:
    """(out, in) of a decode-layout weight matrix: a float array, an int8 or an int4 entry."""
    if is_int4(entry):
        return int(entry["q4"].shape[0]), 2 * int(entry["q4"].shape[1])
    if is_quantized(entry):
        return tuple(int(n) for n in entry["q"].shape)
    return tuple(int(n) for n in entry.shape)


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
    """An int8 entry (``{"q", "scale"}``)."""
    return isinstance(entry, dict) and "q" in entry and "scale" in entry


# --- int4 per group of inputs -------------------------------------------------------------
def int4_group_size(width: int, group: int = INT4_GROUP) -> int:
    """The group size an int4 matrix with ``width`` inputs gets: ``group``, or the largest power of
    two below it that divides ``width`` (a width ``group`` does not divide; >= 2, since two codes
    share a byte and ``width`` must be even)."""
    if width % 2:
        raise ValueError(f"int4 needs an even number of inputs (two codes a byte), not {width}")
    g = group
    while width % g:
        g //= 2
    return g


def _int4_codes(w: jnp.ndarray, scale16: jnp.ndarray, min16: jnp.ndarray) -> jnp.ndarray:
    """Codes for groups ``w`` (..., G) against stored float16 ``scale16``/``min16`` (...,): the nearest
    of the 16 levels ``scale * q + min`` to every weight (the best codes for that pair), as float32
    (..., G). A zero scale (a constant group, or a range below float16's resolution) gives code 0."""
    scale, minimum = scale16.astype(jnp.float32)[..., None], min16.astype(jnp.float32)[..., None]
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.where(scale > 0, jnp.clip(jnp.round((w - minimum) / safe), 0, INT4_LEVELS), 0.0)


@functools.partial(jax.jit, static_argnames=("group", "search"))
def quantize_groups(w: jnp.ndarray, group: int = INT4_GROUP, search=INT4_SEARCH) -> dict:
    """Group-wise affine int4 of a (out, in) matrix (:mod:`mvjax.kernels.int4`'s layout), groups of
    :func:`int4_group_size` inputs.

    Round to nearest (``search=()``): ``scale = (max - min) / 15`` and ``min`` of each group, both
    rounded to float16, codes ``clip(round((w - min) / scale), 0, 15)`` against the rounded pair.

    Search (default: :data:`INT4_SEARCH`): a group's extreme weights set the step for all of it, so
    a slightly narrower range often costs the extremes a little and saves every other weight
    more. For each fraction ``f`` the range ``f * (max - min)`` centred in the group's range gives
    codes; the scale and minimum that fit those codes best (least squares, closed form) are
    rounded to float16 and scored by the group's squared error with those codes (from the sums
    the fit already made: no second pass). Each group keeps the best pair, round to nearest
    (scored exactly) included, and its codes are then chosen against the stored pair, which can
    only lower the scored error: no group ends worse than round to nearest. Sums are taken
    relative to the group's minimum, so a group far from zero keeps its precision."""
    w = w.astype(jnp.float32)
    out, width = w.shape
    g = int4_group_size(width, group)
    wg = w.reshape(out, width // g, g)
    lo, hi = jnp.min(wg, axis=-1), jnp.max(wg, axis=-1)
    span = hi - lo
    scale16, min16 = (span / INT4_LEVELS).astype(jnp.float16), lo.astype(jnp.float16)
    if search:
        d = wg - lo[..., None]  # >= 0: the group relative to its minimum
        n = jnp.float32(g)
        sum_d, sum_dd = jnp.sum(d, axis=-1), jnp.sum(d * d, axis=-1)

        def score(q, scale16, min16):
            """Squared error of ``scale * q + min - w`` over each group, from the sums of q, q^2 and q * d."""
            s, m = scale16.astype(jnp.float32), min16.astype(jnp.float32) - lo
            sum_q, sum_qq, sum_qd = jnp.sum(q, axis=-1), jnp.sum(q * q, axis=-1), jnp.sum(q * d, axis=-1)
            err = s * s * sum_qq + 2 * s * m * sum_q + n * m * m - 2 * s * sum_qd - 2 * m * sum_d + sum_dd
            return jnp.maximum(err, 0.0), sum_q, sum_qq, sum_qd

        best = score(_int4_codes(wg, scale16, min16), scale16, min16)[0]
        for f in search:
            q = _int4_codes(wg, (span * f / INT4_LEVELS).astype(jnp.float16), (lo + span * (1 - f) / 2).astype(jnp.float16))
            _, sum_q, sum_qq, sum_qd = score(q, jnp.zeros_like(scale16), lo.astype(jnp.float16))
            det = n * sum_qq - sum_q * sum_q  # zero only when every code is the same
            fit_scale = jnp.where(det > 0, (n * sum_qd - sum_q * sum_d) / jnp.where(det > 0, det, 1.0), 0.0)
            fit_min = jnp.where(det > 0, (sum_d - fit_scale * sum_q) / n, 0.0) + lo
            cand_scale, cand_min = fit_scale.astype(jnp.float16), fit_min.astype(jnp.float16)
            err = score(q, cand_scale, cand_min)[0]
            better = err < best
            best = jnp.where(better, err, best)
            scale16, min16 = jnp.where(better, cand_scale, scale16), jnp.where(better, cand_min, min16)
    q = _int4_codes(wg, scale16, min16)
    return {"q4": pack_codes(q.reshape(out, width).astype(jnp.uint8)), "scale": scale16, "min": min16}


# --- decode-layout trees ----------------------------------------------------------------
def _store_fn(mode: str, embedding: bool):
    def store(name: str, w):
        if (name == "wte" and not embedding) or (mode == "int4" and name in INT4_KEEP_FLOAT):
            return jnp.asarray(w, jnp.float32)
        if mode == "int8":
            stored = quantize_rows(w)
        elif mode == "int4":
            stored = quantize_groups(w)
        else:
            stored = jnp.asarray(w).astype(jnp.bfloat16)
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
    """``"int8"``, ``"int4"``, ``"bf16"`` or None (float) for a decode-layout tree, judged by its first layer."""
    w = prepared["layers"][0]["attn"]["c_attn"]["w"] if prepared["layers"] else prepared["wte"]
    if is_int4(w):
        return "int4"
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
