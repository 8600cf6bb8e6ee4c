"""First-stage scheduling under load: one-at-a-time, static batches and the continuous-batching engine.

    python -m benchmarks.engine --quick                 # medium model, a few minutes
    python -m benchmarks.engine                         # medium, then the released shape with int8 weights

A bounded, open-loop load: ``--requests`` utterances arrive as a Poisson process (``--rate``
per second, fixed seed), each a random prompt of 8-48 text tokens and a mixed length of
first-stage tokens (``--min-tokens`` .. ``--max-tokens``, longer prompts longer; end of
audio is set outside the vocabulary, so each utterance runs to its length).
The same arrivals are served three ways in one run, ``--concurrency`` utterances at most in
flight:

* ``one``: one utterance at a time, in arrival order (:meth:`FirstStageDecoder.generate`, batch 1);
* ``static``: the utterances waiting when a batch starts (up to ``--concurrency``) are decoded
  as one batch until its longest is done (the rows padded to a power of two);
* ``engine``: :class:`mvjax.inference.engine.FirstStageEngine` with ``--concurrency`` slots and
  ``--steps`` tokens per call: an arrival takes a free slot at the next call. With several local
  devices (e.g. ``XLA_FLAGS=--xla_force_host_platform_device_count=4``) it is
  :class:`mvjax.inference.engines.DeviceEngines`, one engine per device with ``--concurrency``
  slots in all (the other modes run on the first device), and after the timed runs every
  request's tokens are checked against one engine on one device:

    engine-devices config=<c> devices=<n> requests=<r> tokens_equal=<yes|no>

Each mode first compiles every shape its timed run can meet (no mode is charged for compilation);
latency is retirement time minus arrival time; throughput is utterances over the time from the
first arrival to the last retirement. Each mode prints one machine-readable line:

    engine config=<c> mode=<one|static|engine> concurrency=<n> utt_per_min=<x> p50_s=<y> p95_s=<z> tokens_per_s=<t> kv_cache=<k> row_use=<u>

With ``--repeats N`` each mode's timed run is repeated N times, the modes interleaved run by
run (compiled once); each line then ends ``run=<i>``, and one ``run=median`` line per mode gives
the median of each number over the runs. On a machine whose speed drifts from minute to minute,
compare the medians (and the per-run ratios the log prints), not two single runs.

``row_use``: tokens generated per row-step computed (a static batch computes every padded row
until its longest is done; the engine's calls compute their slots until the call ends). When
steps cost the same in both modes, utterances/min of the engine over static cannot exceed
roughly engine row_use / static row_use: the headroom a workload's length mix leaves.

Then one long utterance (``--long-tokens``, default 1,500 new tokens: ~10 s of speech) is
decoded alone (batch 1, guidance on) with each KV cache kind (``--kv-caches``), compiled first;
its tokens/s is averaged over the whole utterance, so the long-window steps count as they
would in real use:

    decode config=<c> kv_cache=<k> tokens=<n> tokens_per_s=<x>
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode import END_OF_AUDIO, SPEAKER_DIM, make_config, random_params
from mvjax.core.parallel import local_mesh
from mvjax.inference.decode import (
    FirstStageDecoder,
    next_pow2,
    prompt_bucket,
)
from mvjax.inference.engine import DEFAULT_PREFILL_CHUNK, EngineRequest, FirstStageEngine
from mvjax.inference.engines import DeviceEngines
from mvjax.inference.keys import utterance_keys
from mvjax.inference.options import DEFAULT_STEPS, SamplingConfig
from mvjax.nn.kv_cache import KV_CACHE_KINDS


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def workload(n: int, rate: float, min_tokens: int, max_tokens: int, vocab: int, seed: int) -> list[dict]:
    """``n`` arrivals: time (s from the start), prompt, length in new tokens, speaker, key, sampling."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n)) - 1.0 / rate if rate > 0 else np.zeros(n)
    keys = utterance_keys(seed, n)
    jobs = []
    for i in range(n):
        plen = int(rng.integers(8, 49))
        share = (plen - 8) / 40  # longer prompts speak longer, with spread
        tokens = int(np.clip(min_tokens + (max_tokens - min_tokens) * (0.6 * share + 0.4 * rng.random()),
                             min_tokens, max_tokens))
        jobs.append({
            "at": float(max(arrivals[i], 0.0)),
            "prompt": rng.integers(END_OF_AUDIO + 1, vocab, size=plen).tolist(),
            "tokens": tokens,
            "speaker": rng.standard_normal(SPEAKER_DIM).astype(np.float32),
            "key": keys[i],
            "sampling": SamplingConfig(guidance_scale=3.0, temperature=1.0, top_p=0.95),
        })
    return jobs


