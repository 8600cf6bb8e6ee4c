"""python -m mvjax.synthesize --model MODEL --text "..." --speaker REF.wav --out OUT.wav

Text + a reference voice -> speech, through the whole MetaVoice-1B pipeline (see
:mod:`mvjax.inference.pipeline`). ``MODEL`` is a converted directory, a directory of released
checkpoints (converted once into the cache) or a Hugging Face repo id. Batch runs read
``--text-file``: one text per line (outputs ``OUT_DIR/0000.wav``, ...) or a ``.csv`` with a
``text,speaker,out`` header (empty speaker/out cells fall back to ``--speaker`` and
``OUT_DIR/NNNN.wav``). ``--demo`` builds a small random model (no download) and runs the
whole pipeline in seconds: its output is noise, not speech.

Several processes (``--num-processes N --process-id I --coordinator HOST:PORT``, the ``JAX_*``
environment, or the tasks of a Slurm job / TPU pod, detected as ``jax.distributed`` does) each
take every N-th line of the text file and write their own outputs; inside a process, batches are
split over all local devices. That split is static and a process writes its outputs when its whole
share is done (a killed process loses its share, a rerun redoes everything): for large text sets
use ``python -m mvjax.batch`` instead, a resumable dataset job (results written as each row
finishes, a rerun skips what is done, a dead Ray worker's rows run again elsewhere) whose tokens
equal this command's for the same text, voice and seed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from mvjax.audio.io import OUTPUT_FORMATS
from mvjax.cli.common import exit_now, guarded
from mvjax.cli.sampling_flags import add_sampling_flags
from mvjax.core.compile_cache import enable_compilation_cache
from mvjax.core.errors import MvjaxError
from mvjax.core.parallel import initialize_distributed, process_share
from mvjax.core.precision import PrecisionError, resolve
from mvjax.inference.options import (
    BATCHING,
    DECODERS,
    DEFAULT_STEPS,
    StreamSettings,
    SynthesisError,
    SynthesisOptions,
)
from mvjax.text.tokenizer import TextError, normalize_text

DEMO_TEXT = "This is the mvjax demo. Its model has random weights, so what you hear is noise, not speech."
DEMO_MAX_NEW_TOKENS = 150  # the random demo model never ends the audio by itself: about 1 s per chunk


class UsageError(MvjaxError, ValueError):
    pass


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (so repeated in-process runs share one handler)."""

    def emit(self, record):
        print(f"mvjax: {record.getMessage()}", file=sys.stderr)


