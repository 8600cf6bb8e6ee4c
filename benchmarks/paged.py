"""How many first-stage requests fit in the same KV-cache memory with pages vs whole-block slots, and what pages cost.

    python -m benchmarks.paged                      # capacity lines (no allocation), then the medium engine run
    python -m benchmarks.paged --no-engine          # capacity lines only

The memory budget is the KV cache of ``--budget-slots`` whole-block slots (each a guidance pair of rows holding
the whole block), computed from the config for each cache kind. The request mix: prompts of ``--min-prompt`` ..
``--max-prompt`` tokens and ``--min-new`` .. ``--max-new`` generated tokens (MetaVoice speaks ~150 first-stage
tokens a second: 300-1500 is 2-10 s of speech), uniform, fixed seed.

Capacity (host arithmetic, for the medium and the released shape): whole-block slots fit ``budget_slots``
requests whatever their length; with pages of ``--page-size`` positions a request holds two rows of
``ceil(length / page_size)`` pages, so the pool holds ``fit_final`` requests of the mix at their final
lengths (the worst case: every request at its end at once) and ``fit_mean`` at the mean over each request's
life (requests in flight are on average half-way, which a continuous engine's steady state sees):

    paged-capacity shape=<s> kv_cache=<k> budget_slots=<n> budget_mb=<m> page_size=<p> pages=<P> \\
        fit_final=<x> fit_mean=<y> gain_final=<x/n> gain_mean=<y/n>

Engine (the real :class:`~mvjax.inference.engine.FirstStageEngine` at ``--shape``, random weights, end of audio
outside the vocabulary so each request runs to its length): ``--requests`` requests from the mix, all
submitted at once, served by a paged engine with ``--paged-slots`` slots and the pool of the budget, and by the
whole-block engine with ``--budget-slots`` slots (the same memory). Concurrency is the number of requests
running per generate call (max, and mean weighted by the call's tokens); tokens/s counts only calls that
compiled nothing; ``tokens_equal``: every request's tokens equal between the two engines:

    paged-engine shape=<s> mode=<paged|whole> kv_cache=<k> slots=<n> pages=<P> page_size=<p> requests=<r> \\
        max_running=<m> mean_running=<a> tokens_per_s=<t> preemptions=<q> recomputed_tokens=<w> wall_s=<s>
    paged-engine-equal shape=<s> tokens_equal=<yes|no>

Then the per-token cost of the paged path at the same batch: both engines with ``--paged-slots`` slots (the
whole-block one then holds more memory) on the same requests:

    paged-cost shape=<s> kv_cache=<k> slots=<n> paged_tokens_per_s=<a> whole_tokens_per_s=<b> ratio=<a/b>
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp
import numpy as np

from benchmarks.decode import make_config, random_params
from mvjax.inference.decode import FirstStageDecoder
from mvjax.inference.engine import EngineRequest, FirstStageEngine
from mvjax.inference.keys import utterance_keys
from mvjax.inference.options import SamplingConfig
from mvjax.nn.kv_cache import KV_CACHE_KINDS, bytes_per_slot
from mvjax.nn.paged_cache import bytes_per_page, pages_for


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mix(n: int, args, seed: int) -> list[tuple[int, int]]:
    """(prompt tokens, new tokens) of ``n`` requests."""
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(args.min_prompt, args.max_prompt + 1)), int(rng.integers(args.min_new, args.max_new + 1)))
            for _ in range(n)]


def pool_pages(config, kind: str, budget_slots: int, page_size: int) -> tuple[int, int]:
    """(bytes of ``budget_slots`` whole-block slots, pages of ``page_size`` in those bytes)."""
    budget = budget_slots * 2 * config.block_size * bytes_per_slot(config, kind)
    return budget, budget // bytes_per_page(config, page_size, kind)


def capacity(shape: str, kind: str, args) -> str:
    config = make_config(shape)
    budget, pages = pool_pages(config, kind, args.budget_slots, args.page_size)
    lengths = [min(p + n, config.block_size) for p, n in mix(10000, args, args.seed)]
    final = np.mean([2 * pages_for(t, args.page_size) for t in lengths])
    # Over a request's life its pages grow from its prompt's to its final length's: the mean holding.
    during = np.mean([np.mean([2 * pages_for(x, args.page_size) for x in range(p, t + 1)])
                      for (p, _), t in zip(mix(300, args, args.seed), lengths[:300])])
    fit_final, fit_mean = pages / final, pages / during
    return (f"paged-capacity shape={shape} kv_cache={kind} budget_slots={args.budget_slots} "
            f"budget_mb={budget / 2**20:.1f} page_size={args.page_size} pages={pages} fit_final={fit_final:.2f} "
            f"fit_mean={fit_mean:.2f} gain_final={fit_final / args.budget_slots:.2f} "
            f"gain_mean={fit_mean / args.budget_slots:.2f}")


def requests_of(jobs, vocab: int, seed: int) -> list[EngineRequest]:
    rng = np.random.default_rng(seed + 1)
    keys = utterance_keys(seed, len(jobs))
    return [EngineRequest(rng.integers(0, vocab, size=p).tolist(), keys[i], rng.standard_normal(256).astype(np.float32),
                          SamplingConfig(temperature=1.0, top_p=0.95), max_new_tokens=n, tag=i)
            for i, (p, n) in enumerate(jobs)]


def serve(engine: FirstStageEngine, requests) -> dict:
    """Run to the end, timing each call; concurrency per call, tokens/s over calls that compiled nothing."""
    for request in requests:
        engine.submit(request)
    out, running, tokens, timed_s, timed_tokens = {}, [], [], 0.0, 0
    start = time.perf_counter()
    while not engine.idle:
        compiled, t = engine.compile_count, time.perf_counter()
        results = engine.step()
        for result in results:
            out[result.tag] = result.sequence
        if engine.compile_count == compiled:
            timed_s += time.perf_counter() - t
            timed_tokens += engine.last_step_tokens
        running.append(len(engine.running) + len(results))  # in flight during the call
        tokens.append(engine.last_step_tokens)
    wall = time.perf_counter() - start
    weights = np.asarray(tokens, np.float64)
    generated = sum(len(s) for s in out.values()) - sum(len(r.prompt) for r in requests)
    return {"sequences": out, "max_running": max(running), "wall_s": wall,
            "mean_running": float(np.average(running, weights=weights)) if weights.sum() else 0.0,
            "tokens_per_s": timed_tokens / timed_s if timed_s else 0.0,
            # Every admission's first token comes from its prefill (not in tokens_generated); a preempted request
            # is admitted again.
            "recomputed_tokens": engine.tokens_generated + len(requests) + engine.preemptions - generated}


def engine_run(args) -> list[str]:
    config = make_config(args.shape)
    log(f"[{args.shape}] building random weights ({config.n_layer} layers x {config.n_embd})")
    decoder = FirstStageDecoder(config, random_params(config, seed=0), end_of_audio=config.vocab_sizes[0] + 5,
                                dtype=jnp.float32, kv_cache=args.kv_cache, consume_params=True)
    jobs = mix(args.requests, args, args.seed)
    _, pages = pool_pages(config, args.kv_cache, args.budget_slots, args.page_size)
    lines, seqs = [], {}
    runs = [("paged", args.paged_slots, dict(page_size=args.page_size, pages=pages,
                                             page_reserve=args.reserve)),
            ("whole", args.budget_slots, {})]
    if args.cost:
        runs.append(("whole-same-slots", args.paged_slots, {}))
    stats = {}
    for mode, slots, kw in runs:
        log(f"[{args.shape}] {mode}: {slots} slots, {len(jobs)} requests {jobs}")
        engine = FirstStageEngine(decoder, slots=slots, steps=args.steps, **kw)
        s = serve(engine, requests_of(jobs, config.vocab_sizes[0] - 512, args.seed))
        seqs[mode], stats[mode] = s["sequences"], s
        if mode == "whole-same-slots":
            continue
        lines.append(f"paged-engine shape={args.shape} mode={mode} kv_cache={args.kv_cache} slots={slots} "
                     f"pages={pages if kw else 0} page_size={args.page_size if kw else 0} requests={len(jobs)} "
                     f"max_running={s['max_running']} mean_running={s['mean_running']:.2f} "
                     f"tokens_per_s={s['tokens_per_s']:.1f} preemptions={engine.preemptions} "
                     f"recomputed_tokens={s['recomputed_tokens']} wall_s={s['wall_s']:.1f}")
        print(lines[-1], flush=True)
    same = all(np.array_equal(seqs["paged"][i], other[i]) for other in seqs.values() for i in range(len(jobs)))
    lines.append(f"paged-engine-equal shape={args.shape} tokens_equal={'yes' if same else 'no'}")
    print(lines[-1], flush=True)
    if args.cost:
        a, b = stats["paged"]["tokens_per_s"], stats["whole-same-slots"]["tokens_per_s"]
        lines.append(f"paged-cost shape={args.shape} kv_cache={args.kv_cache} slots={args.paged_slots} "
                     f"paged_tokens_per_s={a:.1f} whole_tokens_per_s={b:.1f} ratio={a / b if b else 0:.2f}")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-slots", type=int, default=8, help="the memory budget: this many whole-block slots")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--min-prompt", type=int, default=20)
    p.add_argument("--max-prompt", type=int, default=60)
    p.add_argument("--min-new", type=int, default=300)
    p.add_argument("--max-new", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-engine", action="store_true", help="capacity lines only")
    p.add_argument("--shape", default="medium", choices=["tiny", "medium", "full"], help="the engine run's shape")
    p.add_argument("--kv-cache", default="float32", choices=list(KV_CACHE_KINDS))
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--paged-slots", type=int, default=None, help="slots of the paged engine (default 3x budget)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--reserve", type=int, default=0, help="page_reserve of the paged engine")
    p.add_argument("--cost", action="store_true",
                   help="also run the whole-block engine with the paged engine's slots (per-token cost at one batch)")
    args = p.parse_args(argv)
    args.paged_slots = args.paged_slots or 3 * args.budget_slots
    for shape in ("medium", "full"):
        for kind in KV_CACHE_KINDS:
            print(capacity(shape, kind, args), flush=True)
    if not args.no_engine:
        engine_run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
