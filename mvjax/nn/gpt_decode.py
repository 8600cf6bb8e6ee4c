"""The causal GPT applied token-by-token against a KV cache, laid out for fast decoding.

The first stage spends nearly all its time here reading weights: one decode step
multiplies a handful of rows by every matrix. On XLA's CPU backend a weight-major
product ``W (out, in) @ x (in, rows)`` streams the weights far faster than
``x (rows, in) @ W (in, out)`` (about 1.4x at 2 rows, 2x at 16 in our measurements,
see benchmarks/RESULTS.md), so this path keeps

* kernels in PyTorch's (out, in) layout, one array per layer (no slicing inside the loop),
* activations feature-major, ``(width, rows)``,
* the KV cache head-major with positions last, ``(rows, heads, head_dim, length)`` for keys
  and values alike, so both attention products are batched matrix-vector products whose
  long axis (the cache positions) is contiguous: at the released shape a full 2048-slot
  window reads at ~29 GB/s this way, against ~18 GB/s with ``(..., length, head_dim)``
  (benchmarks/RESULTS.md). A step's attention reads as many bytes as the int8 weights do
  once the window passes ~1600 slots, so this matters for long utterances.

The numerics are those of :class:`mvjax.nn.gpt.GPT` (checked against it and against the
reference fixtures); as in the reference's fast path, the speaker projection is added at
every position of a conditioned row.

A weight matrix may also be stored bfloat16, int8 with a float32 scale per output row
(``{"q", "scale"}``), or group-wise int4 (``{"q4", "scale", "min"}``, :mod:`mvjax.kernels.int4`; both
made by :mod:`mvjax.io.quantize`); :func:`_matmul` and :func:`_rows` take any of them.
The KV cache may be float32, bf16 or int8 (:mod:`mvjax.nn.kv_cache`, which writes and reads it), either a
whole block per row or a pool of pages with a page table (:mod:`mvjax.nn.paged_cache`: pass ``table``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mvjax.kernels.int4 import dequantize as int4_dequantize
from mvjax.kernels.int4 import int4_matmul, is_int4
from mvjax.kernels.int8 import int8_matmul
from mvjax.nn import kv_cache, paged_cache
from mvjax.nn.config import GPTConfig


def prepare_decode_params(config: GPTConfig, params, dtype=None, store=None, consume: bool = False) -> dict:
    """Re-lay a converted parameter tree for :func:`apply_tokens` (copies; the input can be dropped).

    ``store(name, matrix)``: how each weight matrix is kept, given its (out, in) float copy
    (``name`` is ``"wte"`` for the tied embedding/head, ``"speaker_proj"``, or the layer's
    projection name); default: the copy cast to ``dtype``. :mod:`mvjax.io.quantize` passes a
    quantiser; matrices are converted one at a time, so only one extra float copy exists.

    ``consume=True`` empties ``params`` (nested dicts) as it goes: each stacked kernel leaves the
    caller's tree before its per-layer copies are made, so it is freed as soon as they exist and
    the peak is one tree plus one stacked kernel instead of two trees (5.4 -> ~6.5 GB instead of
    ~10.4 GB at the released shape). Use it for a tree nothing else will read again."""
    if len(config.vocab_sizes) != 1 or not config.tied_heads:
        raise ValueError("the KV-cache decoder serves the causal first stage: one input table, tied head")
    cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
    if store is None:
        store = lambda name, w: cast(w)
    out_in = lambda k: jnp.asarray(k).T  # (in, out) -> (out, in)

    def take(container: dict, key: str):
        """container[key], removed from ``container`` when consuming (and the container allows it)."""
        if consume and isinstance(container, dict):
            return container.pop(key)
        return container[key]

    blocks = params["blocks"]
    per_layer = lambda tree, i: jax.tree_util.tree_map(lambda a: a[i], tree)
    layers = [{"ln_1": per_layer(blocks["ln_1"], i), "ln_2": per_layer(blocks["ln_2"], i), "attn": {}, "mlp": {}}
              for i in range(config.n_layer)]
    for group in ("attn", "mlp"):
        for name in list(blocks[group]):
            dense = blocks[group][name]
            kernel = take(dense, "kernel")  # (n_layer, in, out)
            for i, lay in enumerate(layers):
                entry = {"w": store(name, out_in(kernel[i]))}
                if "bias" in dense:
                    entry["b"] = dense["bias"][i]
                lay[group][name] = entry
            del kernel  # with consume, the last reference to the stacked kernel

    prepared = {
        "wte": store("wte", jnp.asarray(take(params["wte_0"], "embedding"))),
        "wpe": cast(jnp.asarray(params["wpe"]["embedding"])),
        "ln_f": params["ln_f"],
        "layers": layers,
    }
    if "speaker_proj" in params:
        prepared["speaker_proj"] = store("speaker_proj", out_in(take(params["speaker_proj"], "kernel")))
    return prepared


def _norm(config: GPTConfig, p, x):
    """Norm over the feature axis 0 of x (D, N), in float32."""
    x32 = x.astype(jnp.float32)
    scale = p["scale"].astype(jnp.float32)[:, None]
    if config.norm_type == "rmsnorm":
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=0, keepdims=True) + config.norm_eps)
        return y.astype(x.dtype) * scale.astype(x.dtype)
    centred = x32 - jnp.mean(x32, axis=0, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=0, keepdims=True) + config.norm_eps) * scale
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)[:, None]
    return y.astype(x.dtype)


def _matmul(w, x):
    """Weight matrix (out, in) @ x (in, N) -> float32 (out, N). ``w`` is an array, an int8 matrix
    with per-row scales (``{"q", "scale"}``, see :mod:`mvjax.kernels.int8`) or a group-wise int4
    matrix (``{"q4", "scale", "min"}``, see :mod:`mvjax.kernels.int4`)."""
    if is_int4(w):
        return int4_matmul(w, x)
    if isinstance(w, dict):
        return int8_matmul(w, x)
    return jnp.dot(w, x.astype(w.dtype), preferred_element_type=jnp.float32)


def _rows(table, ids):
    """Rows ``ids`` of an embedding table (array, int8 with per-row scales or group-wise int4), float32:
    only the gathered rows are dequantised."""
    if is_int4(table):
        return int4_dequantize({name: table[name][ids] for name in ("q4", "scale", "min")})
    if isinstance(table, dict):
        return table["q"][ids].astype(jnp.float32) * table["scale"][ids][:, None]
    return table[ids].astype(jnp.float32)


def _linear(p, x):
    """(out, in) @ (in, N) -> (out, N), plus bias."""
    y = _matmul(p["w"], x).astype(x.dtype)
    if "b" in p:
        y = y + p["b"].astype(y.dtype)[:, None]
    return y


def _embed(config: GPTConfig, params: dict, tokens: jnp.ndarray, positions: jnp.ndarray, speaker_term, dtype):
    """Token plus position embeddings, feature-major (D, N) for flat ``tokens``/``positions`` (N,),
    plus ``speaker_term`` (D, N) or None, cast to ``dtype``."""
    x = _rows(params["wte"], tokens) + params["wpe"][positions].astype(jnp.float32)
    x = x.T
    if speaker_term is not None:
        x = x + speaker_term
    return x.astype(dtype)


def _layers(config: GPTConfig, params: dict, x, cache: list, attention):
    """The transformer blocks over x (D, N). ``attention(cache_k, cache_v, qkv) -> (y (D, N), cache_k, cache_v)``
    writes each layer's keys and values and attends; returns (final-normed x, new cache)."""
    new_cache = []
    for lp, (cache_k, cache_v) in zip(params["layers"], cache):
        h = _norm(config, lp["ln_1"], x)
        qkv = _linear(lp["attn"]["c_attn"], h)
        y, cache_k, cache_v = attention(cache_k, cache_v, qkv)
        new_cache.append((cache_k, cache_v))
        x = x + _linear(lp["attn"]["c_proj"], y)

        h = _norm(config, lp["ln_2"], x)
        mlp = lp["mlp"]
        if config.nonlinearity_type == "swiglu":
            h = jax.nn.silu(_linear(mlp["w1"], h)) * _linear(mlp["w3"], h)
        else:
            h = jax.nn.gelu(_linear(mlp["c_fc"], h), approximate=False)
        x = x + _linear(mlp["c_proj"], h)
    return _norm(config, params["ln_f"], x), new_cache


