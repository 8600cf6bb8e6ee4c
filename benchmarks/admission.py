"""Stalls of running streams while the engine admits a request: whole-prompt prefill against chunked prefill.

    python -m benchmarks.admission                       # medium model, whole prefill and pieces of 4, 8, 16

``--running`` requests (long, never ending within the run) decode in an engine of ``--slots`` slots,
one token per call (``--steps 1``: every token's arrival at the host is seen). After ``--warm`` calls,
``--arrivals`` requests with prompts of ``--prompt`` tokens are submitted, one every ``--spacing``
calls. For every running request the benchmark records when each call handed it a token; the gap of
a token is the time since the previous one. ``median_step_s``: the median gap of calls with no
admission in progress; ``worst_gap_s``: the largest gap of a call during which a request was being
admitted (from its submission to its first token). ``ttft_s``: the arrivals' mean time from submission
to first token; ``busy_ratio``: the median gap during admissions over ``median_step_s`` (what a step
with a prefill piece costs; less sensitive than the worst gap to other load on the machine). Each
setting first runs the scenario once on its engine (compiling), then ``--repeats`` timed runs, the
settings interleaved run by run. One line per run and one ``run=median`` line per setting (the median
of each number), each printed on one line:

    admission config=<c> prefill_chunk=<none|P> slots=<s> steps=<n> prompt=<p> median_step_s=<x>
        worst_gap_s=<y> ratio=<y/x> busy_ratio=<b> ttft_s=<t> run=<i|median>
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp
import numpy as np

from benchmarks.decode import SPEAKER_DIM, make_config, random_params
from mvjax.inference.decode import FirstStageDecoder
from mvjax.inference.engine import EngineRequest, FirstStageEngine
from mvjax.inference.keys import utterance_keys
from mvjax.inference.options import SamplingConfig


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def scenario(engine: FirstStageEngine, args, vocab: int, seed: int) -> dict:
    """One run: returns the median step, the worst gap during admissions and the mean time to first token."""
    rng = np.random.default_rng(seed)
    keys = utterance_keys(seed, args.running + args.arrivals)
    sampling = SamplingConfig(guidance_scale=3.0, temperature=1.0, top_p=0.95)

    def request(i: int, length: int, new: int) -> EngineRequest:
        return EngineRequest(rng.integers(0, vocab, length).tolist(), keys[i],
                             rng.standard_normal(SPEAKER_DIM).astype(np.float32), sampling, new, tag=i)

    calls = args.warm + args.arrivals * args.spacing + args.tail
    for i in range(args.running):  # long enough to run through every call
        engine.submit(request(i, args.prompt, calls * engine.steps + 8))
    arrivals = {args.warm + k * args.spacing: args.running + k for k in range(args.arrivals)}
    last = {}  # running request -> time of its previous token
    submitted, first_token = {}, {}
    quiet, busy = [], []
    for call in range(calls):
        if call in arrivals:
            tag = arrivals[call]
            engine.submit(request(tag, args.prompt, 4 * engine.steps))
            submitted[tag] = time.perf_counter()
        admitting = any(tag not in first_token for tag in submitted)
        engine.step()
        now = time.perf_counter()
        for slot, (req, _) in engine.running.items():
            if req.tag in submitted and req.tag not in first_token and slot != getattr(engine._prefill, "slot", None):
                first_token[req.tag] = now
        for slot, (req, _) in engine.running.items():
            if req.tag >= args.running:
                continue
            if req.tag in last:
                (busy if admitting else quiet).append(now - last[req.tag])
            last[req.tag] = now
    engine.cancel(lambda r: True)
    engine.release()  # one engine's cache in memory at a time (1.6 GB at the medium shape)
    ttft = [first_token[t] - submitted[t] for t in submitted if t in first_token]
    median = float(np.median(quiet))
    return {"median_step_s": median, "worst_gap_s": float(max(busy)), "ratio": float(max(busy)) / median,
            "busy_ratio": float(np.median(busy)) / median, "ttft_s": float(np.mean(ttft)) if ttft else float("nan")}


def line(config: str, chunk: str, args, s: dict, run) -> str:
    return (f"admission config={config} prefill_chunk={chunk} slots={args.slots} steps={args.steps} "
            f"prompt={args.prompt} median_step_s={s['median_step_s']:.4f} worst_gap_s={s['worst_gap_s']:.4f} "
            f"ratio={s['ratio']:.2f} busy_ratio={s['busy_ratio']:.2f} ttft_s={s['ttft_s']:.4f} run={run}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="medium", help="tiny, medium or full (float32 weights)")
    p.add_argument("--chunks", default="none,4,8,16", help="prefill_chunk settings, comma-separated (none: whole)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--running", type=int, default=6, help="requests decoding when the arrivals come")
    p.add_argument("--arrivals", type=int, default=2)
    p.add_argument("--prompt", type=int, default=48, help="prompt tokens of every request")
    p.add_argument("--steps", type=int, default=1, help="engine tokens per call")
    p.add_argument("--warm", type=int, default=4, help="calls before the first arrival")
    p.add_argument("--spacing", type=int, default=10, help="calls between arrivals")
    p.add_argument("--tail", type=int, default=4, help="calls after the last arrival's spacing")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting, interleaved")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.running + 1 > args.slots or args.running < 1 or args.arrivals < 1:
        p.error("need at least one running request and a free slot for the arrivals")
    config = make_config(args.config)
    log(f"[{args.config}] building random weights ({config.n_layer} layers x {config.n_embd})")
    decoder = FirstStageDecoder(config, random_params(config, seed=0), end_of_audio=config.vocab_sizes[0] + 5,
                                dtype=jnp.float32, consume_params=True)
    engines = {}
    for chunk in [c.strip() for c in args.chunks.split(",") if c.strip()]:
        prefill_chunk = None if chunk == "none" else int(chunk)
        engines[chunk] = FirstStageEngine(decoder, slots=args.slots, steps=args.steps, prefill_chunk=prefill_chunk)
        t = time.perf_counter()
        scenario(engines[chunk], args, config.vocab_sizes[0], args.seed)  # compiles what the timed runs meet
        log(f"[{args.config}] prefill_chunk={chunk}: first run (compiling) {time.perf_counter() - t:.1f} s")
    runs = {chunk: [] for chunk in engines}
    for repeat in range(args.repeats):
        for chunk, engine in engines.items():
            s = scenario(engine, args, config.vocab_sizes[0], args.seed + 1 + repeat)
            runs[chunk].append(s)
            print(line(args.config, chunk, args, s, repeat + 1), flush=True)
    for chunk, results in runs.items():
        median = {name: float(np.median([r[name] for r in results])) for name in results[0]}
        print(line(args.config, chunk, args, median, "median"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
