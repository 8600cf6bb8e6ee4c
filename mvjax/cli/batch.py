"""python -m mvjax.batch LISTING --out DIR (--model MODEL | --demo) [--voices DIR] [--ray [--workers N]]

A dataset job: every row of a JSONL or CSV listing (``id``, ``text``, ``voice``; optional ``seed``,
``temperature``, ``top_p``, ``top_k``, ``guidance_scale``) spoken into ``DIR/<id>.wav`` (or
``--format flac|ogg``), with ``DIR/results.jsonl`` (one line per id: status ``ok`` or ``error``, the
file, audio and wall seconds, the seed, a digest of row + options + model, the error) and
``DIR/job.json``. A voice is a name in ``--voices DIR`` (the speech server's voice directory:
``<name>.npz`` embeddings or audio files) or an audio file path relative to the listing. The whole
listing is checked before any work starts (duplicate ids, unknown voices, bad fields: one line,
exit status 1).

Resumable: run the same command again and only rows that are not done are synthesised (failed
rows, rows whose settings changed, rows whose file is gone); a killed job loses only the rows it
was working on. A row that fails twice the same way is recorded as an error and the job goes on.
Exit status 0 when every row is ``ok``, 1 otherwise.

Without ``--ray`` the job runs in this process on every local device, rows batched through the
continuous-batching engine. ``--ray`` runs it on Ray Data (``pip install 'mvjax[scale]'``): a local
Ray cluster, or the one at ``--ray-address`` / ``$RAY_ADDRESS``; ``--workers`` actors each load the
model once on ``--devices-per-worker`` GPUs (CPUs on a cluster without accelerators); a worker that
dies has its rows run again. A row's tokens are the same in either mode, on any worker, and equal
``python -m mvjax.synthesize --text TEXT --speaker VOICE --seed SEED``'s.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from mvjax.audio.io import OUTPUT_FORMATS
from mvjax.batchjob import job as J
from mvjax.batchjob.listing import ListingLimits
from mvjax.batchjob.runners import LocalRunner, RayRunner
from mvjax.batchjob.worker import DEMO_MODEL, JobSettings
from mvjax.cli.common import DefaultsHelpFormatter, exit_now, fail, guarded
from mvjax.cli.sampling_flags import add_sampling_flags
from mvjax.cli.synthesize import DEMO_MAX_NEW_TOKENS, UsageError, _logger
from mvjax.core.precision import PrecisionError, resolve
from mvjax.inference.options import BATCHING, DECODERS, DEFAULT_STEPS, SynthesisError, SynthesisOptions

FORMATS = tuple(s.lstrip(".") for s in OUTPUT_FORMATS)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mvjax.batch", description=" ".join(__doc__.split("\n\n")[1:3]),
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("listing", type=Path, help="JSONL (one JSON object per line) or .csv listing of the rows")
    p.add_argument("--out", type=Path, required=True, help="output directory (created; reused by a rerun)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="converted model directory, released-checkpoint directory, or hub repo id")
    src.add_argument("--demo", action="store_true", help="the small random demo model (speaks noise) and its voice "
                                                         "'demo'")
    p.add_argument("--voices", type=Path, default=None, help="voice directory (as the speech server's --voices)")
    p.add_argument("--format", choices=FORMATS, default="wav", help="audio file format")
    p.add_argument("--save-tokens", action="store_true", help="also DIR/<id>.npz with the row's tokens (as "
                                                             "python -m mvjax.synthesize --save-tokens writes)")
    smp = p.add_argument_group("sampling (a row's own fields override these)")
    add_sampling_flags(smp, seed_help="a row's seed when it gives none (its tokens equal python -m mvjax.synthesize "
                                      "--seed's)")
    defaults = SynthesisOptions()
    smp.add_argument("--max-new-tokens", type=int, default=None,
                     help=f"first-stage tokens per chunk (default: until end of audio; --demo: {DEMO_MAX_NEW_TOKENS})")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--decoder", choices=DECODERS, default=defaults.decoder,
                     help="multi-band diffusion or the plain EnCodec decoder (fast)")
    dec.add_argument("--no-enhance", action="store_true", help="skip DeepFilterNet3 (output stays at 24 kHz)")
    dec.add_argument("--no-long-form", action="store_true", help="do not split long texts into chunks")
    dec.add_argument("--quantize", choices=["int8", "int4", "bf16"], default=None, help="first-stage weight storage")
    dec.add_argument("--kv-cache", choices=["float32", "bf16", "int8"], default=None, help="first-stage KV cache")
    dec.add_argument("--matmul-precision", choices=["highest", "high", "default"], default=None,
                     help="float32 matmul precision (default: $MVJAX_MATMUL_PRECISION or 'highest')")
    dec.add_argument("--batch-size", type=int, default=defaults.batch_size, help="engine slots per device")
    dec.add_argument("--batching", choices=BATCHING, default=defaults.batching, help="first-stage scheduling")
    dec.add_argument("--engine-steps", type=int, default=DEFAULT_STEPS, help="first-stage tokens per engine call")
    ray = p.add_argument_group("Ray (pip install 'mvjax[scale]')")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data (a local cluster unless --ray-address)")
    ray.add_argument("--ray-address", default=None, help="a running Ray cluster (implies --ray; 'auto': the one "
                                                         "this machine belongs to)")
    ray.add_argument("--workers", type=int, default=2, help="actors, each with its own copy of the model")
    ray.add_argument("--devices-per-worker", type=int, default=1,
                     help="GPUs (or TPU chips; CPUs on a cluster without accelerators) per actor")
    ray.add_argument("--rows-per-task", type=int, default=None,
                     help="rows sent to an actor at a time (default: twice its engine slots, fewer when the "
                          "job is small, so every worker gets rows); a dead worker's task is run again whole")
    lim = p.add_argument_group("limits (the listing is untrusted input)")
    lim.add_argument("--max-listing-mb", type=float, default=ListingLimits.max_bytes / 2**20)
    lim.add_argument("--max-rows", type=int, default=ListingLimits.max_rows)
    lim.add_argument("--max-text-chars", type=int, default=ListingLimits.max_text_chars)
    p.add_argument("--quiet", action="store_true", help="no progress bar, log lines or summary (errors only)")
    return p


def _settings(args) -> JobSettings:
    for flag in ("batch_size", "workers", "devices_per_worker", "max_rows", "max_text_chars"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.rows_per_task is not None and args.rows_per_task < 1:
        raise UsageError("--rows-per-task must be >= 1")
    if args.max_listing_mb <= 0:
        raise UsageError("--max-listing-mb must be > 0")
    try:
        resolve(args.matmul_precision)
    except PrecisionError as exc:
        raise UsageError(str(exc)) from None
    max_new_tokens = args.max_new_tokens
    if args.demo and max_new_tokens is None:
        max_new_tokens = DEMO_MAX_NEW_TOKENS  # as python -m mvjax.synthesize --demo: the random model never stops
    try:
        options = SynthesisOptions.build(
            seed=args.seed, temperature=args.temperature, top_p=args.top_p, guidance_scale=args.guidance_scale,
            stage2_temperature=args.stage2_temperature, stage2_top_k=args.stage2_top_k, max_new_tokens=max_new_tokens,
            long_form=not args.no_long_form, batch_size=args.batch_size, batching=args.batching,
            engine_steps=args.engine_steps, decoder=args.decoder, enhance=not (args.no_enhance or args.demo))
    except SynthesisError as exc:
        flag = f"--{exc.option.replace('_', '-')}" if exc.option else ""
        raise UsageError(flag + str(exc)[len(exc.option or ""):]) from None
    return JobSettings(options, args.format, args.save_tokens, args.quantize, args.kv_cache, args.matmul_precision)


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = _settings(args)
    limits = ListingLimits(int(args.max_listing_mb * 2**20), args.max_rows, args.max_text_chars)
    log = _logger(args.quiet)
    logging.getLogger("mvjax.chunks").setLevel(logging.WARNING)  # a line per chunk: too many for a dataset

    model = DEMO_MODEL if args.demo else args.model
    if args.demo:
        print("demo: a small model with random weights; the output is noise, not speech (no enhancement)",
              file=sys.stderr)
    plan = J.plan(args.listing, args.out, model, settings, args.voices, limits, log=log.info)
    pending = plan.pending
    use_ray = args.ray or args.ray_address is not None
    log.info("%d rows: %d done before (skipped), %d to do%s", len(plan.rows), len(plan.done), len(pending),
             f" on Ray ({args.workers} workers)" if use_ray and pending else "")
    summary = J.Summary(len(plan.rows), len(plan.done))
    if pending:
        runner = _runner(args, model, settings, plan, use_ray)
        try:
            summary = J.run(plan, runner, progress=not args.quiet and sys.stderr.isatty())
        finally:
            runner.close()
    if not args.quiet:
        print(_summary_line(summary), file=sys.stderr)
    if summary.errors:
        return fail(f"{summary.errors} of {summary.rows} rows failed; their reasons are in {args.out / J.RESULTS}")
    return 0


def _runner(args, model: str, settings: JobSettings, plan, use_ray: bool):
    if not use_ray:
        return LocalRunner(model, settings, plan.model_digest)
    # Twice a worker's slots keeps its engine full across a task's tail; a small job is split so that
    # every worker gets a share.
    rows_per_task = args.rows_per_task or min(2 * settings.options.batch_size * args.devices_per_worker,
                                              max(1, math.ceil(len(plan.pending) / args.workers)))
    return RayRunner(model, settings, plan.model_digest, args.ray_address, args.workers, args.devices_per_worker,
                     rows_per_task)


def _summary_line(s) -> str:
    done = s.ok + s.skipped
    rate = f", {60 * s.ok / s.seconds:.1f} rows/min" if s.seconds > 0 and s.ok else ""
    return (f"batch: {s.rows} rows: {done} ok ({s.skipped} done before), {s.errors} failed; "
            f"{s.audio_seconds / 3600:.3f} h of audio made in {s.seconds:.1f} s{rate}")


def main(argv: list[str] | None = None) -> int:
    return guarded(lambda: run(argv))


if __name__ == "__main__":
    exit_now(main())