def _head(params: dict, x):
    """Logits (V, N) of the normed x (D, N). The barrier keeps XLA from folding a later transpose
    into the dot: on CPU the transposed-output dot left the thread-pooled matmul library for a
    single-threaded one (19 ms of a 224 ms step at the released shape, batch 1)."""
    return jax.lax.optimization_barrier(_matmul(params["wte"], x))


def _attention_block(config: GPTConfig, qkv, cache_k, cache_v, positions, cache_len: int, dtype, kernel: bool = True,
                     table=None):
    """One layer's attention for ``rows`` rows of ``length`` tokens each (qkv (3D, rows * length), column
    r * length + t): keys and values written at ``positions`` (rows, length), then causal attention over
    the first ``cache_len`` cache slots -> (y (D, rows * length), cache_k, cache_v). ``table``: the rows'
    page tables (rows, pages_per_row) when ``cache_k``/``cache_v`` are page pools (:mod:`mvjax.nn.paged_cache`)."""
    width, heads, head_dim = config.n_embd, config.n_head, config.head_dim
    rows, length = positions.shape

    def split(a, last):  # (D, N) -> (R, H, T, hd), or the cache layout (R, H, hd, T) with ``last``
        a = a.reshape(heads, head_dim, rows, length)
        return a.transpose(2, 0, 1, 3) if last else a.transpose(2, 0, 3, 1)

    q = split(qkv[:width], False)
    k, v = split(qkv[width:2 * width], True), split(qkv[2 * width:], True)
    if table is not None:
        cache_k = paged_cache.write(cache_k, k, table, positions)
        cache_v = paged_cache.write(cache_v, v, table, positions)
        y = paged_cache.attend(q, cache_k, cache_v, table, positions, cache_len, dtype, kernel=kernel)
    else:
        cache_k, cache_v = kv_cache.write(cache_k, k, positions), kv_cache.write(cache_v, v, positions)
        y = kv_cache.attend(q, cache_k, cache_v, positions, cache_len, dtype, kernel=kernel)
    return y.transpose(1, 3, 0, 2).reshape(width, rows * length), cache_k, cache_v