def _logger(quiet: bool) -> logging.Logger:
    """The ``mvjax`` logger only: libraries' INFO chatter stays off."""
    log = logging.getLogger("mvjax")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    logging.getLogger("mvjax.chunks").setLevel(logging.WARNING if quiet else logging.DEBUG)  # the per-chunk lines
    log.propagate = False
    return log


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mvjax.synthesize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--model", help="converted model directory, released-checkpoint directory, or hub repo id "
                                     "(e.g. metavoiceio/metavoice-1B-v0.1)")
    src.add_argument("--demo", action="store_true", help="use a small random model built on the fly (output is not speech)")
    inp = p.add_argument_group("input")
    inp.add_argument("--text", help="text to speak")
    inp.add_argument("--text-file", help="batch: one text per line, or a .csv with columns text,speaker,out")
    inp.add_argument("--speaker", help="reference voice audio (about 30 s; wav, flac, ogg, mp3, ...)")
    inp.add_argument("--speaker-embedding", help=".npy speaker embedding to use instead of audio")
    out = p.add_argument_group("output")
    out.add_argument("--out", help="output audio file (a directory for --text-file)")
    out.add_argument("--stream-to", metavar="-", help="instead of --out: write raw 16-bit little-endian mono PCM to "
                     "standard output as it is made (give '-'; the rate is printed to stderr), e.g. "
                     "| ffplay -f s16le -ar RATE -ac 1 -")
    out.add_argument("--stream-frames", type=int, default=StreamSettings().frames,
                     help="with --stream-to: audio every N codec frames (75 per second)")
    out.add_argument("--stream-lookahead", type=int, default=StreamSettings().lookahead,
                     help="with --stream-to: frames the second stage sees past those it sends (-1: whole chunks, "
                          "the codes of --out)")
    out.add_argument("--save-tokens", help=".npz with first_stage, all_codebooks, speaker_embedding "
                                           "(a directory for --text-file: one .npz per output)")
    smp = p.add_argument_group("sampling")
    add_sampling_flags(smp)
    defaults = SynthesisOptions()
    smp.add_argument("--max-new-tokens", type=int, help="first-stage tokens per chunk (default: until end of audio "
                                                          "or the block is full)")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--decoder", choices=DECODERS, default=defaults.decoder,
                     help="multi-band diffusion (default) or the plain EnCodec decoder (fast)")
    dec.add_argument("--no-enhance", action="store_true", help="skip DeepFilterNet3 (output stays at 24 kHz)")
    dec.add_argument("--no-long-form", action="store_true", help="do not split long texts into chunks")
    dec.add_argument("--quantize", choices=["int8", "int4", "bf16"],
                     help="first-stage weights: int8 (per output channel; faster on CPU, a quarter of the memory), "
                     "int4 (4-bit in groups of 64 inputs; about a seventh of the memory) "
                     "or bf16 (for GPU/TPU); default: as stored (float32 unless converted with --quantize)")
    dec.add_argument("--kv-cache", choices=["float32", "bf16", "int8"],
                     help="first-stage KV cache: float32 (default for float32 compute), bf16, or int8 (a scale per "
                          "head and position; a quarter of the bytes read per step at long windows)")
    dec.add_argument("--matmul-precision", choices=["highest", "high", "default"],
                     help="float32 matmul precision (default: $MVJAX_MATMUL_PRECISION or 'highest', the program "
                          "python -m mvjax.parity certifies; 'high'/'default' are faster on GPUs and TPUs)")
    dec.add_argument("--batch-size", default="8", help="utterances (chunks) per device per batch, or 'auto': the "
                                                       "largest each stage fits in free memory (throughput mode)")
    dec.add_argument("--batching", choices=BATCHING, default=defaults.batching,
                     help="first stage: engine = continuous batching, a chunk takes a slot as one frees up (one "
                          "engine per device); static = batches decoded to their longest chunk (default: engine)")
    dec.add_argument("--engine-steps", type=int, default=DEFAULT_STEPS,
                     help=f"first-stage tokens per engine call (default {DEFAULT_STEPS})")
    dec.add_argument("--kv-pages", type=int, default=defaults.kv_pages,
                     help="hold the engine's KV cache in a pool of this many pages per device, shared by the slots "
                          "(memory follows the tokens held; default: a whole block per slot, faster on CPU)")
    dec.add_argument("--kv-page-size", type=int, default=defaults.kv_page_size, help="KV-cache positions per page")
    par = p.add_argument_group("multi-process", "a static split of --text-file over processes; for large, "
                                "resumable jobs (and Ray clusters) use python -m mvjax.batch")
    par.add_argument("--coordinator", help="HOST:PORT of process 0 (jax.distributed)")
    par.add_argument("--num-processes", type=int)
    par.add_argument("--process-id", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-chunk log lines")
    return p


def _read_jobs(args) -> list[dict]:
    """[{text, speaker, out, tokens}] from --text or --text-file."""
    if bool(args.text is not None) == bool(args.text_file):
        if not args.demo or args.text_file:
            raise UsageError("give exactly one of --text and --text-file")
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise UsageError(f"text file not found: {path}")
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from None
        out_dir = Path(args.out)
        if out_dir.suffix.lower() in OUTPUT_FORMATS:
            raise UsageError(f"with --text-file, --out is a directory, not {out_dir}")
        jobs = []
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(io.StringIO(raw, newline=""))
            if not reader.fieldnames or "text" not in reader.fieldnames:
                raise UsageError(f"{path}: a .csv text file needs a header with a 'text' column (text,speaker,out)")
            for row_number, row in enumerate(reader):
                jobs.append({"text": row.get("text") or "", "speaker": (row.get("speaker") or "").strip() or None,
                             "out": (row.get("out") or "").strip() or None, "index": row_number,
                             "where": f"{path} row {row_number + 1}"})
        else:
            # Numbered by line (blank lines keep their number), so OUT_DIR/NNNN.wav is line NNNN + 1.
            jobs = [{"text": line, "speaker": None, "out": None, "index": n, "where": f"{path} line {n + 1}"}
                    for n, line in enumerate(raw.splitlines()) if line.strip()]
        if not jobs:
            raise UsageError(f"{path} holds no text")
        for job in jobs:
            job["out"] = Path(job["out"]) if job["out"] else out_dir / f"{job['index']:04d}.wav"
            if job["speaker"] and not Path(job["speaker"]).is_absolute():
                job["speaker"] = str(path.parent / job["speaker"]) if (path.parent / job["speaker"]).exists() else job["speaker"]
        return jobs
    text = DEMO_TEXT if args.text is None else args.text
    return [{"text": text, "speaker": None, "out": Path(args.out) if args.out else None, "index": 0, "where": "--text"}]


def _options(args) -> SynthesisOptions:
    """The synthesis options the flags ask for, checked by :class:`~mvjax.inference.options.SynthesisOptions`
    (the one check the library applies too) before anything loads; the process options here."""
    if args.num_processes is not None and args.num_processes < 1:
        raise UsageError("--num-processes must be >= 1")
    if args.process_id is not None and (args.process_id < 0 or (args.num_processes is not None
                                                                and args.process_id >= args.num_processes)):
        raise UsageError("--process-id must be >= 0 and below --num-processes")
    try:
        return SynthesisOptions.build(
            seed=args.seed, temperature=args.temperature, top_p=args.top_p, guidance_scale=args.guidance_scale,
            stage2_temperature=args.stage2_temperature, stage2_top_k=args.stage2_top_k,
            max_new_tokens=args.max_new_tokens, long_form=not args.no_long_form, batch_size=args.batch_size,
            batching=args.batching, engine_steps=args.engine_steps, kv_pages=args.kv_pages,
            kv_page_size=args.kv_page_size, decoder=args.decoder,
            enhance=not args.no_enhance, progress=not args.quiet and sys.stderr.isatty())
    except SynthesisError as exc:  # name the flag, not the field
        flag = f"--{exc.option.replace('_', '-')}" if exc.option else ""
        raise UsageError(flag + str(exc)[len(exc.option or ""):]) from None


def _check_outputs(jobs: list[dict], args) -> None:
    # Every file the run reads; nothing the run writes may be one of them.
    inputs = {Path(s).resolve() for s in [args.speaker, args.speaker_embedding, args.text_file]
                + [j["speaker"] for j in jobs] if s}
    seen = set()
    for job in jobs:
        out = job["out"]
        if out.suffix.lower() not in OUTPUT_FORMATS:
            raise UsageError(f"output {out} must end in one of {', '.join(sorted(OUTPUT_FORMATS))}")
        resolved = out.resolve()
        if resolved in inputs:
            raise UsageError(f"output {out} is an input (speaker reference or text file); refusing to overwrite it")
        if resolved in seen:
            raise UsageError(f"output {out} is named twice")
        seen.add(resolved)
        parent = out.parent
        batch_dir = bool(args.text_file) and parent == Path(args.out)
        if batch_dir and not parent.exists() and parent.parent.is_dir() and os.access(parent.parent, os.W_OK):
            continue  # the batch output directory itself may be new: created when the first file is written
        if not parent.is_dir():
            raise UsageError(f"output directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"output directory {parent} is not writable")
        if out.is_dir():
            raise UsageError(f"output {out} is a directory")
    if args.save_tokens:
        target = Path(args.save_tokens)
        where = target if args.text_file else target.parent
        if args.text_file and not where.is_dir():
            raise UsageError(f"with --text-file, --save-tokens must be an existing directory: {where}")
        if not where.is_dir() or not os.access(where, os.W_OK):
            raise UsageError(f"cannot write tokens to {target}: directory missing or not writable")
        outputs = {job["out"].resolve() for job in jobs}
        tokens_seen: dict[Path, Path] = {}
        for job in jobs:
            job["tokens"] = target / f"{job['out'].stem}.npz" if args.text_file else target
            if job["tokens"].suffix.lower() != ".npz":
                raise UsageError(f"--save-tokens {job['tokens']} must end in .npz")
            resolved = job["tokens"].resolve()
            if resolved in inputs or resolved in outputs:
                raise UsageError(f"--save-tokens {job['tokens']} is an input or an audio output; refusing to overwrite it")
            if resolved in tokens_seen:
                raise UsageError(f"outputs {tokens_seen[resolved]} and {job['out']} would both save tokens to "
                                 f"{job['tokens']}; give them different file names")
            if job["tokens"].is_dir():
                raise UsageError(f"--save-tokens {job['tokens']} is a directory")
            tokens_seen[resolved] = job["out"]


def _speaker_for(job, args, demo_voice):
    if job["speaker"]:
        spk = job["speaker"]
    elif args.speaker_embedding:
        spk = args.speaker_embedding
        if not Path(spk).is_file():
            raise UsageError(f"speaker embedding not found: {spk}")
        try:
            return np.load(spk).astype(np.float32)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read speaker embedding {spk}: {exc}") from None
    elif args.speaker:
        spk = args.speaker
    elif demo_voice is not None:
        return demo_voice
    else:
        raise UsageError("give --speaker (reference audio) or --speaker-embedding")
    if not Path(spk).is_file():
        raise UsageError(f"speaker audio not found: {spk}")
    return str(spk)


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.demo == bool(args.model):
        raise UsageError("give --model (or --demo for the random demo model)")
    if args.speaker and args.speaker_embedding:
        raise UsageError("give --speaker or --speaker-embedding, not both")
    if args.batch_size != "auto":
        try:
            args.batch_size = int(args.batch_size)
        except ValueError:
            raise UsageError(f"--batch-size must be a positive integer or 'auto', not {args.batch_size!r}") from None
        if args.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
    try:
        resolve(args.matmul_precision)
    except PrecisionError as exc:
        raise UsageError(str(exc)) from None
    options = _options(args)
    streaming = _streaming(args)
    jobs = _read_jobs(args)
    if streaming is None:
        _check_outputs(jobs, args)

    for job in jobs:  # cheap text checks before any model loads; a bad line is named
        try:
            normalized = normalize_text(job["text"])
        except TextError as exc:
            raise UsageError(f"{job['where']}: {exc}") from None
        if not normalized:
            raise UsageError(f"{job['where']}: the text is empty" if args.text_file else "text is empty")

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)  # flags, JAX_*, or Slurm/TPU pods
    # heavy (the model stack: flax, scipy, orbax): loaded only once the flags and texts are checked
    from mvjax.inference.pipeline import TTS
    from mvjax.inference.speaker import ShortReferenceWarning
    from mvjax.sources.demo import demo_model_dir, demo_speaker_audio

    log = _logger(args.quiet)
    enable_compilation_cache()
    demo_voice = None
    if args.demo:
        print("demo: a small model with random weights, built on the fly; the output is noise, not speech",
              file=sys.stderr)
        if options.enhance:  # DeepFilterNet3 would remove that noise and leave a near-silent file
            print("demo: DeepFilterNet3 enhancement skipped (it would filter the random model's noise away); "
                  "the output stays at 24 kHz", file=sys.stderr)
            options = dataclasses.replace(options, enhance=False)
        model = demo_model_dir()
        demo_voice = demo_speaker_audio()
        warnings.filterwarnings("ignore", category=ShortReferenceWarning)  # the demo voice is 4 s by design
        if options.max_new_tokens is None:
            options = dataclasses.replace(options, max_new_tokens=DEMO_MAX_NEW_TOKENS)
    else:
        model = args.model
    if streaming is not None:
        return _stream(TTS.load(model, log_fn=log.info, quantize=args.quantize, matmul_precision=args.matmul_precision,
                                kv_cache=args.kv_cache), jobs[0]["text"], _speaker_for(jobs[0], args, demo_voice),
                       options, streaming)
    share = process_share(jobs)
    if jax.process_count() > 1:
        log.info("process %d of %d: %d of %d texts", jax.process_index(), jax.process_count(), len(share), len(jobs))
    if not share:
        return 0
    speakers = [_speaker_for(job, args, demo_voice) for _, job in share]
    tts = TTS.load(model, log_fn=log.info, quantize=args.quantize, matmul_precision=args.matmul_precision,
                   kv_cache=args.kv_cache)

    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning) if args.quiet else None
            results = tts.synthesize([job["text"] for _, job in share], speakers, options=options,
                                     utterance_ids=[job["index"] for _, job in share])
    finally:
        tts.close()
    for (i, job), speech in zip(share, results):
        job["out"].parent.mkdir(exist_ok=True)  # a new batch output directory, made only once there is output
        speech.save(job["out"])
        if args.save_tokens:
            speech.save_tokens(job["tokens"])
        chunks = f", {len(speech.chunks)} chunks" if len(speech.chunks) > 1 else ""
        cut = " (speech cut short: a block filled)" if speech.truncated else ""
        print(f"wrote {job['out']} ({speech.duration:.2f} s at {speech.sample_rate} Hz{chunks}){cut}")
    if len(share) > 1:
        elapsed = time.perf_counter() - started
        audio = sum(s.duration for s in results)
        log.info("%d utterances in %.1f s: %.1f utterances/min, real-time factor %.2f", len(share), elapsed,
                 60 * len(share) / elapsed, elapsed / max(audio, 1e-9))
    return 0


