"""Lower every jitted entry point the product uses for GPU (``cuda``) and TPU, on any machine.

    python -m benchmarks.lowering                          # tiny shapes, cuda and tpu, every variant
    python -m benchmarks.lowering --config released        # the released shapes (abstract weights)
    python -m benchmarks.lowering --entries decode,engine_generate --variants float32,int8 --platforms tpu

mvjax is developed on CPUs. JAX lowers a program for another platform without that platform's
hardware (``jit(f).trace(*args).lower(lowering_platforms=(p,))``), and arguments may be abstract
(``jax.ShapeDtypeStruct``), so this proves, without a GPU or TPU and without allocating the 1.2B
weights, that every program the product runs can be handed to that platform's compiler. It lowers
the product's own jitted callables (the objects are built with abstract parameters, then their
jitted functions traced), not re-implementations, so what it reports is what ships. It does not
compile (that needs the platform's compiler) nor run anything.

A lowering passes when JAX lowers the program for the platform *and* every custom call in it is one
the platform runs: Pallas/Mosaic kernels (``tpu_custom_call`` on TPU; ``mosaic_gpu``/Triton on GPU),
XLA's sharding markers and, on GPU, JAX's own CUDA library calls. A custom call to anything else is a
failure: a CPU FFI kernel (``mvjax_int8_matmul``, ``mvjax_f32_attention``, ...) that the trace picked
because the *tracing* backend is a CPU (``jax.default_backend()`` decided at trace time) lowers
without complaint but could never run there, and host callbacks are refused likewise.

Entries (``--entries``; variants in brackets, ``--variants`` keeps those made only of the kinds it names):

  decode                  FirstStageDecoder's jitted prefill + token loop (one prompt bucket)  [W x KV]
  engine_admit            FirstStageEngine: prefill one request and write it into a slot       [W x KV]
  engine_generate         FirstStageEngine: the decode call over every slot and the whole cache  [W x KV]
  engine_generate_window  FirstStageEngine: the decode call over fewer slots on a window copy    [W x KV]
  engine_prefill_piece    FirstStageEngine: decode steps that also prefill a slot piece by piece [W x KV]
  engine_move             FirstStageEngine: move a request to a lower slot (compaction)          [KV]
  engine_reserve          FirstStageEngine: reserve a slot for a piece-by-piece prefill          [KV]
  engine_free             FirstStageEngine: free cancelled slots                                 [KV]
  quantize_rows           mvjax.io.quantize: int8 quantisation of a weight matrix at load         [int8]
  int4_matmul             mvjax.kernels.pallas_int4: a decoder layer's four int4 products, group 64 [int4]
  second_stage            SecondStageSampler: forward pass and per-position sampling              [float32]
  encodec_decode          Codec: latent -> waveform (the whole decode)                            [float32]
  encodec_encode          mvjax.train.prepare.codes_encoder: waveform -> codes (fine-tuning data) [float32]
  encodec_stream_first    encodec._STREAM_STEP, a stream's first run (after the warm-up frames)   [float32]
  encodec_stream_step     encodec._STREAM_STEP, a stream's steady state (carried layer state)     [float32]
  encodec_stream_flush    encodec._STREAM_FLUSH, a stream that ended inside its warm-up           [float32]
  mbd                     MultiBandDiffusion: every band's sampler (``_all_bands``)               [float32]
  speaker_encoder         speaker_encoder.embed_partials                                          [float32]
  finetune_last_block     Trainer._step, the last block and final norm trained                    [float32, bf16]
  finetune_lora           Trainer._step, LoRA adapters on every block                             [float32, bf16]
  finetune_eval           Trainer._eval (validation loss), last-block mode                        [float32, bf16]

int4_matmul lowers each distinct weight shape of a first-stage layer (attention in/out, MLP in/out) in
the int4 layout of :mod:`mvjax.kernels.int4` (abstract, its q4 shape from ``pack_codes``), times a decode
step's rows, through the platform's Pallas int4 kernel (plain XLA on other platforms): the kernel on its
own, as the decoder does not hold int4 weights yet.

W: first-stage weight storage (float32, bf16, int8: :mod:`mvjax.io.quantize`); KV: the KV cache kind
(:data:`mvjax.nn.kv_cache.KV_CACHE_KINDS`); compute is float32, as the product runs it. Variant names:
``w-<weights>.kv-<cache>``, ``kv-<cache>``, or the dtype alone. finetune variants are the compute dtype.

Configs: ``tiny`` (the benchmarks' tiny first stage, block 256; small second stage, U-Net and the
released codec and speaker encoder: seconds), ``fixture`` (the shapes of the shared reference
fixtures' checkpoints, ``--fixtures``), ``released`` (the released shapes; the diffusion U-Net is
benchmarks.vocode's "realistic" one).

Output: one line per entry, platform and variant,

    lower entry=<name> platform=<cuda|tpu> variant=<v> ok=<yes|no> pallas=<kernel names found, or none>

followed, when ok=no, by one line ``# <reason>``; a summary goes to stderr. Exit status 1 when any
lowering failed. ``--dump DIR`` writes each lowered module's text to ``DIR/<entry>.<platform>.<variant>.mlir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RELEASED_SECOND_STAGE
from benchmarks.decode import END_OF_AUDIO, SPEAKER_DIM, make_config
from mvjax.core.precision import apply as apply_precision
from mvjax.inference.decode import FirstStageDecoder, cache_windows, prompt_bucket, sampling_columns
from mvjax.inference.diffusion import MultiBandDiffusion
from mvjax.inference.engine import DEFAULT_SLOTS, FirstStageEngine
from mvjax.inference.options import DEFAULT_STEPS, SamplingConfig
from mvjax.inference.second_stage import DEFAULT_STAGE2_TOP_K, SecondStageSampler
from mvjax.inference.stages import Codec, diffusion_frames_bucket
from mvjax.io.quantize import abstract_decode_params, quantize_rows
from mvjax.kernels.int4 import int4_matmul, pack_codes
from mvjax.nn import encodec, speaker_encoder
from mvjax.nn.config import GPTConfig
from mvjax.nn.diffusion_config import DiffusionConfig
from mvjax.nn.diffusion_unet import abstract_params as unet_shapes
from mvjax.nn.gpt import abstract_params as gpt_shapes
from mvjax.nn.kv_cache import KV_CACHE_KINDS
from mvjax.nn.speaker_encoder import SpeakerEncoderConfig
from mvjax.train.model import TrainSpec
from mvjax.train.optim import OptimConfig
from mvjax.train.prepare import codes_encoder
from mvjax.train.trainer import Trainer, new_state

PLATFORMS = ("cuda", "tpu")
KINDS = ("float32", "bf16", "int8")
# Kinds ``--variants`` selects by: the first-stage weight kinds, and int4 (the int4_matmul entry alone).
VARIANT_KINDS = KINDS + ("int4",)
CONFIGS = ("tiny", "fixture", "released")
# The Pallas kernels the product may carry (the names their pallas_call is given).
KERNEL_NAMES = ("mvjax_ragged_attention", "mvjax_paged_attention", "mvjax_int8_matmul", "mvjax_int4_matmul")

# Custom calls a platform runs. Pallas kernels lower to the first group; its lines are where kernel names
# are looked for (a CPU FFI call of the same name, ``custom_call @mvjax_int8_matmul``, is no Pallas kernel).
PALLAS_TARGETS = {"cuda": ("mosaic_gpu", "mosaic_gpu_v2", "__gpu$xla.gpu.triton"), "tpu": ("tpu_custom_call",)}
# Sharding and placement markers XLA itself consumes, on every platform.
GENERIC_TARGETS = ("Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "annotate_device_placement",
                   "MoveToHost", "MoveToDevice", "LayoutConstraint")
# JAX's own CUDA library calls (cuSOLVER, cuBLAS, its threefry kernel, ...).
CUDA_LIBRARY_PREFIXES = ("cu_", "cusolver", "cublas", "cufft", "cusparse")
_CUSTOM_CALL = re.compile(r"custom_call\s*@([^\s(]+)\s*\(")
_MVJAX_NAME = re.compile(r"mvjax_[A-Za-z0-9_]*[A-Za-z0-9]")
FINETUNE_LORA_RANK = 8


# --- Models ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Models:
    """The configurations of every component, and the shapes the entries are lowered at."""

    name: str
    first: GPTConfig
    second: GPTConfig
    codec: encodec.EncodecConfig
    speaker: SpeakerEncoderConfig
    mbd: DiffusionConfig
    end_of_audio: int  # first stage (also the fine-tuning pad id)
    stage2_pad: int
    prompt_tokens: int = 40  # a first-stage prompt: text tokens of a short sentence
    decode_rows: int = 2  # utterances in a static batch
    codec_frames: int = 75  # one second at 75 frames/s
    finetune_ctx: int = 256


def _mbd_config(unet_kind: str, sample_rate: int) -> DiffusionConfig:
    from benchmarks.vocode import SCHEDULE, unet_config

    unet = dataclasses.asdict(unet_config(unet_kind))
    return DiffusionConfig.from_dict({"sample_rate": sample_rate, "n_bands": 4, "bands": [
        {"unet": unet, "schedule": SCHEDULE, "processor": {"use": False}} for _ in range(4)]})


def _random_layout_models(name: str) -> Models:
    """tiny / released: the shapes of benchmarks.common and convert_weights.random_checkpoints."""
    from convert_weights import random_checkpoints as rc

    meta = {"speaker_cond": True, "speaker_emb_size": SPEAKER_DIM}
    first = make_config(name)  # the first-stage benchmarks' model: the released layout at this size
    if name == "released":
        second = GPTConfig.from_checkpoint(rc.model_args(**RELEASED_SECOND_STAGE), meta)
    else:
        second = GPTConfig.from_checkpoint(dict(rc.SECOND_STAGE_ARGS, block_size=256), meta)
    codec = encodec.EncodecConfig()
    speaker = SpeakerEncoderConfig(num_layers=3, input_size=40, hidden_size=256, embedding_size=SPEAKER_DIM)
    mbd = _mbd_config("realistic" if name == "released" else "tiny", codec.sample_rate)
    # Fine-tuning at the whole block: the released one (2048) is the recipe's window, where training
    # attends in causal blocks (mvjax.train.model.causal_block).
    return Models(name, first, second, codec, speaker, mbd, end_of_audio=END_OF_AUDIO, stage2_pad=rc.CODEBOOK,
                  finetune_ctx=first.block_size, codec_frames=75 if name == "released" else 16)


def _fixture_models(fixtures: Path) -> Models:
    """The shapes of the shared reference fixtures' checkpoints (their weights are not used)."""
    from convert_weights.gpt import convert_gpt_checkpoint
    from convert_weights.mbd import convert_mbd_checkpoint
    from convert_weights.safe_pickle import OMEGACONF_ALLOWED, load_checkpoint
    from convert_weights.speaker import convert_speaker_checkpoint
    from mvjax.text.layout import TokenLayout

    first, _, tok1 = convert_gpt_checkpoint(load_checkpoint(fixtures / "stage1" / "first_stage.pt"))
    second, _, tok2 = convert_gpt_checkpoint(load_checkpoint(fixtures / "stage2" / "second_stage.pt"))
    speaker, _ = convert_speaker_checkpoint(load_checkpoint(fixtures / "speaker" / "speaker_encoder.pt"))
    mbd, _ = convert_mbd_checkpoint(load_checkpoint(fixtures / "mbd" / "mbd_comp_8.pt", OMEGACONF_ALLOWED))
    layout = TokenLayout.from_offsets(tok1.offset, tok2.offset)
    codec = encodec.EncodecConfig()  # the fixtures' codec is the released one, rebuilt from a recipe
    return Models("fixture", first, second, codec, speaker, DiffusionConfig.from_dict(mbd),
                  end_of_audio=layout.end_of_audio, stage2_pad=layout.stage2_pad,
                  finetune_ctx=min(first.block_size, 256), codec_frames=16)