def apply_tokens(
    config: GPTConfig,
    params: dict,
    tokens: jnp.ndarray,
    positions: jnp.ndarray,
    speaker_emb: Optional[jnp.ndarray],
    cache: list,
    dtype=jnp.float32,
    attend: Optional[int] = None,
    table: Optional[jnp.ndarray] = None,
):
    """tokens, positions: (R, T). Row r writes keys/values at ``positions[r, 0]`` onwards and
    attends to cache slots <= each query's position. With T > 1 (prefill) every row must start
    at the same position (``positions[0, 0]``), so the write is one slice update. ``speaker_emb`` (R, S) or None.
    ``attend`` (static): read only the first ``attend`` cache slots (every position must be
    below it); the cache itself keeps its full length and is updated in place. ``table`` (R, pages_per_row):
    ``cache`` is a page pool (:mod:`mvjax.nn.paged_cache`) and these are the rows' page tables; each row then
    writes at its own positions, T > 1 included.
    Returns (float32 logits (R, T, V), new cache)."""
    rows, length = tokens.shape
    n = rows * length
    speaker_term = None
    if speaker_emb is not None:  # (D, R), repeated over each row's tokens (column n = r * T + t)
        speaker_term = jnp.repeat(_matmul(params["speaker_proj"], speaker_emb.T), length, axis=1)
    x = _embed(config, params, tokens.reshape(n), positions.reshape(n), speaker_term, dtype)
    cache_len = _cache_len(config, cache, attend, table)

    def attention(cache_k, cache_v, qkv):
        return _attention_block(config, qkv, cache_k, cache_v, positions, cache_len, x.dtype, table=table)

    x, new_cache = _layers(config, params, x, cache, attention)
    return _head(params, x).T.reshape(rows, length, -1), new_cache


