"""First-stage decoding: prefill plus a KV-cache token loop, jitted as one function.

Every utterance runs as two rows, conditioned (speaker projection added at every
position) and unconditioned (none); the next token is sampled from the guided logits
and fed back to both rows. Prompts of different lengths share one call: each row keeps
its own positions and write index, so its output equals decoding it alone.

The loop is model-agnostic (t5x style): :func:`decode_loop` takes a
``logits_fn(cache, tokens, positions) -> (logits, cache)`` so it can be tested with
fake logits. The KV cache is allocated once for the block and updated in place; the loop
runs through a few static attention windows (64, 128, ..., block), one ``lax.while_loop``
each, so early steps do not read a block-sized cache.

Randomness: one key per utterance, ``fold_in(key, i)`` for its i-th generated token, so
results do not depend on batch packing or device count.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from typing import Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mvjax.core.parallel import (
    DATA_AXIS,
    pad_rows,
    padded_size,
    put_batch,
    put_replicated,
)
from mvjax.inference.options import SamplingConfig
from mvjax.inference.sampling import guide, sample
from mvjax.io.quantize import decode_params_mode, decoder_params
from mvjax.nn.config import GPTConfig
from mvjax.nn.gpt_decode import apply_tokens
from mvjax.nn.kv_cache import cache_kind, init_cache, put_window_part, window_part

MIN_PROMPT_BUCKET = 16
MIN_WINDOW = 64


class BlockFullWarning(UserWarning):
    """A row reached the end of the block before producing end of audio."""


@dataclasses.dataclass
class DecodeResult:
    """Per-utterance output of :func:`generate`."""

    sequences: list[np.ndarray]  # prompt followed by generated tokens (end of audio included when produced)
    prompt_lengths: np.ndarray  # (B,)
    finished: np.ndarray  # (B,) bool: produced end of audio
    hit_block_end: np.ndarray  # (B,) bool: stopped because the block was full
    step_logits: Optional[list[np.ndarray]] = None  # per row (steps, V): guided logits at each step

    @property
    def truncated(self) -> bool:
        return bool(np.any(self.hit_block_end))

    def generated(self, i: int) -> np.ndarray:
        return self.sequences[i][self.prompt_lengths[i]:]


@flax.struct.dataclass
class LoopState:
    tokens: jnp.ndarray  # (B, block) int32, prompt then generated tokens
    lengths: jnp.ndarray  # (B,) int32, tokens held per row
    done: jnp.ndarray  # (B,) bool
    finished: jnp.ndarray  # (B,) bool, end of audio seen
    cache: Optional[list]  # the KV cache pytree (None once decoding is over)
    step_logits: Optional[jnp.ndarray]  # (B, block, V) float32 or None


def sampling_columns(settings: Sequence[SamplingConfig], vocab: int) -> dict[str, np.ndarray]:
    """One array per sampling value, one entry per row, as the loop takes them: no top-k is
    ``vocab``, no (or non-positive) top-p is 1.0."""
    return {
        "guidance": np.array([s.guidance_scale for s in settings], np.float32),
        "temperature": np.array([s.temperature for s in settings], np.float32),
        "top_k": np.array([vocab if s.top_k is None else s.top_k for s in settings], np.int32),
        "top_p": np.array([1.0 if s.top_p is None or s.top_p <= 0 else s.top_p for s in settings], np.float32),
    }


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def prompt_bucket(length: int, block_size: int) -> int:
    """Padded prompt length: the next power of two >= 16, capped at the block."""
    bucket = MIN_PROMPT_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, block_size)


def cache_windows(prompt_bucket_len: int, block_size: int) -> tuple[int, ...]:
    """Static cache sizes the loop grows through: powers of two from max(256, prompt), then the block."""
    window = MIN_WINDOW
    while window < prompt_bucket_len:
        window *= 2
    windows = []
    while window < block_size:
        windows.append(window)
        window *= 2
    windows.append(block_size)
    return tuple(windows)


def advance_rows(state, logits, *, prompt_lengths, limits, keys, sampling, block_size: int, end_of_audio: int):
    """Sample one token per row from ``logits`` (2B, V) ([conditioned..., unconditioned...]) and append
    it where the row is active. ``state`` has ``tokens`` (B, block), ``lengths``, ``done``, ``finished``
    and ``step_logits`` (a :class:`LoopState` or the engine's slot state); ``sampling``: (B,) arrays.
    A row's i-th generated token is drawn with ``fold_in(key, i)``."""
    batch = state.tokens.shape[0]
    rows = jnp.arange(batch)
    steps = state.lengths - prompt_lengths

    def pick(key, step, cond, uncond, setting):
        guided = guide(cond, uncond, setting["guidance"])
        token = sample(jax.random.fold_in(key, step), guided, setting["temperature"], setting["top_k"], setting["top_p"])
        return token, guided

    tokens, guided = jax.vmap(pick)(keys, steps, logits[:batch], logits[batch:], sampling)
    active = ~state.done
    write_at = jnp.minimum(state.lengths, block_size - 1)
    new_tokens = state.tokens.at[rows, write_at].set(jnp.where(active, tokens, state.tokens[rows, write_at]))
    lengths = state.lengths + active.astype(jnp.int32)
    finished = state.finished | (active & (tokens == end_of_audio))
    done = state.done | finished | (lengths >= limits)
    step_logits = state.step_logits
    if step_logits is not None:
        at = jnp.minimum(steps, step_logits.shape[1] - 1)
        old = step_logits[rows, at]
        step_logits = step_logits.at[rows, at].set(jnp.where(active[:, None], guided, old))
    return state.replace(tokens=new_tokens, lengths=lengths, done=done, finished=finished, step_logits=step_logits)


def decode_step(state, logits_fn: Callable, window: int, advance: Callable):
    """One token for every row: feed each row's last token at its position, then ``advance``."""
    rows = jnp.arange(state.tokens.shape[0])
    last_pos = jnp.maximum(state.lengths - 1, 0)
    pos2 = jnp.concatenate([last_pos, last_pos])[:, None]
    tok = state.tokens[rows, last_pos]
    tok2 = jnp.concatenate([tok, tok])[:, None]
    logits, cache = logits_fn(state.cache, tok2, pos2, window)
    return advance(state.replace(cache=cache), logits[:, 0])


def prefill(logits_fn: Callable, cache: list, prompts, prompt_lengths, limits, window: int, advance: Callable, *,
            block_size: int, return_logits: bool = False) -> LoopState:
    """Run the padded ``prompts`` (B, P) through both rows of every utterance from position 0 and
    sample each row's first token from its last prompt position; the :class:`LoopState` that follows."""
    batch, plen = prompts.shape
    doubled = jnp.concatenate([prompts, prompts], axis=0)
    positions = jnp.broadcast_to(jnp.arange(plen, dtype=jnp.int32), doubled.shape)
    logits, cache = logits_fn(cache, doubled, positions, window)
    last = jnp.concatenate([prompt_lengths, prompt_lengths]) - 1
    logits = logits[jnp.arange(2 * batch), last]  # (2B, V): each row's last prompt position
    vocab = logits.shape[-1]
    state = LoopState(
        tokens=jnp.zeros((batch, block_size), jnp.int32).at[:, :plen].set(prompts),
        lengths=prompt_lengths.astype(jnp.int32),
        done=prompt_lengths >= limits,
        finished=jnp.zeros((batch,), bool),
        cache=cache,
        step_logits=jnp.zeros((batch, block_size, vocab), jnp.float32) if return_logits else None,
    )
    return advance(state, logits)


def decode_loop(
    logits_fn: Callable,
    cache: list,
    prompts: jnp.ndarray,
    prompt_lengths: jnp.ndarray,
    limits: jnp.ndarray,
    keys: jnp.ndarray,
    sampling: dict,
    *,
    block_size: int,
    windows: Sequence[int],
    end_of_audio: int,
    return_logits: bool,
    window_view: Optional[tuple[Callable, Callable]] = None,
):
    """Prefill ``prompts`` (B, P) and sample until every row is done.

    ``logits_fn(cache, tokens (2B, T), positions (2B, T), window) -> (logits (2B, T, V), cache)``
    with rows [conditioned..., unconditioned...]; ``window`` (static) bounds every position
    passed, so the model need only attend to that many cache slots. ``limits`` (B,): maximum total length per
    row (<= block). ``sampling``: guidance, temperature, top_k, top_p, each a traced scalar (all
    rows) or a (B,) array (one value per row, so requests with different settings share a batch).
    ``cache`` is the model's pytree (allocated for the whole block). ``window_view``: optional
    ``(take(cache, window) -> part, put(cache, part) -> cache)``: each window's loop then runs on
    ``part`` (a copy of the first ``window`` positions, made once), which spares every step a
    strided read of a block-long cache. Returns the final :class:`LoopState` (its ``cache`` dropped).
    """
    batch, plen = prompts.shape
    per_row = {name: jnp.broadcast_to(jnp.asarray(value), (batch,)) for name, value in sampling.items()}
    rules = dict(prompt_lengths=prompt_lengths, limits=limits, keys=keys, sampling=per_row, block_size=block_size,
                 end_of_audio=end_of_audio)
    advance = functools.partial(advance_rows, **rules)

    state = prefill(logits_fn, cache, prompts, prompt_lengths, limits, windows[0], advance,
                    block_size=block_size, return_logits=return_logits)

    def step(state: LoopState, window: int) -> LoopState:
        return decode_step(state, logits_fn, window, advance)

    # One while loop per window: a step in window W attends to W cache slots, so early steps
    # do not pay for the whole block. Later loops exit at once when every row is done.
    for window in windows:

        def fits(state, window=window):
            # Every active row's next write position (its last token's) lies inside this window.
            next_write = jnp.where(state.done, 0, state.lengths - 1)
            return jnp.any(~state.done) & jnp.all(next_write < window)

        body = functools.partial(step, window=window)
        if window_view is None or window >= block_size:
            state = jax.lax.while_loop(fits, body, state)
            continue
        take, put = window_view

        def in_window(state, fits=fits, body=body, window=window):
            whole = state.cache
            state = jax.lax.while_loop(fits, body, state.replace(cache=take(whole, window)))
            return state.replace(cache=put(whole, state.cache))

        # A window no row reaches (every row done earlier) costs nothing: no copy in or out.
        state = jax.lax.cond(fits(state), in_window, lambda state: state, state)
    return state.replace(cache=None)


def _replica(array, device):
    """The copy of a replicated ``array`` held by ``device``."""
    for shard in array.addressable_shards:
        if shard.device == device:
            return shard.data
    raise ValueError(f"{device} holds no replica of this array")


class FirstStageDecoder:
    """Jitted first-stage sampler for one converted model.

    ``compile_count`` counts traces of the jitted function (a new prompt bucket or batch
    size compiles; new texts, keys and sampling values within a bucket do not).
    """

    def __init__(self, config: GPTConfig, params, end_of_audio: int, dtype=jnp.float32, kv_cache=None, mesh=None,
                 quantize: Optional[str] = None, consume_params: bool = False):
        """``quantize``: None, ``"int8"``, ``"int4"`` or ``"bf16"`` weight storage (:mod:`mvjax.io.quantize`); a
        tree already quantised (a model directory converted with ``--quantize``) is used as stored.
        ``kv_cache``: ``"float32"``, ``"bf16"`` or ``"int8"`` (:mod:`mvjax.nn.kv_cache`); default:
        the compute dtype's (float32, or bf16 for bf16 compute).
        ``consume_params``: empty the (freshly loaded) ``params`` tree while re-laying it, so the
        peak is about one copy of the weights instead of two."""
        if not config.causal:
            raise ValueError("the first-stage decoder needs a causal GPT")
        self.config = config
        self.end_of_audio = int(end_of_audio)
        self.dtype = dtype
        self.kv_cache = cache_kind(kv_cache, default=cache_kind(dtype))
        self.mesh = mesh
        self.params = put_replicated(decoder_params(config, params, dtype, quantize, consume=consume_params), mesh)
        self.quantize = decode_params_mode(self.params)
        self.compile_count = 0
        self._jitted = {}

    def on_device(self, device) -> "FirstStageDecoder":
        """This decoder on one ``device`` of its mesh alone (no mesh), its weights that device's replica
        of the replicated tree (no copy), compiled afresh."""
        other = copy.copy(self)
        other.mesh, other.compile_count, other._jitted = None, 0, {}
        other.params = jax.tree_util.tree_map(lambda a: _replica(a, device), self.params)
        return other

    def with_kv_cache(self, kind: str) -> "FirstStageDecoder":
        """This decoder (sharing its weights) with another KV cache kind, compiled afresh."""
        other = copy.copy(self)
        other.kv_cache, other.compile_count, other._jitted = cache_kind(kind), 0, {}
        return other

    def _function(self, plen: int, return_logits: bool, with_speaker: bool):
        """The jitted decode for one prompt bucket; over a mesh, every device runs its own rows'
        loop (``shard_map``) and stops when they are done."""
        key = (plen, return_logits, with_speaker)
        if key not in self._jitted:
            fn = functools.partial(self._run, plen=plen, return_logits=return_logits)
            if self.mesh is not None:
                data = P(DATA_AXIS)
                fn = jax.shard_map(
                    fn, mesh=self.mesh,
                    in_specs=(P(), data, data, data, data if with_speaker else P(), data, data),
                    out_specs=data,
                )
            self._jitted[key] = jax.jit(fn)
        return self._jitted[key]

    def _run(self, params, prompts, prompt_lengths, limits, speaker_emb, keys, sampling, *, plen, return_logits):
        self.compile_count += 1  # runs only while tracing
        cfg = self.config
        batch = prompts.shape[0]
        if speaker_emb is None:
            speaker_rows = None
        else:
            speaker_rows = jnp.concatenate([speaker_emb, jnp.zeros_like(speaker_emb)], axis=0)

        def logits_fn(cache, tokens, positions, window):
            return apply_tokens(cfg, params, tokens, positions, speaker_rows, cache, self.dtype, attend=window)

        windows = cache_windows(plen, cfg.block_size)
        cache = init_cache(cfg, 2 * batch, cfg.block_size, self.kv_cache)
        state = decode_loop(
            logits_fn, cache, prompts, prompt_lengths, limits, keys, sampling,
            block_size=cfg.block_size, windows=windows, end_of_audio=self.end_of_audio, return_logits=return_logits,
            window_view=(window_part, put_window_part),
        )
        return state.tokens, state.lengths, state.finished, state.step_logits

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        speaker_emb: Optional[np.ndarray],
        keys: jax.Array,
        sampling: SamplingConfig | Sequence[SamplingConfig] = SamplingConfig(),
        max_new_tokens: Optional[int | Sequence[int]] = None,
        return_logits: bool = False,
        pad_to: Optional[int] = None,
    ) -> DecodeResult:
        """Decode a batch of prompts. ``keys``: (B, 2) uint32 PRNG keys, one per utterance.
        ``sampling``: one :class:`SamplingConfig` for every row, or one per row (a row's tokens are
        then what it gives decoded alone with its own settings).

        ``pad_to``: run at least this many rows (extra rows stop at once), so batches of
        different sizes can share one compiled function."""
        cfg = self.config
        batch = len(prompts)
        if batch == 0:
            raise ValueError("every prompt needs at least one token")
        lens = np.array([len(p) for p in prompts], np.int32)
        if batch == 0 or lens.min() < 1:
            raise ValueError("every prompt needs at least one token")
        if lens.max() >= cfg.block_size:
            raise ValueError(f"prompt of {lens.max()} tokens leaves no room in the block of {cfg.block_size}")
        if max_new_tokens is None:
            limits = np.full(batch, cfg.block_size, np.int32)
        else:
            new = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (batch,))
            if np.any(new < 1):
                raise ValueError("max_new_tokens must be >= 1")
            limits = np.minimum(lens + new, cfg.block_size).astype(np.int32)
        plen = prompt_bucket(int(lens.max()), cfg.block_size)
        padded = np.zeros((batch, plen), np.int32)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = p
        keys = np.asarray(keys)
        if keys.shape[0] != batch:
            raise ValueError(f"need one PRNG key per prompt: got {keys.shape[0]} for {batch}")
        # Over several devices the batch is padded with copies of row 0 that stop at once.
        size = padded_size(max(batch, pad_to or 0), self.mesh)
        padded, lens_in, keys = pad_rows(padded, size), pad_rows(lens, size), pad_rows(keys, size)
        limits = np.concatenate([limits, lens_in[batch:]]).astype(np.int32)
        if speaker_emb is not None:
            speaker_emb = put_batch(pad_rows(np.asarray(speaker_emb, np.float32).reshape(batch, -1), size), self.mesh)
        settings = [sampling] * batch if isinstance(sampling, SamplingConfig) else list(sampling)
        if len(settings) != batch:
            raise ValueError(f"need one sampling config per prompt: got {len(settings)} for {batch}")
        sampling_arrays = {name: put_batch(pad_rows(values, size), self.mesh)
                           for name, values in sampling_columns(settings, cfg.output_vocab_sizes[0]).items()}
        run = self._function(plen, return_logits, speaker_emb is not None)
        tokens, lengths, finished, step_logits = run(
            self.params, put_batch(padded, self.mesh), put_batch(lens_in, self.mesh), put_batch(limits, self.mesh),
            speaker_emb, put_batch(keys, self.mesh), sampling_arrays,
        )
        tokens, lengths = np.asarray(tokens)[:batch], np.asarray(lengths)[:batch]
        finished = np.asarray(finished)[:batch]
        hit_block_end = (~finished) & (lengths >= cfg.block_size)
        if hit_block_end.any():
            rows = ", ".join(str(i) for i in np.flatnonzero(hit_block_end))
            warnings.warn(
                f"first stage filled its block of {cfg.block_size} tokens without ending the audio (rows {rows}); "
                "the speech is cut short: use shorter text",
                BlockFullWarning,
                stacklevel=2,
            )
        seqs = [tokens[i, : lengths[i]].copy() for i in range(batch)]
        logits_out = None
        if return_logits:
            step_logits = np.asarray(step_logits)[:batch]
            logits_out = [step_logits[i, : lengths[i] - lens[i]] for i in range(batch)]
        return DecodeResult(seqs, lens, finished, hit_block_end, logits_out)