def default_fixtures() -> Path:
    """Where the tests find the shared fixtures: ``$MVJAX_FIXTURES`` or ../shared/fixtures/metavoice_ref."""
    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("MVJAX_FIXTURES", repo.parent / "shared" / "fixtures" / "metavoice_ref"))


def build_models(name: str, fixtures: Optional[Path] = None) -> Models:
    if name == "fixture":
        return _fixture_models(fixtures or default_fixtures())
    return _random_layout_models(name)


# --- Entries ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """The kinds a lowering is made with: first-stage weights, KV cache, or a plain dtype."""

    weights: Optional[str] = None
    kv: Optional[str] = None
    dtype: Optional[str] = None

    @property
    def name(self) -> str:
        if self.dtype is not None:
            return self.dtype
        parts = ([f"w-{self.weights}"] if self.weights else []) + ([f"kv-{self.kv}"] if self.kv else [])
        return ".".join(parts)

    @property
    def kinds(self) -> set[str]:
        return {k for k in (self.weights, self.kv, self.dtype) if k is not None}


WEIGHTS_X_CACHE = tuple(Variant(weights=w, kv=k) for w in KINDS for k in KV_CACHE_KINDS)
CACHE_ONLY = tuple(Variant(kv=k) for k in KV_CACHE_KINDS)
FLOAT32 = (Variant(dtype="float32"),)
TRAIN_DTYPES = (Variant(dtype="float32"), Variant(dtype="bf16"))


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    variants: tuple[Variant, ...]
    # (builder, variant) -> (the product's jitted callable, positional args, keyword args) to ``.trace`` it with
    make: Callable[["Builder", Variant], tuple[Callable, tuple, dict]]


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