def serve_one(decoder, jobs, concurrency, steps, t0):
    done = {}
    for i, job in enumerate(jobs):
        _wait_until(t0 + job["at"])
        result = decoder.generate([job["prompt"]], job["speaker"][None], job["key"][None], job["sampling"],
                                  max_new_tokens=job["tokens"])
        done[i] = (time.perf_counter(), len(result.generated(0)))
    return done, 1.0


def serve_static(decoder, jobs, concurrency, steps, t0):
    done, next_job, row_steps, stepped = {}, 0, 0, 0
    while next_job < len(jobs):
        _wait_until(t0 + jobs[next_job]["at"])
        now = time.perf_counter() - t0
        batch = []
        while next_job < len(jobs) and jobs[next_job]["at"] <= now and len(batch) < concurrency:
            batch.append(next_job)
            next_job += 1
        chosen = [jobs[i] for i in batch]
        result = decoder.generate([j["prompt"] for j in chosen], np.stack([j["speaker"] for j in chosen]),
                                  np.stack([j["key"] for j in chosen]), [j["sampling"] for j in chosen],
                                  max_new_tokens=[j["tokens"] for j in chosen], pad_to=next_pow2(len(chosen)))
        end = time.perf_counter()
        made = [len(result.generated(row)) for row in range(len(batch))]
        # The first token comes from the prefill; every padded row then steps until the longest is done.
        row_steps += next_pow2(len(batch)) * (max(made) - 1)
        stepped += sum(m - 1 for m in made)
        for row, i in enumerate(batch):
            done[i] = (end, made[row])
    return done, stepped / max(row_steps, 1)


def serve_engine(decoder, jobs, concurrency, steps, t0, engine=None, sequences=None):
    """``sequences``: a dict that receives each request's tokens (prompt and generated), by job index."""
    engine = engine or FirstStageEngine(decoder, slots=concurrency, steps=steps)
    tokens_before, row_steps_before = engine.tokens_generated, engine.row_steps  # the engine may be reused
    done, next_job = {}, 0
    while next_job < len(jobs) or not engine.idle:
        if engine.idle:
            _wait_until(t0 + jobs[next_job]["at"])
        now = time.perf_counter() - t0
        while next_job < len(jobs) and jobs[next_job]["at"] <= now:
            job = jobs[next_job]
            engine.submit(EngineRequest(job["prompt"], job["key"], job["speaker"], job["sampling"], job["tokens"],
                                        tag=next_job))
            next_job += 1
        for result in engine.step():
            done[result.tag] = (time.perf_counter(), len(result.generated))
            if sequences is not None:
                sequences[result.tag] = result.sequence
    return done, (engine.tokens_generated - tokens_before) / max(engine.row_steps - row_steps_before, 1)


MODES = {"one": serve_one, "static": serve_static, "engine": serve_engine}


def warm_up(mode: str, decoder, engine, jobs: list[dict], args) -> int:
    """Compile every shape the timed run can meet, so no mode is charged for compilation: the
    engine's admit and generate calls (:meth:`FirstStageEngine.precompile`), or the static
    decoder's function for each prompt bucket and power-of-two batch (one: batch 1)."""
    longest_prompt = max(len(j["prompt"]) for j in jobs)
    if mode == "engine":
        return engine.precompile(max_prompt=longest_prompt,
                                 max_window=longest_prompt + max(j["tokens"] for j in jobs) + args.steps)
    before = decoder.compile_count
    block = decoder.config.block_size
    buckets = sorted({prompt_bucket(len(j["prompt"]), block) for j in jobs})
    sizes = [1] if mode == "one" else sorted({next_pow2(n) for n in range(1, args.concurrency + 1)})
    job = jobs[0]
    for size in sizes:
        for plen in buckets:
            decoder.generate([job["prompt"][:1] * plen] * size, np.stack([job["speaker"]] * size),
                             np.stack([job["key"]] * size), job["sampling"], max_new_tokens=1, pad_to=size)
    return decoder.compile_count - before


def _wait_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def summarise(config: str, mode: str, concurrency: int, jobs: list[dict], done: dict, t0: float) -> dict:
    latency = np.array([done[i][0] - (t0 + jobs[i]["at"]) for i in range(len(jobs))])
    span = max(d[0] for d in done.values()) - (t0 + jobs[0]["at"])
    tokens = sum(d[1] for d in done.values())
    return {"config": config, "mode": mode, "concurrency": concurrency, "utt_per_min": 60 * len(jobs) / span,
            "p50_s": float(np.percentile(latency, 50)), "p95_s": float(np.percentile(latency, 95)),
            "tokens_per_s": tokens / span}


