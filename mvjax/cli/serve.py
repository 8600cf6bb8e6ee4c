"""``python -m mvjax.serve``: the OpenAI-compatible speech server (FastAPI on uvicorn).

    python -m mvjax.serve --demo                       # a random model and a demo voice, to try it out
    python -m mvjax.serve --model models/metavoice-1b --voices voices/ --api-key "$KEY"

Binds to 127.0.0.1:8000 unless told otherwise. SIGTERM (or Ctrl-C) stops taking requests,
finishes the ones in flight, then exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from mvjax.audio.stream import supported_formats
from mvjax.cli.common import DefaultsHelpFormatter, exit_now, fail, guarded
from mvjax.core.compile_cache import enable_compilation_cache
from mvjax.core.errors import MvjaxError
from mvjax.inference.options import BATCHING, DECODERS
from mvjax.serve.settings import ServerSettings, default_format
from mvjax.serve.voices import VoiceLimits, VoiceRegistry

API_KEY_ENV = "MVJAX_API_KEY"
DEMO_VOICE = "demo"


def _parser() -> argparse.ArgumentParser:
    d = ServerSettings()
    p = argparse.ArgumentParser(prog="python -m mvjax.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="converted model directory, released-checkpoint directory, or hub repo id")
    src.add_argument("--demo", action="store_true", help="a small random model (speaks noise) with a demo voice")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server)")
    net.add_argument("--port", type=int, default=8000, help="port to listen on")
    net.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    net.add_argument("--public-metrics", action="store_true",
                     help="serve /metrics without the API key (by default it needs it when a key is set)")
    net.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                     help="allow browser calls from this origin (repeatable; CORS is off by default)")
    net.add_argument("--max-connections", type=int, default=None,
                     help="open connections uvicorn accepts before answering 503 (default: 2 x max-queue + 16)")
    work = p.add_argument_group("work")
    work.add_argument("--voices", type=Path, default=None, help="voice directory: loaded at start, uploads stored here")
    work.add_argument("--max-batch", type=int, default=d.max_batch,
                      help="text chunks synthesised together across requests (1 = one at a time)")
    work.add_argument("--batching", choices=BATCHING, default=d.batching,
                      help="engine: continuous batching, a request joins between decode calls (one engine per "
                           "device); static: batches decoded to their longest chunk")
    work.add_argument("--engine-steps", type=int, default=d.engine_steps,
                      help="first-stage tokens per decode call of the engine: how soon a new request joins")
    work.add_argument("--kv-pages", type=int, default=d.kv_pages,
                      help="hold the engine's KV cache in a pool of this many pages per device, shared by the slots "
                           "(memory follows the tokens held, so a larger --max-batch fits; default: a whole block "
                           "per slot, faster on CPU)")
    work.add_argument("--kv-page-size", type=int, default=d.kv_page_size, help="KV-cache positions per page")
    work.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_s * 1000,
                      help="a batch that is not full waits this long for more requests before it starts")
    work.add_argument("--max-queue", type=int, default=d.max_queue, help="speech requests admitted at once; more get 503")
    work.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds a speech request may take")
    work.add_argument("--max-new-tokens", type=int, default=None,
                      help="first-stage tokens per text chunk (default: as many as the block holds)")
    work.add_argument("--max-input-chars", type=int, default=d.max_input_chars,
                      help="characters of text one speech request may send")
    work.add_argument("--max-upload-mb", type=float, default=d.voice_limits.max_upload_bytes / 1e6,
                      help="largest voice recording an upload may send, in MB")
    work.add_argument("--decoder", choices=DECODERS, default=d.decoder, help="default decoder")
    work.add_argument("--no-enhance", action="store_true", help="no DeepFilterNet3 by default")
    work.add_argument("--response-format", choices=list(supported_formats()), default=default_format(),
                      help="audio format of a speech request that names none")
    work.add_argument("--quantize", choices=["int8", "int4", "bf16"], default=None,
                      help="first-stage weight storage (default: as stored)")
    work.add_argument("--kv-cache", choices=["float32", "bf16", "int8"], default=None,
                      help="first-stage KV cache storage (default float32)")
    work.add_argument("--warmup", action="store_true", help="before listening: synthesise once and compile every shape the engine can meet "
                           "(up to --max-new-tokens), so no request waits for a compilation")
    p.add_argument("--log-text", action="store_true", help="log request texts (off: only their length)")
    p.add_argument("--log-rounds", action="store_true",
                   help="log one line per scheduler round (chunks, tokens, stage-1 and streaming seconds)")
    p.add_argument("--quiet", action="store_true", help="log warnings and errors only (no request lines)")
    return p


def _logging(quiet: bool) -> None:
    """Our loggers at INFO (WARNING with --quiet); libraries' INFO chatter stays off."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("mvjax").setLevel(logging.WARNING if quiet else logging.INFO)