def apply_with_piece(
    config: GPTConfig,
    params: dict,
    tokens: jnp.ndarray,
    positions: jnp.ndarray,
    speaker_emb: Optional[jnp.ndarray],
    cache: list,
    piece: jnp.ndarray,
    piece_start,
    piece_rows: tuple,
    piece_speaker: Optional[jnp.ndarray],
    piece_window: int,
    piece_last,
    dtype=jnp.float32,
    attend: Optional[int] = None,
    table: Optional[jnp.ndarray] = None,
):
    """One decode step for R cache rows plus a prefill piece for one more utterance, in one pass over the weights.

    ``tokens``, ``positions`` (R, 1), ``speaker_emb`` (R, S) or None: the decode rows, as :func:`apply_tokens`
    with T == 1. ``piece`` (2, P): the utterance's conditioned and unconditioned rows of prompt tokens at
    positions ``piece_start .. piece_start + P - 1``, kept in cache rows ``piece_rows`` (two traced row
    indices). The piece is written before the decode rows: a decode row of that pair (the caller ignores its
    output) must write where nothing is read before being rewritten (the next piece's or first step's position).
    ``piece_speaker`` (S,) or None: its conditioned row's embedding. The piece attends through XLA over the
    first ``piece_window`` slots of its two rows, as a whole-prompt prefill with that window does, so the
    piece's keys, values and logits are the prefill's up to float32 rounding (XLA compiles the products over
    a different set of columns; ~2e-7 on a random model). Every matrix product sees the decode rows' and the
    piece's columns together (weights read once).
    ``table`` (R, pages_per_row): ``cache`` is a page pool (:mod:`mvjax.nn.paged_cache`), ``table`` the decode
    rows' page tables, and ``piece_rows`` index that table (the piece's rows need not be decode rows' tables'
    neighbours in the pool: each page is found through the table).
    Returns (decode logits (R, 1, V), the piece's logits at ``piece_last`` (2, V), new cache)."""
    rows = tokens.shape[0]
    length = piece.shape[1]
    piece_positions = jnp.broadcast_to(piece_start + jnp.arange(length, dtype=jnp.int32), piece.shape)
    speaker_term = None
    if speaker_emb is not None:
        own = jnp.stack([piece_speaker, jnp.zeros_like(piece_speaker)])
        term = _matmul(params["speaker_proj"], jnp.concatenate([speaker_emb, own]).T)  # (D, R + 2)
        speaker_term = jnp.concatenate([term[:, :rows], jnp.repeat(term[:, rows:], length, axis=1)], axis=1)
    x = _embed(config, params, jnp.concatenate([tokens.reshape(rows), piece.reshape(2 * length)]),
               jnp.concatenate([positions.reshape(rows), piece_positions.reshape(2 * length)]), speaker_term, dtype)
    cache_len = _cache_len(config, cache, attend, table)
    piece_table = None if table is None else table[jnp.stack(piece_rows)]

    def attention(cache_k, cache_v, qkv):
        # Every write before every read, so each layer's cache is updated in place (a read between two
        # writes made XLA copy the whole cache).
        q, k, v = _piece_heads(config, qkv[:, rows:], length)
        if piece_table is None:
            cache_k = kv_cache.write_rows(cache_k, k, piece_rows, piece_start)
            cache_v = kv_cache.write_rows(cache_v, v, piece_rows, piece_start)
        else:
            cache_k = paged_cache.write(cache_k, k, piece_table, piece_positions)
            cache_v = paged_cache.write(cache_v, v, piece_table, piece_positions)
        y_rows, cache_k, cache_v = _attention_block(config, qkv[:, :rows], cache_k, cache_v, positions, cache_len,
                                                    x.dtype, table=table)
        if piece_table is None:
            own_k = kv_cache.read_rows(cache_k, piece_rows, piece_window)
            own_v = kv_cache.read_rows(cache_v, piece_rows, piece_window)
        else:
            own_k = paged_cache.gather(cache_k, piece_table, piece_window)
            own_v = paged_cache.gather(cache_v, piece_table, piece_window)
        y_piece = kv_cache.attend(q, own_k, own_v, piece_positions, piece_window, x.dtype, kernel=False)
        y_piece = y_piece.transpose(1, 3, 0, 2).reshape(config.n_embd, 2 * length)
        return jnp.concatenate([y_rows, y_piece], axis=1), cache_k, cache_v

    x, new_cache = _layers(config, params, x, cache, attention)
    last = jnp.array([0, length], jnp.int32) + piece_last
    logits = _head(params, jnp.concatenate([x[:, :rows], x[:, rows + last]], axis=1)).T
    return logits[:rows, None], logits[rows:], new_cache


def _cache_len(config: GPTConfig, cache: list, attend: Optional[int], table) -> int:
    """Cache positions attention reads: ``attend``, capped at what the cache (or a page table's row) holds."""
    held = kv_cache.length(cache) if table is None else min(config.block_size, table.shape[1] * kv_cache.length(cache))
    return held if attend is None else min(attend, held)


def _piece_heads(config: GPTConfig, qkv, length: int):
    """A piece's queries (2, H, T, hd), keys and values (2, H, hd, T, the cache layout) from qkv (3D, 2T)."""
    width, heads, head_dim = config.n_embd, config.n_head, config.head_dim

    def split(a, last):
        a = a.reshape(heads, head_dim, 2, length)
        return a.transpose(2, 0, 1, 3) if last else a.transpose(2, 0, 3, 1)

    return split(qkv[:width], False), split(qkv[width:2 * width], True), split(qkv[2 * width:], True)