def _streaming(args) -> Optional[StreamSettings]:
    """--stream-to's settings (None without it), checked before anything loads."""
    if args.stream_to is None:
        if not args.out:
            raise UsageError("give --out (or --stream-to - for raw PCM on standard output)")
        return None
    if args.stream_to != "-":
        raise UsageError("--stream-to takes '-' (standard output); use --out to write a file")
    if args.out or args.text_file or args.save_tokens or args.num_processes:
        raise UsageError("--stream-to - speaks one --text: no --out, --text-file, --save-tokens or --num-processes")
    try:
        lookahead = None if args.stream_lookahead is not None and args.stream_lookahead < 0 else args.stream_lookahead
        return StreamSettings(frames=args.stream_frames, lookahead=lookahead)
    except SynthesisError as exc:
        raise UsageError(f"--stream-{exc.option.replace('_', '-')}{str(exc)[len(exc.option or ''):]}") from None


def _stream(tts, text: str, speaker, options: SynthesisOptions, streaming: StreamSettings) -> int:
    """Speak ``text`` to standard output as raw PCM while it is made."""
    out = sys.stdout.buffer
    try:
        stream = tts.stream(text, speaker, options=options, streaming=streaming)
        print(f"streaming raw PCM: 16-bit little-endian, mono, {stream.sample_rate} Hz", file=sys.stderr)
        for piece in stream:
            out.write((np.clip(piece, -1, 1) * 32767).round().astype("<i2").tobytes())
            out.flush()
    except BrokenPipeError:  # the player went away: stop quietly
        return 0
    finally:
        tts.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return guarded(lambda: run(argv))


if __name__ == "__main__":
    exit_now(main())