def demo_voice_embedding(tts, seed: int = 0):
    """The speaker embedding of the demo voice (:func:`mvjax.sources.demo.demo_speaker_audio`) under ``tts``.
    The demo voice is short by design, so no ShortReferenceWarning is raised about it (only here:
    a short recording from a user still warns)."""
    # heavy (the model stack): called with a model loaded; python -m mvjax.serve --help stays quick
    from mvjax.inference.speaker import ShortReferenceWarning
    from mvjax.sources.demo import demo_speaker_audio

    audio = demo_speaker_audio(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ShortReferenceWarning)
        return tts.speaker_embedding(audio)


def build(args, tts=None):
    """(tts, registry, settings) from the parsed arguments (``tts``: a model already loaded)."""
    from mvjax.inference.pipeline import TTS  # heavy (the model stack): loaded once the flags are checked

    enable_compilation_cache()
    log = logging.getLogger("mvjax")
    limits = VoiceLimits(max_upload_bytes=int(args.max_upload_mb * 1e6))
    settings = ServerSettings(
        model_name="metavoice-1b-demo" if args.demo else "metavoice-1b", max_batch=args.max_batch,
        max_queue=args.max_queue, batch_wait_s=args.batch_wait_ms / 1000, timeout_s=args.timeout,
        batching=args.batching, engine_steps=args.engine_steps, kv_pages=args.kv_pages,
        kv_page_size=args.kv_page_size,
        max_new_tokens=args.max_new_tokens, max_input_chars=args.max_input_chars, voice_limits=limits,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, cors_origins=tuple(args.cors_origin),
        public_metrics=args.public_metrics, log_text=args.log_text, log_rounds=args.log_rounds, decoder=args.decoder, enhance=not args.no_enhance,
        response_format=args.response_format,
    )
    if args.demo:
        from mvjax.sources.demo import demo_model_dir  # heavy: as TTS above

        model = demo_model_dir(log=log.info)
    else:
        model = args.model
    tts = tts or TTS.load(model, log_fn=log.info, quantize=args.quantize, kv_cache=args.kv_cache)
    encoder = tts.speaker_encoder  # voices need it; fail at start, not at the first upload
    registry = VoiceRegistry(args.voices, encoder.embed_file, limits, dims=tts.config1.speaker_emb_dim)
    if args.demo:
        registry.add_embedding(DEMO_VOICE, demo_voice_embedding(tts), builtin=True)
    if args.warmup and len(registry):
        voice = registry.list()[0]
        tts.synthesize("Warm up.", registry.get(voice.name), options=dataclasses.replace(settings.options, enhance=False))
    if args.warmup and settings.batching == "engine":
        # Every admit and generate shape the engine can meet, so no request waits for a compilation.
        engine = tts.first_stage.engine(settings.max_batch, settings.engine_steps, settings.options.paging)
        cap = settings.max_new_tokens
        count = engine.precompile(max_prompt=WARMUP_MAX_PROMPT,
                                  max_window=None if cap is None else WARMUP_MAX_PROMPT + cap + settings.engine_steps)
        log.info("warm-up: %d engine functions compiled", count)
    return tts, registry, dataclasses.replace(settings)


WARMUP_MAX_PROMPT = 128  # first-stage prompt tokens of the longest chunk the planner makes, with room


def run(args) -> int:
    # optional (mvjax[serve]: uvicorn, fastapi) and heavy: loaded once the flags are parsed
    import uvicorn

    from mvjax.serve.app import create_app

    if not 0 <= args.port < 65536:
        return fail(f"--port {args.port} is not a port number")
    if args.max_batch < 1 or args.max_queue < 1:
        return fail("--max-batch and --max-queue must be >= 1")
    if args.voices is not None and args.voices.exists() and not args.voices.is_dir():
        return fail(f"--voices {args.voices} is not a directory")
    _logging(args.quiet)
    try:
        tts, registry, settings = build(args)
    except ValueError as exc:
        raise MvjaxError(str(exc)) from None
    app = create_app(tts, registry, settings)
    connections = args.max_connections or 2 * settings.max_queue + 16
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                            limit_concurrency=connections, timeout_graceful_shutdown=settings.timeout_s,
                            access_log=False, server_header=False)
    server = uvicorn.Server(config)
    # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal under the handlers it found: these
    # make that a clean exit (status 0) once the requests in flight are finished.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    logging.getLogger("mvjax.serve").info("serving %s on http://%s:%d (max batch %d, queue %d)", settings.model_name,
                                          args.host, args.port, settings.max_batch, settings.max_queue)
    server.run()
    tts.close()
    return 0 if server.started else fail(f"could not listen on {args.host}:{args.port}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return guarded(lambda: run(args))


if __name__ == "__main__":
    exit_now(main())