class Builder:
    """The product's objects for one config, made once per variant (abstract weights throughout)."""

    def __init__(self, models: Models):
        self.m = models
        self._cache: dict = {}

    def _memo(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # first stage
    def decode_params(self, weights: str):
        mode = None if weights == "float32" else weights
        return self._memo(("params1", weights), lambda: abstract_decode_params(self.m.first, mode))

    def decoder(self, v: Variant) -> FirstStageDecoder:
        return self._memo(("decoder", v.weights, v.kv), lambda: FirstStageDecoder(
            self.m.first, self.decode_params(v.weights), self.m.end_of_audio, kv_cache=v.kv))

    def engine(self, v: Variant) -> FirstStageEngine:
        """Default slots and steps; pieces of 16 prompt tokens (the engine's admission while others decode)."""
        weights = v.weights or "float32"
        return self._memo(("engine", weights, v.kv), lambda: FirstStageEngine(
            self.decoder(Variant(weights=weights, kv=v.kv)), steps=DEFAULT_STEPS, prefill_chunk=16))

    def paged_engine(self, v: Variant) -> FirstStageEngine:
        """:meth:`engine` with its KV cache in pages of 16 positions, enough for every slot's whole block."""
        weights = v.weights or "float32"
        return self._memo(("paged", weights, v.kv), lambda: FirstStageEngine(
            self.decoder(Variant(weights=weights, kv=v.kv)), steps=DEFAULT_STEPS, prefill_chunk=16, page_size=16,
            pages=2 * DEFAULT_SLOTS * -(-self.m.first.block_size // 16)))

    def slot_state(self, engine: FirstStageEngine):
        return jax.eval_shape(engine._empty_state)

    def one_request(self, engine: FirstStageEngine) -> tuple:
        """(length (1,), limit (1,), speaker (1, E) or None, key (1, 2), sampling of one row) of a request."""
        speaker = None if engine.speaker_dim is None else np.zeros((1, engine.speaker_dim), np.float32)
        return (np.array([self.m.prompt_tokens], np.int32), np.array([self.m.first.block_size], np.int32), speaker,
                np.zeros((1, 2), np.uint32), sampling_columns([SamplingConfig()], engine.vocab))


def _decode(b: Builder, v: Variant):
    m = b.m
    decoder = b.decoder(v)
    rows, plen = m.decode_rows, prompt_bucket(m.prompt_tokens, m.first.block_size)
    speaker = _sds((rows, m.first.speaker_emb_dim), jnp.float32)
    sampling = sampling_columns([SamplingConfig()] * rows, m.first.output_vocab_sizes[0])
    args = (decoder.params, _sds((rows, plen), jnp.int32), _sds((rows,), jnp.int32), _sds((rows,), jnp.int32),
            speaker, _sds((rows, 2), jnp.uint32), sampling)
    return decoder._function(plen, False, True), args, {}


def _engine_admit(b: Builder, v: Variant):
    engine = b.engine(v)
    plen = prompt_bucket(b.m.prompt_tokens, b.m.first.block_size)
    length, limit, speaker, key, sampling = b.one_request(engine)
    args = (engine.decoder.params, b.slot_state(engine), np.zeros((1, plen), np.int32), length, limit, speaker, key,
            sampling, np.int32(0))
    return engine._admit_fn(plen), args, {}


def _engine_generate(b: Builder, v: Variant, whole: bool):
    """Over every slot and the whole block (how the CPU kernel path runs), or over half the slots on
    the smallest window that holds the prompt (the window-copy path every other backend takes)."""
    engine = b.engine(v)
    if whole:
        window, rows = engine.block_size, engine.slots
    else:
        window, rows = cache_windows(prompt_bucket(b.m.prompt_tokens, engine.block_size), engine.block_size)[0], \
            max(1, engine.slots // 2)
    args = (engine.decoder.params, b.slot_state(engine), np.bool_(False))
    return engine._generate_fn(window, rows), args, {}


def _engine_generate_paged(b: Builder, v: Variant):
    """A decode call over every slot of an engine whose KV cache is in pages (each slot's whole block in
    16-position pages), attending through the page table."""
    engine = b.paged_engine(v)
    args = (engine.decoder.params, b.slot_state(engine), np.bool_(False))
    return engine._generate_fn(engine.block_size, engine.slots), args, {}


def _engine_prefill_piece(b: Builder, v: Variant):
    engine = b.engine(v)
    plen = prompt_bucket(b.m.prompt_tokens, engine.block_size)
    piece = engine._piece_shape(plen)
    window = cache_windows(max(plen, piece[1]), engine.block_size)[0]
    rows = max(1, engine.slots // 2)
    args = (engine.decoder.params, b.slot_state(engine), np.bool_(False), np.int32(0), np.int32(0))
    return engine._generate_fn(window, rows, piece), args, {}


def _engine_move(b: Builder, v: Variant):
    engine = b.engine(v)
    return engine._move_fn, (b.slot_state(engine), np.int32(1), np.int32(0)), {}


def _engine_reserve(b: Builder, v: Variant):
    engine = b.engine(v)
    length, limit, speaker, key, sampling = b.one_request(engine)
    args = (b.slot_state(engine), np.zeros((1, engine.block_size), np.int32), length, limit, speaker, key, sampling,
            np.int32(0))
    return engine._reserve_fn, args, {}


def _engine_free(b: Builder, v: Variant):
    engine = b.engine(v)
    return engine._free, (b.slot_state(engine), np.zeros((engine.slots,), bool)), {}


def _quantize_rows(b: Builder, v: Variant):
    d = b.m.first.n_embd
    return quantize_rows, (_sds((b.m.first.mlp_hidden, d), jnp.float32),), {}


INT4_GROUP = 64  # inputs a scale and minimum cover in the int4_matmul entry


@jax.jit
def _int4_products(entries, xs):
    """Each int4 matrix of ``entries`` times its activations through the decoder's int4 product
    (:func:`mvjax.kernels.int4.int4_matmul`: the Pallas kernel of the platform lowered for)."""
    return [int4_matmul(entry, x) for entry, x in zip(entries, xs)]


def _int4_matmul(b: Builder, v: Variant):
    """A first-stage layer's distinct weight shapes (out, in) as abstract int4 entries of group
    :data:`INT4_GROUP` (or the largest power of two below it that divides ``in``), each times (in,
    decode rows) float32 activations."""
    cfg = b.m.first
    d, hidden = cfg.n_embd, cfg.mlp_hidden
    shapes = dict.fromkeys([(3 * d, d), (d, d), (hidden, d), (d, hidden)])  # attention in/out, MLP in/out

    def entry(out, width):
        q4 = jax.eval_shape(pack_codes, _sds((out, width), jnp.uint8))
        group = next(g for g in (INT4_GROUP, 32, 16, 8, 2) if width % g == 0)  # a narrower one where 64 does not divide
        groups = width // group
        return {"q4": q4, "scale": _sds((out, groups), jnp.float16), "min": _sds((out, groups), jnp.float16)}

    entries = [entry(out, width) for out, width in shapes]
    xs = [_sds((width, b.m.decode_rows), jnp.float32) for _, width in shapes]
    return _int4_products, (entries, xs), {}


def _second_stage(b: Builder, v: Variant):
    cfg = b.m.second
    sampler = SecondStageSampler(cfg, gpt_shapes(cfg), pad_token=b.m.stage2_pad)
    rows = 1
    # The pass the scheduler runs: a window of the block's positions sampled (SecondStage.run).
    width = 64 if cfg.block_size > 64 else None
    starts = None if width is None else _sds((rows,), jnp.int32)
    args = (sampler.params, _sds((rows, len(cfg.vocab_sizes), cfg.block_size), jnp.int32),
            _sds((rows, cfg.speaker_emb_dim), jnp.float32), _sds((rows, 2), jnp.uint32), np.float32(1.0), starts)
    return sampler._jitted, args, {"top_k": DEFAULT_STAGE2_TOP_K, "width": width}


def _codec_params(b: Builder):
    return b._memo("codec_params", lambda: encodec.abstract_params(b.m.codec))


def _encodec_decode(b: Builder, v: Variant):
    cfg = b.m.codec
    codec = Codec(cfg, _codec_params(b))
    frames = diffusion_frames_bucket(b.m.codec_frames)
    return codec._decode_latent, (codec.params, _sds((1, cfg.dimension, frames), jnp.float32)), {}


def _encodec_encode(b: Builder, v: Variant):
    cfg = b.m.codec
    wav = _sds((1, cfg.channels, b.m.codec_frames * cfg.hop_length), jnp.float32)
    return codes_encoder(cfg), (_codec_params(b), wav), {}


def _stream_inputs(b: Builder, steady: bool):
    """(params, state, piece) of a stream of one row fed pieces of Codec.STREAM_PIECE frames."""
    cfg = b.m.codec
    params = {"decoder": _codec_params(b)["decoder"]}
    piece = _sds((1, cfg.dimension, Codec.STREAM_PIECE), jnp.float32)
    state = encodec.decode_stream_init(cfg, params, 1)
    if steady:
        state, _ = jax.eval_shape(functools.partial(encodec.decode_stream_step, cfg), params, state, piece)
    return params, state, piece


def _encodec_stream(b: Builder, v: Variant, steady: bool):
    params, state, piece = _stream_inputs(b, steady)
    return encodec._STREAM_STEP, (b.m.codec, params, state, piece), {}


def _encodec_stream_flush(b: Builder, v: Variant):
    cfg = b.m.codec
    params = {"decoder": _codec_params(b)["decoder"]}
    state = {"pending": _sds((1, cfg.dimension, encodec.stream_warmup_frames(cfg) - 1), jnp.float32)}
    return encodec._STREAM_FLUSH, (cfg, params, state), {}


def _mbd(b: Builder, v: Variant):
    cfg, codec = b.m.mbd, b.m.codec
    params = {f"band_{i}": unet_shapes(band.unet) for i, band in enumerate(cfg.bands)}
    model = MultiBandDiffusion(cfg, params)
    frames = diffusion_frames_bucket(b.m.codec_frames)
    shape = (1, codec.channels, frames * codec.hop_length)
    args = (model.params, _sds((1, codec.dimension, frames), jnp.float32),
            _sds((model.noise_count(),) + shape, jnp.float32))
    return model._jitted, args, {}


def _speaker_encoder(b: Builder, v: Variant):
    cfg = b.m.speaker
    mels = _sds((2, cfg.partial_frames, cfg.input_size), jnp.float32)
    return speaker_encoder.embed_partials, (speaker_encoder.abstract_params(cfg), mels), {}


def _trainer(b: Builder, v: Variant, mode: str) -> Trainer:
    dtype = {"float32": "float32", "bf16": "bfloat16"}[v.dtype]
    if mode == "last-block":
        spec = TrainSpec(last_n_blocks=1, compute_dtype=dtype)
    else:
        spec = TrainSpec(last_n_blocks=0, lora_rank=FINETUNE_LORA_RANK, lora_targets=("attn", "mlp"),
                         compute_dtype=dtype)
    params = b._memo("params1_train", lambda: gpt_shapes(b.m.first))
    return Trainer(b.m.first, params, spec, OptimConfig(), b.m.end_of_audio)


def _train_rows(b: Builder, accumulation: Optional[int]):
    """Rows (accumulation, batch 1, hierarchies, ctx + 1) and speaker embeddings; without accumulation
    the evaluation's (batch, ...) layout."""
    lead = () if accumulation is None else (accumulation,)
    cfg = b.m.first
    return (_sds(lead + (1, len(cfg.vocab_sizes), b.m.finetune_ctx + 1), jnp.int32),
            _sds(lead + (1, cfg.speaker_emb_dim), jnp.float32))


def _finetune_step(b: Builder, v: Variant, mode: str):
    trainer = _trainer(b, v, mode)
    state = jax.eval_shape(lambda t: new_state(trainer.tx, t), trainer.initial_trainable)
    rows, spk = _train_rows(b, 1)
    return trainer._step, (state, trainer.frozen, rows, spk), {}


def _finetune_eval(b: Builder, v: Variant):
    trainer = _trainer(b, v, "last-block")
    rows, spk = _train_rows(b, None)
    return trainer._eval, (trainer.frozen, trainer.initial_trainable, rows, spk, _sds((1,), jnp.float32)), {}


ENTRIES: tuple[Entry, ...] = (
    Entry("decode", WEIGHTS_X_CACHE, _decode),
    Entry("engine_admit", WEIGHTS_X_CACHE, _engine_admit),
    Entry("engine_generate", WEIGHTS_X_CACHE, functools.partial(_engine_generate, whole=True)),
    Entry("engine_generate_window", WEIGHTS_X_CACHE, functools.partial(_engine_generate, whole=False)),
    Entry("engine_prefill_piece", WEIGHTS_X_CACHE, _engine_prefill_piece),
    Entry("engine_generate_paged", WEIGHTS_X_CACHE, _engine_generate_paged),
    Entry("engine_move", CACHE_ONLY, _engine_move),
    Entry("engine_reserve", CACHE_ONLY, _engine_reserve),
    Entry("engine_free", CACHE_ONLY, _engine_free),
    Entry("quantize_rows", (Variant(dtype="int8"),), _quantize_rows),
    Entry("int4_matmul", (Variant(dtype="int4"),), _int4_matmul),
    Entry("second_stage", FLOAT32, _second_stage),
    Entry("encodec_decode", FLOAT32, _encodec_decode),
    Entry("encodec_encode", FLOAT32, _encodec_encode),
    Entry("encodec_stream_first", FLOAT32, functools.partial(_encodec_stream, steady=False)),
    Entry("encodec_stream_step", FLOAT32, functools.partial(_encodec_stream, steady=True)),
    Entry("encodec_stream_flush", FLOAT32, _encodec_stream_flush),
    Entry("mbd", FLOAT32, _mbd),
    Entry("speaker_encoder", FLOAT32, _speaker_encoder),
    Entry("finetune_last_block", TRAIN_DTYPES, functools.partial(_finetune_step, mode="last-block")),
    Entry("finetune_lora", TRAIN_DTYPES, functools.partial(_finetune_step, mode="lora")),
    Entry("finetune_eval", TRAIN_DTYPES, _finetune_eval),
)
ENTRY_NAMES = tuple(e.name for e in ENTRIES)


# --- Checking a lowered module ---------------------------------------------------------------------


def custom_call_targets(text: str) -> list[str]:
    """Every custom-call target of a lowered module's text, in order of first appearance."""
    return list(dict.fromkeys(_CUSTOM_CALL.findall(text)))


def pallas_kernel_names(text: str, platform: str) -> list[str]:
    """Names of the mvjax Pallas kernels in a lowered module: ``mvjax_*`` names on the lines of the
    platform's Pallas custom calls (TPU: their ``kernel_name``; GPU: the name inside the serialised
    kernel). A CPU FFI custom call named ``mvjax_...`` is not counted: it is no Pallas kernel."""
    targets = PALLAS_TARGETS[platform]
    found = set()
    for line in text.splitlines():
        called = _CUSTOM_CALL.search(line)
        if called and called.group(1) in targets:
            found.update(_MVJAX_NAME.findall(line))
    # Mosaic GPU also names the kernel's module after it (``<name>_mosaic_gpu``): one kernel, one name.
    return sorted(n for n in found if not any(n.startswith(other + "_") for other in found if other != n))


def unrunnable_calls(text: str, platform: str) -> list[str]:
    """Why the lowered module could not run on ``platform``: one reason per custom call it cannot run."""
    reasons = []
    for target in custom_call_targets(text):
        if target in PALLAS_TARGETS[platform] or target in GENERIC_TARGETS:
            continue
        if platform == "cuda" and target.startswith(CUDA_LIBRARY_PREFIXES):
            continue
        if "callback" in target:
            reasons.append(f"host callback @{target}")
        elif target.startswith("mvjax_"):
            reasons.append(f"custom call @{target} is a CPU FFI kernel (the trace chose it on a "
                           f"{jax.default_backend()} backend)")
        else:
            reasons.append(f"custom call @{target} has no known {platform} implementation")
    return reasons


@dataclasses.dataclass
class Result:
    entry: str
    platform: str
    variant: str
    ok: bool
    pallas: list[str]
    reason: str = ""

    def line(self) -> str:
        out = (f"lower entry={self.entry} platform={self.platform} variant={self.variant} "
               f"ok={'yes' if self.ok else 'no'} pallas={','.join(self.pallas) or 'none'}")
        if not self.ok:
            out += "\n# " + " ".join(self.reason.split())[:400]
        return out


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def lower_entry(builder: Builder, entry: Entry, variant: Variant, platforms: Iterable[str],
                dump: Optional[Path] = None) -> list[Result]:
    """Trace ``entry`` once (its product objects built for ``variant``) and lower it for each platform."""
    platforms = list(platforms)
    try:
        fn, args, kwargs = entry.make(builder, variant)
        traced = fn.trace(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported per line; the others still run
        return [Result(entry.name, p, variant.name, False, [], f"trace failed: {_short(exc)}") for p in platforms]
    results = []
    for platform in platforms:
        try:
            text = traced.lower(lowering_platforms=(platform,)).as_text()
        except Exception as exc:  # noqa: BLE001
            why = _short(exc)
            if "different from the lowering platform" in why:  # JAX's refusal of a callback into this process
                why = f"a host callback (pure_callback, io_callback, debug.print) cannot lower: {why}"
            results.append(Result(entry.name, platform, variant.name, False, [], f"lowering failed: {why}"))
            continue
        if dump is not None:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / f"{entry.name}.{platform}.{variant.name}.mlir").write_text(text)
        reasons = unrunnable_calls(text, platform)
        results.append(Result(entry.name, platform, variant.name, not reasons, pallas_kernel_names(text, platform),
                              "; ".join(reasons)))
    return results


def _csv(choices: Optional[Iterable[str]] = None):
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if choices is not None and v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices or ())}; got {value!r}")
        return items

    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, default="tiny")
    parser.add_argument("--platforms", type=_csv(PLATFORMS), default=list(PLATFORMS))
    parser.add_argument("--entries", type=_csv(ENTRY_NAMES), default=list(ENTRY_NAMES))
    parser.add_argument("--variants", type=_csv(VARIANT_KINDS), default=list(VARIANT_KINDS),
                        help="kinds to lower with: a variant runs when every kind in it is listed")
    parser.add_argument("--fixtures", type=Path, default=None, help="fixture directory (--config fixture)")
    parser.add_argument("--dump", type=Path, default=None, help="write each lowered module's text here")
    args = parser.parse_args(argv)

    apply_precision()  # the product's matmul policy, as TTS and the CLIs set it before tracing
    start = time.perf_counter()
    builder = Builder(build_models(args.config, args.fixtures))
    kinds = set(args.variants)
    failed = total = 0
    for entry in ENTRIES:
        if entry.name not in args.entries:
            continue
        for variant in entry.variants:
            if not variant.kinds <= kinds:
                continue
            for result in lower_entry(builder, entry, variant, args.platforms, args.dump):
                print(result.line(), flush=True)
                total += 1
                failed += not result.ok
    seconds = time.perf_counter() - start
    print(f"lowering config={args.config}: {total - failed} of {total} lowered ok in {seconds:.1f} s "
          f"(traced on {jax.default_backend()}, jax {jax.__version__})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