def line(s: dict) -> str:
    text = (f"engine config={s['config']} mode={s['mode']} concurrency={s['concurrency']} "
            f"utt_per_min={s['utt_per_min']:.2f} p50_s={s['p50_s']:.3f} p95_s={s['p95_s']:.3f} "
            f"tokens_per_s={s['tokens_per_s']:.1f} kv_cache={s['kv_cache']} row_use={s['row_use']:.3f}")
    return text if "run" not in s else f"{text} run={s['run']}"


METRICS = ("utt_per_min", "p50_s", "p95_s", "tokens_per_s", "row_use")


def median_of(runs: list[dict]) -> dict:
    """One summary of a mode's repeated runs: the median of each metric (``run=median``)."""
    out = dict(runs[0], run="median")
    for name in METRICS:
        out[name] = float(np.median([r[name] for r in runs]))
    return out


def run_config(config_name: str, args) -> list[dict]:
    config = make_config(config_name)
    log(f"[{config_name}] building random weights ({config.n_layer} layers x {config.n_embd})")
    params = random_params(config, seed=0)
    # An end-of-audio id outside the vocabulary: every utterance runs to its length (the workload's mix).
    devices = jax.local_devices()
    mesh = local_mesh(devices) if len(devices) > 1 else None
    decoder = FirstStageDecoder(config, params, end_of_audio=config.vocab_sizes[0] + 5, dtype=jnp.float32,
                                quantize=args.quantize if config_name == "full" else None, consume_params=True,
                                kv_cache=args.kv_cache, mesh=mesh)
    del params
    jobs = workload(args.requests, args.rate, args.min_tokens, args.max_tokens, config.vocab_sizes[0], args.seed)
    engines = {}
    if "engine" in args.modes and mesh is not None:
        # One engine per device, --concurrency slots in all; the other modes run on the first device.
        per_device = max(1, args.concurrency // len(devices))
        log(f"[{config_name}] engine over {len(devices)} devices, {per_device} slots each")
        engines["engine"] = DeviceEngines(decoder, slots=per_device, steps=args.steps, prefill_chunk=args.prefill_chunk)
    if mesh is not None:
        decoder = decoder.on_device(devices[0])
    if "engine" in args.modes and mesh is None:
        engines["engine"] = FirstStageEngine(decoder, slots=args.concurrency, steps=args.steps,
                                             prefill_chunk=args.prefill_chunk)
    sequences: dict = {}
    for mode in args.modes:
        t = time.perf_counter()
        compiled = warm_up(mode, decoder, engines.get(mode), jobs, args)
        log(f"[{config_name}] {mode}: compiled {compiled} functions ahead in {time.perf_counter() - t:.1f} s")
    runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):
        # Modes interleaved run by run, so a slow spell of the machine falls on each of them alike.
        for mode in args.modes:
            log(f"[{config_name}] {mode}: {len(jobs)} requests, Poisson {args.rate}/s, kv_cache={decoder.kv_cache}"
                + (f", run {repeat + 1} of {args.repeats}" if args.repeats > 1 else ""))
            kw = {"engine": engines[mode], "sequences": sequences} if mode in engines else {}
            t0 = time.perf_counter()
            done, row_use = MODES[mode](decoder, jobs, args.concurrency, args.steps, t0, **kw)
            s = summarise(config_name, mode, args.concurrency, jobs, done, t0)
            s["kv_cache"], s["row_use"] = decoder.kv_cache, row_use
            if args.repeats > 1:
                s["run"] = repeat + 1
            print(line(s), flush=True)
            runs[mode].append(s)
    summary = {mode: median_of(r) if args.repeats > 1 else r[0] for mode, r in runs.items()}
    if args.repeats > 1:
        for s in summary.values():
            print(line(s), flush=True)
    if "static" in runs and "engine" in runs:
        ratios = [e["utt_per_min"] / st["utt_per_min"] for e, st in zip(runs["engine"], runs["static"])]
        e, st = summary["engine"], summary["static"]
        log(f"[{config_name}] engine vs static: {np.median(ratios):.2f}x utt/min"
            + (f" (runs: {', '.join(f'{r:.2f}' for r in ratios)})" if args.repeats > 1 else "")
            + f", p95 {e['p95_s']:.1f} s vs {st['p95_s']:.1f} s")
    if mesh is not None and "engine" in engines:
        same = same_tokens_on_one_device(decoder, jobs, sequences, args)
        print(f"engine-devices config={config_name} devices={len(devices)} requests={len(jobs)} "
              f"tokens_equal={'yes' if same else 'no'}", flush=True)
    out = list(summary.values())
    for kind in args.kv_caches:
        out.append(long_utterance(config_name, decoder.with_kv_cache(kind), args))
    return out


