"""Fidelity of the compact first-stage KV caches (bf16, int8) against the float32 cache.

    python -m benchmarks.kv_cache                      # fixture prompts, then the released shape at 1,536 positions
    python -m benchmarks.kv_cache --skip-random        # fixture only (a minute)

Teacher-forced, as benchmarks/quantize.py measures the int8 weights: a token sequence runs
through the decoder with the float32 cache (one pass) and with each compact cache token by
token (every position reads the stored cache as a decode step does: on CPU through the cache
kernel); at each position the guided next-token distributions are compared: mean/max
KL(float32 || kind) in nats and the fraction of positions whose greedy token agrees.

* fixture: the shared reference first stage on the prompts of ``stage1/stage1_cases.npz``,
  continued greedily in float32 (``--fixture-tokens``); weights float32, or int8 for the
  int8-weights + int8-cache pair (compared with float32 weights and cache);
* random: the released shape with N(0, 0.02) weights (``--weights``, int8 by default: the
  same weights for every cache, so only the cache differs), one ``--length``-token sequence (a text
  prompt, then random audio tokens) at guidance 3, reported over every position and over the
  positions past 1,024 (the long windows a 10 s utterance spends most of its steps in).
  Untrained weights give broad next-token distributions with tiny margins, harsher on greedy
  agreement than a trained model (see RESULTS.md, "int8 first stage").

Machine-readable lines:
  kv-fidelity inputs=<fixture|random|random-long> weights=<w> kv_cache=<k> positions=<n> mean_kl=<x> max_kl=<y> greedy_agree=<z>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.decode import SPEAKER_DIM, make_config, random_params
from benchmarks.quantize import (
    FIXTURES,
    _summary,
    fixture_cases,
    fixture_model,
    greedy_continuations,
    right_padded,
)
from mvjax.inference.decode import FirstStageDecoder
from mvjax.inference.fidelity import compare_logits, guided_logits
from mvjax.io.quantize import decoder_params

PAIRS = (("float32", "bf16"), ("float32", "int8"), ("int8", "int8"))  # (weights, cache)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def line(inputs: str, weights: str, kind: str, s: dict) -> str:
    return (f"kv-fidelity inputs={inputs} weights={weights} kv_cache={kind} positions={s['positions']} "
            f"mean_kl={s['mean_kl']:.3e} max_kl={s['max_kl']:.3e} greedy_agree={s['greedy_agree']:.4f}")


def fixture(workdir: Path, new_tokens: int) -> list[str]:
    from mvjax.io.checkpoint import load_gpt_stage

    config, params, tok = load_gpt_stage(fixture_model(workdir), "first_stage")
    cases = fixture_cases(FIXTURES)
    dec = FirstStageDecoder(config, params, end_of_audio=tok.offset - 1)
    budget = min(new_tokens, config.block_size - max(len(c["prompt"]) for c in cases) - 1)
    seqs = greedy_continuations(dec, cases, budget)
    padded = right_padded(seqs)
    spk = np.stack([c["spk"] for c in cases])
    guidance = np.array([c["guidance"] for c in cases], np.float32)

    def spans(logits):
        return np.concatenate([logits[i, len(c["prompt"]) - 1: len(seqs[i]) - 1] for i, c in enumerate(cases)])

    ref = spans(np.asarray(guided_logits(config, decoder_params(config, params), padded, spk, guidance)))
    out = []
    for weights, kind in PAIRS:
        prepared = decoder_params(config, params, quantize=None if weights == "float32" else weights)
        got = spans(np.asarray(guided_logits(config, prepared, padded, spk, guidance, kind)))
        out.append(line("fixture", weights, kind, _summary([compare_logits(ref, got)])))
        print(out[-1], flush=True)
    return out


def random_long(config_name: str, length: int, kinds, seed: int, weights: str) -> list[str]:
    config = make_config(config_name)
    length = min(length, config.block_size)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_sizes[0], (1, length)).astype(np.int32)
    spk = rng.normal(size=(1, SPEAKER_DIM)).astype(np.float32)
    spk /= np.linalg.norm(spk)
    log(f"[{config_name}] random {weights} weights; float32 cache, one pass over {length} positions")
    params = decoder_params(config, random_params(config, seed=seed), quantize=None if weights == "float32" else weights)
    ref = np.asarray(guided_logits(config, params, tokens, spk, 3.0))[0, :-1]
    out = []
    for kind in kinds:
        log(f"[{config_name}] {kind} cache, token by token")
        got = np.asarray(guided_logits(config, params, tokens, spk, 3.0, kind))[0, :-1]
        for inputs, span in (("random", slice(None)), ("random-long", slice(1024, None))):
            if len(ref[span]):
                out.append(line(inputs, weights, kind, _summary([compare_logits(ref[span], got[span])])))
                print(out[-1], flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="full", choices=["tiny", "medium", "full"], help="shape of the random model")
    p.add_argument("--length", type=int, default=1536, help="positions of the random sequence")
    p.add_argument("--kv-caches", default="bf16,int8", help="compact kinds compared on the random model")
    p.add_argument("--weights", default="int8", choices=["float32", "int8"],
                   help="weights of the random model (the same for every cache; int8 halves the step time)")
    p.add_argument("--fixture-tokens", type=int, default=64, help="greedy float32 tokens per fixture prompt")
    p.add_argument("--skip-fixture", action="store_true")
    p.add_argument("--skip-random", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.length < 2 or args.fixture_tokens < 1:
        p.error("--length must be >= 2 and --fixture-tokens >= 1")
    if not args.skip_fixture:
        with tempfile.TemporaryDirectory() as tmp:
            fixture(Path(tmp), args.fixture_tokens)
    if not args.skip_random:
        random_long(args.config, args.length, [k for k in args.kv_caches.split(",") if k], args.seed, args.weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
