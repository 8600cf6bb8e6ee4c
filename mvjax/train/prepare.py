"""Fine-tuning data preparation: listings of (audio, caption) -> token rows and speaker embeddings.

The steps follow the reference's data loader: each clip is read at any rate and channel count,
resampled to the codec's rate with julius' ``resample_frac`` semantics
(:mod:`mvjax.audio.resample`), *then* averaged to mono, encoded by EnCodec at 6 kbps; the speaker
embedding is computed from the original file; the row is built by :func:`mvjax.train.data.build_row`.

Codes and embeddings are cached once per (file content, weights) under
``cache_root()/finetune/`` (``codes/`` and ``speaker_embeddings/``), so preparing again, or
another split holding the same clips, computes nothing twice. A clip that cannot be used is
skipped with its reason (:data:`SKIP_REASONS`), never stopping the run.

Listings (:func:`mvjax.train.data.read_listing`): the reference's ``|``-separated CSV with an
``audio_files|captions`` header, or JSONL with one ``{"audio": ..., "text": ...}`` object per
line, chosen by extension. Relative paths resolve against the listing's own folder. A caption
that is a single word ending in ``.txt`` names a caption file, read as UTF-8 (a missing one
skips the row); any other caption is the text itself.

The module is long because every reason a clip is skipped is decided here, each before the work it
would waste: a cut WAV or a short clip from its header, a repeated row before its encoding, a clip
too long for the window before its samples are read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from tqdm import tqdm

from mvjax.audio.io import AudioError, header_seconds, load_audio, wav_shortfall
from mvjax.audio.resample import ResampleError, resample_frac
from mvjax.core.atomic import atomic_path
from mvjax.core.digest import file_sha256
from mvjax.core.errors import MvjaxError
from mvjax.core.paths import cache_root
from mvjax.text.tokenizer import TextError, Tokenizer, TokenizerSpec, normalize_text
from mvjax.train.data import FORMAT, VERSION, DataError, Entry, build_row, fits, write_manifest, write_split

# Why a clip is skipped: the key counted in the summary and the manifest, and what it means.
SKIP_REASONS = {
    "malformed row": "the listing's row has the wrong number of fields or is not a JSON object with audio and text",
    "missing audio": "the audio file does not exist",
    "missing caption file": "the caption names a .txt file that does not exist",
    "unreadable caption file": "the caption file is not UTF-8 text (or is over 1 MB)",
    "empty text": "the text is empty after normalisation",
    "unsupported text": "the text holds characters outside Latin-1",
    "unreadable audio": "the audio cannot be decoded, or its sample rate cannot be resampled",
    "truncated audio": "the WAV header promises more samples than the file holds (a cut copy or download)",
    "too short": "the clip is shorter than --min-seconds (default 0.5 s)",
    "duplicate": "the same audio (file content) and text (after normalisation) as an earlier row "
                 "(--keep-duplicates keeps every copy)",
    "silent": "the audio's peak is below -60 dBFS",
    "too long": "text + 2 tokens per codec frame + end of audio exceed ctx_window + 1 (--truncate-long keeps it cut)",
    "encoding failed": "EnCodec could not encode the audio (e.g. out of memory)",
    "speaker embedding failed": "the speaker encoder could not embed the audio",
}
SILENCE_PEAK = 10 ** (-60 / 20)
# Clips are read whole: anything longer than this is skipped from its header, before any allocation
# (a training clip is a sentence or a few; the released model's window holds ~13 s of audio).
MAX_CLIP_SECONDS = 600.0
# Shorter clips are skipped (a few codec frames teach nothing but the end of audio); --min-seconds.
MIN_CLIP_SECONDS = 0.5
BANDWIDTH_KBPS = 6.0
CODES_CACHE_VERSION = 1


# --- Codes and embeddings ----------------------------------------------------------------


def codes_encoder(cfg) -> Callable:
    """The jitted EnCodec encoding clips go through: ``(params, wav (B, channels, samples))`` -> codes
    (B, n_q, frames) at :data:`BANDWIDTH_KBPS` (also lowered by ``python -m benchmarks.lowering``).
    One compilation per distinct clip length (~1 s each on a CPU): exact, but a dataset of many
    lengths pays it per clip on its first preparation (later runs hit the cache)."""
    # heavy: python -m mvjax.finetune --help imports this module (its limits); jax loads at the first clip
    import jax

    from mvjax.nn import encodec

    return jax.jit(lambda p, wav: encodec.encode_wav(cfg, p, wav, bandwidth_kbps=BANDWIDTH_KBPS))


class ClipCoder:
    """EnCodec codes of clips (loaded lazily, cached by file content and codec weights).

    ``encoded`` counts the clips actually run through the codec in this process.
    """

    def __init__(self, model_dir: Path, encodec_digest: str, cache_dir: Optional[Path]):
        self.model_dir = Path(model_dir)
        self.encodec_digest = encodec_digest
        self.cache_dir = cache_dir
        self.encoded = 0  # clips run through the codec
        self.hits = 0  # clips served from the cache
        self._codec = None

    def _load(self):
        if self._codec is None:
            # heavy: python -m mvjax.finetune --help imports this module (its limits); jax loads at the first clip
            from mvjax.io.checkpoint import load_encodec

            cfg, params = load_encodec(self.model_dir)
            self._codec = (cfg, params, codes_encoder(cfg))
        return self._codec

    def cache_file(self, content_digest: str) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        key = json.dumps({"v": CODES_CACHE_VERSION, "encodec": self.encodec_digest, "kbps": BANDWIDTH_KBPS,
                          "resample": "julius-frac/24/0.945", "audio": content_digest}, sort_keys=True)
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()}.npy"

    def cached(self, content_digest: str) -> Optional[np.ndarray]:
        path = self.cache_file(content_digest)
        if path is None or not path.is_file():
            return None
        try:
            codes = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None  # damaged: recomputed and replaced
        if codes.ndim != 2 or codes.shape[0] < 2 or codes.shape[1] < 1 or codes.dtype.kind not in "iu":
            return None
        self.hits += 1
        return codes

    def audio(self, path: Path) -> np.ndarray:
        """The clip as the reference feeds the codec: resampled per channel to the codec rate, then mono."""
        cfg, _, _ = self._load()
        wav, rate = load_audio(path)
        if rate != cfg.sample_rate:
            wav = resample_frac(wav, rate, cfg.sample_rate)
        return wav.mean(axis=0, dtype=np.float32)

    def frames_for_seconds(self, seconds: float) -> int:
        """A lower bound of the frames ``seconds`` of audio become (resampling may add a sample)."""
        cfg, _, _ = self._load()
        return max(self.frames_for(int(seconds * cfg.sample_rate)) - 1, 0)

    def frames_for(self, samples: int) -> int:
        cfg, _, _ = self._load()
        return math.ceil(samples / cfg.hop_length)

    @property
    def sample_rate(self) -> int:
        return self._load()[0].sample_rate

    @property
    def seconds_per_frame(self) -> float:
        cfg, _, _ = self._load()
        return cfg.hop_length / cfg.sample_rate

    def encode(self, mono: np.ndarray, content_digest: str) -> np.ndarray:
        """codes (n_q, frames) int32 of 24 kHz mono audio; stored in the cache."""
        import jax.numpy as jnp  # heavy: see _load

        _, params, encode = self._load()
        codes = np.asarray(encode(params, jnp.asarray(mono[None, None])))[0].astype(np.int32)
        self.encoded += 1
        path = self.cache_file(content_digest)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path, suffix=".npy") as tmp:
                    np.save(tmp, codes)
            except OSError as exc:  # a read-only cache must not stop preparation
                warnings.warn(f"could not write the codes cache at {path.parent}: {exc}", stacklevel=2)
        return codes


# --- Splits --------------------------------------------------------------------------------


@dataclass
class PreparedSplit:
    tokens: list = field(default_factory=list)
    spk: list = field(default_factory=list)
    texts: list = field(default_factory=list)
    audio: list = field(default_factory=list)
    frames: list = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    duplicates: int = 0  # rows kept that repeat an earlier one (--keep-duplicates)
    from_files: int = 0

    def summary(self) -> dict:
        entry = {"rows": len(self.tokens), "skipped": dict(sorted(self.skipped.items()))}
        if self.truncated:
            entry["truncated"] = self.truncated
        if self.duplicates:
            entry["duplicates"] = self.duplicates
        return entry


@dataclass(frozen=True)
class RowLayout:
    """How rows are built for one first stage."""

    tokenizer: object  # mvjax.text.tokenizer.Tokenizer
    ctx_window: int
    pad_token: int
    codebook_size: int
    truncate_long: bool = False
    min_seconds: float = MIN_CLIP_SECONDS
    keep_duplicates: bool = False


def prepare_split(entries: Iterable[Entry], layout: RowLayout, coder: ClipCoder, embed: Callable[[Path], np.ndarray],
                  warn: Callable[[str], None] = print, progress: Optional[bool] = None, label: str = "clips") -> PreparedSplit:
    """Build the rows of one listing; unusable entries are reported through ``warn`` and counted, never raised.

    A row repeating an earlier kept one (same file content, same normalised text: the same token row
    and embedding) is skipped as ``duplicate`` unless ``layout.keep_duplicates``; then it is kept and counted.
    """
    out = PreparedSplit()
    entries = list(entries)
    kept: dict = {}  # (audio sha256, normalised text) -> where the first such row is
    for entry in tqdm(entries, desc=label, unit="clip", disable=None if progress is None else not progress):
        try:
            tokens, spk, frames, truncated, duplicate = _clip_row(entry, layout, coder, embed, kept)
        except _Skip as exc:
            out.skipped[exc.reason] += 1
            warn(f"skipped {entry.where}: {exc.reason} ({exc.detail})")
            continue
        out.tokens.append(tokens)
        out.spk.append(spk)
        out.texts.append(entry.text)
        out.audio.append(str(entry.audio))
        out.frames.append(frames)
        out.truncated += truncated
        out.duplicates += duplicate
        out.from_files += entry.caption_file is not None
    return out


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _clip_row(entry: Entry, layout: RowLayout, coder: ClipCoder, embed,
              kept: dict) -> tuple[np.ndarray, np.ndarray, int, bool, bool]:
    """(tokens, spk, frames, truncated, duplicate) of one entry; raises _Skip with the reason it cannot be used.

    ``kept`` maps (audio sha256, normalised text) to the first row kept with them; this row is added.
    """
    if entry.problem is not None:
        raise _Skip(*entry.problem)
    try:
        normalized = normalize_text(entry.text)
    except TextError as exc:
        raise _Skip("unsupported text", str(exc)) from None
    if not normalized:
        raise _Skip("empty text", "nothing to speak")
    text_ids = layout.tokenizer.encode(normalized)
    try:
        digest = file_sha256(entry.audio)
    except OSError as exc:
        raise _Skip("unreadable audio", str(exc).splitlines()[0]) from None
    key = (digest, normalized)
    if key in kept and not layout.keep_duplicates:
        raise _Skip("duplicate", f"the same audio and text as {kept[key]}")
    _check_wav_complete(entry.audio)
    seconds = header_seconds(entry.audio)
    if seconds is not None:
        _check_short(seconds, layout)
    codes = coder.cached(digest)
    if codes is None:
        if seconds is not None:  # refuse what cannot be used before reading the samples
            if seconds > MAX_CLIP_SECONDS:
                raise _Skip("too long", f"{seconds:.0f} s of audio; clips over {MAX_CLIP_SECONDS:.0f} s are not read")
            _check_length(len(text_ids), coder.frames_for_seconds(seconds), layout)
        try:
            mono = coder.audio(entry.audio)
        except (AudioError, ResampleError) as exc:
            raise _Skip("unreadable audio", str(exc).splitlines()[0]) from None
        if seconds is None:  # a format only ffmpeg reads: its length is known now
            _check_short(mono.size / coder.sample_rate, layout)
        peak = float(np.max(np.abs(mono))) if mono.size else 0.0
        if peak < SILENCE_PEAK:
            raise _Skip("silent", f"peak {20 * math.log10(peak):.0f} dBFS" if peak > 0 else "every sample is zero")
        _check_length(len(text_ids), coder.frames_for(mono.size), layout)  # before paying for the codec
        try:
            codes = coder.encode(mono, digest)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory on a huge clip: skip it, keep the run
            raise _Skip("encoding failed", _first_line(exc)) from None
    frames = int(codes.shape[1])
    if seconds is None:  # cached codes of a format only ffmpeg reads: the length within one codec frame
        _check_short(frames * coder.seconds_per_frame, layout)
    truncated = _check_length(len(text_ids), frames, layout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # training clips are short by nature: no short-reference warning
            spk = np.asarray(embed(entry.audio), np.float32)
    except Exception as exc:  # noqa: BLE001 - one clip the encoder cannot take must not stop the run
        raise _Skip("speaker embedding failed", _first_line(exc)) from None
    if not np.all(np.isfinite(spk)):
        raise _Skip("speaker embedding failed", "non-finite embedding")
    try:
        tokens = build_row(text_ids, codes, layout.ctx_window, layout.pad_token, layout.codebook_size)
    except DataError as exc:
        raise _Skip("unreadable audio", f"codes do not fit the first stage: {exc}") from None
    duplicate = key in kept
    kept.setdefault(key, entry.where)
    return tokens, spk, frames, truncated, duplicate


def _check_short(seconds: float, layout: RowLayout) -> None:
    if seconds < layout.min_seconds:
        raise _Skip("too short", f"{seconds:.2f} s of audio, less than --min-seconds {layout.min_seconds:g}")


def _check_wav_complete(path: Path) -> None:
    cut = wav_shortfall(path)
    if cut is not None:
        raise _Skip("truncated audio",
                    f"the WAV header promises {cut[0]:.2f} s of audio, the file holds {cut[1]:.2f} s")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, MvjaxError) else f"{type(exc).__name__}: {text}"


def _check_length(text_tokens: int, frames: int, layout: RowLayout) -> bool:
    """Whether the row must be cut; raises _Skip for a row too long to keep whole (without --truncate-long)."""
    if fits(text_tokens, frames, layout.ctx_window):
        return False
    if layout.truncate_long:
        return True
    raise _Skip("too long", f"{text_tokens} text tokens + 2 x {frames} frames + end of audio = "
                            f"{text_tokens + 2 * frames + 1} > ctx_window + 1 = {layout.ctx_window + 1}")


# --- A whole data directory -----------------------------------------------------------------


class PrepareError(MvjaxError, ValueError):
    """Arguments or a model that preparation cannot use."""


@dataclass(frozen=True)
class ModelFacts:
    """What preparation needs from a converted model (configs and digests; no weights are loaded)."""

    model_dir: Path
    tokenizer: object
    block_size: int
    pad_token: int
    codebook_size: int
    speaker_emb_dim: int
    digests: dict  # component -> params_sha256


def model_facts(model_dir: str | os.PathLike) -> ModelFacts:
    """Read the first stage's config and tokenizer, the codec's and speaker encoder's sizes, and the digests."""
    # heavy (jax, orbax): python -m mvjax.finetune --help imports this module for its limits
    from mvjax.io.checkpoint import (
        ModelDirError,
        component_config,
        gpt_stage_config,
        model_components,
        read_manifest,
    )

    model_dir = Path(model_dir)
    needed = ("first_stage", "encodec", "speaker_encoder")
    model_components(model_dir, required=needed)
    manifest = read_manifest(model_dir)
    try:
        stage = gpt_stage_config(model_dir, "first_stage")
        tokenizer = Tokenizer(TokenizerSpec.from_json_file(model_dir / "first_stage" / "tokenizer.json"))
        codec = component_config(model_dir, "encodec")
        speaker = component_config(model_dir, "speaker_encoder")
        bins, emb = int(codec["bins"]), int(speaker["embedding_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelDirError(f"{model_dir}: cannot read a component's config ({type(exc).__name__}: {exc})") from None
    pad = tokenizer.offset - 1
    codebook_size = pad // 2
    if pad < 2 or pad % 2:
        raise ModelDirError(f"{model_dir}: the first stage's text offset {tokenizer.offset} does not follow "
                            "two codebooks and an end-of-audio id")
    if bins != codebook_size:
        raise ModelDirError(f"{model_dir}: the codec has {bins} codes per codebook, the first stage {codebook_size}")
    if stage.speaker_emb_dim is not None and stage.speaker_emb_dim != emb:
        raise ModelDirError(f"{model_dir}: the speaker encoder gives {emb} values, the first stage takes "
                            f"{stage.speaker_emb_dim}")
    digests = {name: manifest["components"][name].get("params_sha256", "") for name in needed}
    return ModelFacts(model_dir, tokenizer, stage.block_size, pad, codebook_size, emb, digests)


def check_ctx_window(ctx_window: Optional[int], block_size: int) -> int:
    """The context window to build rows for: ``block_size`` by default; even, positive, at most the block."""
    if ctx_window is None:
        ctx_window = block_size
    if isinstance(ctx_window, bool) or int(ctx_window) < 2 or int(ctx_window) % 2:
        raise PrepareError(f"--ctx-window must be a positive even number, got {ctx_window}")
    if int(ctx_window) > block_size:
        raise PrepareError(f"--ctx-window {ctx_window} exceeds the first stage's block size {block_size}")
    return int(ctx_window)


def check_min_seconds(min_seconds: float) -> float:
    """The shortest clip kept, in seconds: finite, at least 0, below :data:`MAX_CLIP_SECONDS`."""
    if isinstance(min_seconds, bool) or not math.isfinite(min_seconds) or not 0 <= min_seconds < MAX_CLIP_SECONDS:
        raise PrepareError(f"--min-seconds must be a number from 0 to below {MAX_CLIP_SECONDS:g}, got {min_seconds}")
    return float(min_seconds)


def prepare_data(model_dir: str | os.PathLike, listings: dict[str, list[Entry]], out_dir: str | os.PathLike,
                 ctx_window: Optional[int] = None, truncate_long: bool = False, log: Callable[[str], None] = print,
                 warn: Optional[Callable[[str], None]] = None, progress: Optional[bool] = None,
                 cache_dir: Optional[str | os.PathLike] = "default", min_seconds: float = MIN_CLIP_SECONDS,
                 keep_duplicates: bool = False) -> dict:
    """Build every split of ``listings`` (name -> entries) into the existing directory ``out_dir``.

    Writes ``<split>.npz`` and ``manifest.json`` (:mod:`mvjax.train.data`); returns the manifest.
    ``log`` gets progress notes, ``warn`` (default: ``log``) each skipped clip and each split's summary.
    ``cache_dir``: where codes and embeddings are kept (``"default"``: ``cache_root()/finetune``;
    None: no cache). A split left with no rows is an error (nothing is written for it then).
    Clips shorter than ``min_seconds`` are skipped; repeated rows too unless ``keep_duplicates``.
    """
    from mvjax.inference.speaker import SpeakerEncoder  # heavy: see model_facts

    warn = log if warn is None else warn
    facts = model_facts(model_dir)
    ctx = check_ctx_window(ctx_window, facts.block_size)
    min_seconds = check_min_seconds(min_seconds)
    root = cache_root() / "finetune" if cache_dir == "default" else None if cache_dir is None else Path(cache_dir)
    coder = ClipCoder(facts.model_dir, facts.digests["encodec"], None if root is None else root / "codes")
    encoder = SpeakerEncoder.load(facts.model_dir, cache_dir=None if root is None else root / "speaker_embeddings")
    layout = RowLayout(facts.tokenizer, ctx, facts.pad_token, facts.codebook_size, truncate_long, min_seconds,
                       keep_duplicates)
    summaries, built = {}, {}
    for name, entries in listings.items():
        split = prepare_split(entries, layout, coder, encoder.embed_file, warn=warn, progress=progress, label=name)
        summaries[name] = split.summary()
        skipped = sum(split.skipped.values())
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(split.skipped.items()))
        warn(f"{name}: {len(split.tokens)} rows, {skipped} skipped" + (f" ({detail})" if detail else "")
            + (f", {split.truncated} cut to the window" if split.truncated else "")
            + (f", {split.duplicates} duplicate(s) kept" if split.duplicates else ""))
        log(f"{name}: {split.from_files} captions read from .txt files, "
            f"{len(split.tokens) - split.from_files} used as text")
        if not split.tokens:
            raise PrepareError(f"the {name} split has no usable clips ({skipped} skipped); see the reasons above")
        built[name] = split
    for name, split in built.items():
        write_split(Path(out_dir) / f"{name}.npz", np.stack(split.tokens), np.stack(split.spk),
                    split.texts, split.audio, split.frames)
    log(f"EnCodec: {coder.encoded} clip(s) encoded, {coder.hits} from the cache")
    manifest = {
        "format": FORMAT, "version": VERSION, "model": str(facts.model_dir.absolute()),
        "first_stage_sha256": facts.digests["first_stage"], "encodec_sha256": facts.digests["encodec"],
        "speaker_encoder_sha256": facts.digests["speaker_encoder"], "ctx_window": ctx,
        "pad_token": facts.pad_token, "codebook_size": facts.codebook_size,
        "speaker_emb_dim": facts.speaker_emb_dim, "splits": summaries,
    }
    write_manifest(out_dir, manifest)
    return manifest