def same_tokens_on_one_device(decoder, jobs: list[dict], sequences: dict, args) -> bool:
    """Whether every request's tokens from the engines over several devices (``sequences``, the last
    timed run's) equal what one engine on one device gives it (run here, untimed)."""
    engine = FirstStageEngine(decoder, slots=args.concurrency, steps=args.steps, prefill_chunk=args.prefill_chunk)
    requests = [EngineRequest(j["prompt"], j["key"], j["speaker"], j["sampling"], j["tokens"], tag=i)
                for i, j in enumerate(jobs)]
    results = engine.run(requests)
    differ = [r.tag for r in results if not np.array_equal(r.sequence, sequences.get(r.tag))]
    if differ:
        log(f"tokens differ from one device for requests {differ}")
    return not differ


def long_utterance(config_name: str, decoder, args) -> dict:
    """One ``--long-tokens`` utterance at batch 1, timed after a one-token call compiled its program."""
    config = decoder.config
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, config.vocab_sizes[0], 24).tolist()
    tokens = min(args.long_tokens, config.block_size - len(prompt))
    spk = rng.normal(size=(1, SPEAKER_DIM)).astype(np.float32)
    sampling = SamplingConfig()
    t = time.perf_counter()
    decoder.generate([prompt], spk, utterance_keys(1, 1), sampling, max_new_tokens=1)
    log(f"[{config_name}] kv_cache={decoder.kv_cache}: compiled in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    res = decoder.generate([prompt], spk, utterance_keys(1, 1), sampling, max_new_tokens=tokens)
    elapsed = time.perf_counter() - t
    made = len(res.generated(0))
    s = {"config": config_name, "kv_cache": decoder.kv_cache, "tokens": made, "tokens_per_s": made / elapsed}
    print(f"decode config={config_name} kv_cache={s['kv_cache']} tokens={made} tokens_per_s={s['tokens_per_s']:.3f}",
          flush=True)
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=None, help="comma-separated: medium, full (default: medium,full; --quick: medium)")
    p.add_argument("--modes", default="one,static,engine")
    p.add_argument("--concurrency", type=int, default=8, help="engine slots and static batch size")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"engine tokens per call (default {DEFAULT_STEPS})")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="engine prompt tokens per step while admitting next to running requests; 0: whole "
                        f"prefill (default {DEFAULT_PREFILL_CHUNK}; stalls: benchmarks.admission)")
    p.add_argument("--requests", type=int, default=None, help="default 32 (--quick: 16)")
    p.add_argument("--rate", type=float, default=None,
                   help="arrivals per second (default 1; --quick 2: more than the machine serves, so "
                        "utterances/min measures capacity rather than the arrival rate)")
    p.add_argument("--min-tokens", type=int, default=None, help="default 64 (--quick: 32)")
    p.add_argument("--max-tokens", type=int, default=None, help="default 512 (--quick: 256)")
    p.add_argument("--quantize", choices=["int8", "int4", "bf16", "none"], default="int8", help="weights of the full config")
    p.add_argument("--kv-cache", choices=list(KV_CACHE_KINDS), default="float32",
                   help="KV cache of the load test (every mode)")
    p.add_argument("--kv-caches", default="float32,bf16,int8",
                   help="KV cache kinds for the long utterance ('' skips it)")
    p.add_argument("--long-tokens", type=int, default=1500, help="new tokens of the long utterance")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs of each mode, interleaved (one compilation); with more than one, each "
                        "run's line ends run=<i> and a run=median line per mode follows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="medium model, fewer and shorter requests")
    args = p.parse_args(argv)
    args.configs = (args.configs or ("medium" if args.quick else "medium,full")).split(",")
    args.modes = [m for m in args.modes.split(",") if m]
    args.kv_caches = [k for k in args.kv_caches.split(",") if k]
    for kind in args.kv_caches:
        if kind not in KV_CACHE_KINDS:
            p.error(f"unknown KV cache kind {kind!r}")
    for name in args.configs:
        if name not in ("tiny", "medium", "full"):  # tiny: for the smoke test
            p.error(f"unknown config {name!r}")
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}")
    args.requests = args.requests or (16 if args.quick else 32)
    args.rate = args.rate if args.rate is not None else (2.0 if args.quick else 1.0)
    args.min_tokens = args.min_tokens or (32 if args.quick else 64)
    args.max_tokens = args.max_tokens or (256 if args.quick else 512)
    args.quantize = None if args.quantize == "none" else args.quantize
    if args.concurrency < 1 or args.steps < 1 or args.requests < 1 or args.repeats < 1 or args.min_tokens < 1 \
            or args.max_tokens < args.min_tokens:
        p.error("concurrency, steps, requests, repeats and token counts must be positive (min <= max)")
    for name in args.configs:
        run_config(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
