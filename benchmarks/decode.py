"""First-stage decode throughput: tokens/s, weight bandwidth and roofline fraction.

    python -m benchmarks.decode --config full --batch 1 8 [--tokens 64] [--reference-src PATH]

Configs (random weights, the released first-stage architecture otherwise):
  tiny    the shared fixture's size (2 layers x 64, block 256)
  medium  12 layers x 1024, 16 heads, block 2048
  full    the released 1.2B shape: 24 layers x 2048, 16 heads, block 2048, vocab 2562

Each utterance decodes with guidance (a conditioned and an unconditioned row), so one step
reads every weight once for the whole batch. The benchmark measures the machine's memory
read bandwidth itself (a jitted reduction over a 2 GB array, best of several runs) and
reports ``roofline_frac = steps/s * bytes_per_step / bandwidth`` from the bytes the variant
actually reads in a steady-state step (:func:`bytes_per_step`): every weight matrix as stored
(float32, bf16, int8 with its scales, int4 with its scales and minimums; the tied head
included, the position table not: a step reads one row of it) plus the KV cache slots the
timed steps attend to (each row its own positions through a ragged cache kernel, the whole
static window through plain XLA), in the cache's stored kind.

Timing (the same rule on both sides, :func:`timed_protocol`): a first call of 2 new tokens
from cold (compilation included), then ``--repeats`` runs of N and of 2 new tokens, the
sides interleaved run by run; rates are steady-state decoding, (N - 2) tokens over
median(N) - median(2); first-call, compile (first call - median(2)), first N-token call
(compile + median(N)) and prefill times are printed apart. With ``--reference-src`` (a checkout of metavoiceio/metavoice-src) it also
times the reference gpt-fast style decode (``fam.llm.fast_inference_utils.generate``, batch
1, same weights, same precision unless ``--reference-dtype``) in the same runs and prints the
speed ratio: eager PyTorch by default; ``--reference-compile`` sets it up as the reference's
``build_model(compile=True, compile_prefill=True)`` does (``torch.compile(mode="max-autotune",
fullgraph=True)`` on its decode step, ``torch.compile(fullgraph=True, dynamic=True)`` on its
prefill), on the CPU (inductor's C++ backend) or with ``--reference-device cuda``.
``--dtype bfloat16`` runs our decoder entirely in bfloat16 (weights, activations, KV cache);
``--quantize int8`` (or ``int4``, ``bf16``) stores the weights so (the decode line then says ``weights=``).

On the CPU, at a realistic length against the compiled reference:

    python -m benchmarks.decode --config full --batch 1 --tokens 512 --repeats 2 \
        --reference-src PATH --reference-compile

On a GPU machine (see benchmarks/RESULTS.md for what to record):

    python -m benchmarks.decode --config full --batch 1 8 --tokens 256 --dtype bfloat16 \
        --reference-src PATH --reference-device cuda --reference-compile

Each measurement ends with machine-readable lines:
  decode config=<name> batch=<n> dtype=<d> [weights=<int8|int4|bf16>] tokens_per_s=<x> GB_per_s=<y> roofline_frac=<z>
  decode-bytes config=<name> batch=<n> weights=<float32|int8|int4|bf16> kv_cache=<kind> weights_gb=<w>
         kv_gb=<k> bandwidth_gb_s=<b>   (bytes read per steady-state step; GB_per_s counts both)
  timing side=<ours|reference> batch=<n> new_tokens=<N> repeats=<r> first_call_s=... compile_s=...
         first_call_n_s=... median_s=... prefill_s=... runs_s=<each run of N>
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import FIRST_STAGE_SHAPES, FIRST_STAGE_VOCAB, best_of, clock
from mvjax.inference.decode import FirstStageDecoder, cache_windows, prompt_bucket  # noqa: E402
from mvjax.inference.keys import utterance_keys  # noqa: E402
from mvjax.inference.options import SamplingConfig  # noqa: E402
from mvjax.io.quantize import tree_nbytes  # noqa: E402
from mvjax.nn.config import GPTConfig  # noqa: E402
from mvjax.nn.gpt import abstract_params  # noqa: E402
from mvjax.nn.kv_cache import bytes_per_slot, step_kernel_used  # noqa: E402

SPEAKER_DIM = 256
END_OF_AUDIO = 2048


def make_config(name: str) -> GPTConfig:
    base = dict(
        vocab_sizes=(FIRST_STAGE_VOCAB,), target_vocab_sizes=None, bias=False, causal=True, spk_emb_on_text=True,
        norm_type="rmsnorm", rmsnorm_eps=1e-5, nonlinearity_type="swiglu", swiglu_multiple_of=256,
        speaker_emb_dim=SPEAKER_DIM,
    )
    return GPTConfig(**base, **FIRST_STAGE_SHAPES["released" if name == "full" else name])


def random_params(config: GPTConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Random weights without tracing the model: N(0, 0.02) matrices, unit norm scales."""
    abstract = abstract_params(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    key = jax.random.PRNGKey(seed)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            out.append(jnp.ones(leaf.shape, dtype))
        else:
            draw = jax.jit(lambda k, shape=leaf.shape: (0.02 * jax.random.normal(k, shape)).astype(dtype))
            out.append(draw(jax.random.fold_in(key, i)))
    return jax.tree_util.tree_unflatten(treedef, out)


def measure_bandwidth(gigabytes: float = 2.0, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: a jitted sum over a large float32 array, best of ``repeats``."""
    n = int(gigabytes * 1e9) // 4
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best, _ = best_of(lambda: total(x), repeats)
    return n * 4 / best / 1e9


def bytes_per_step(decoder: FirstStageDecoder, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes) one steady-state decode step of ``batch`` guided utterances reads,
    averaged over the steps the timing rule measures (``new_tokens`` new tokens minus 2: decode
    steps 2 .. N - 1, step j writing position ``prompt_len + j - 1`` and attending to the
    ``prompt_len + j`` slots up to it).

    Weights: the decode tree as stored, minus the position table (one row of it per token). KV:
    2 * batch rows (conditioned and unconditioned) times the slot bytes of the cache's kind over
    every layer, keys and values (:func:`mvjax.nn.kv_cache.bytes_per_slot`), times the slots read:
    a ragged cache kernel (:func:`mvjax.nn.kv_cache.step_kernel_used`) reads each row's own
    positions, plain XLA the whole static window the step runs in (``cache_windows``)."""
    config = decoder.config
    params = decoder.params
    weights = tree_nbytes(params) - tree_nbytes(params["wpe"])
    ragged = step_kernel_used(decoder.dtype, config.head_dim)
    windows = cache_windows(prompt_bucket(prompt_len, config.block_size), config.block_size)
    slots = []
    for j in range(2, new_tokens):
        attended = prompt_len + j
        slots.append(attended if ragged else next(w for w in windows if attended - 1 < w))
    kv = 2 * batch * bytes_per_slot(config, decoder.kv_cache) * float(np.mean(slots))
    return float(weights), kv


def prompts_for(batch: int, length: int, config: GPTConfig, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    text_lo = END_OF_AUDIO + 1
    return [rng.integers(text_lo, config.vocab_sizes[0], size=length).tolist() for _ in range(batch)]


def _clock(fn) -> float:
    return clock(fn)[0]


def timed_protocol(sides: dict, repeats: int, log=print) -> dict:
    """The one timing rule every side follows. ``sides``: name -> (gen, new_tokens), where
    ``gen(n)`` decodes exactly ``n`` new tokens (prefill, first token, n - 1 decode steps).

    1. First call: ``gen(2)`` from cold (compilation, prefill, one decode step), each side in turn.
    2. ``repeats`` rounds of ``gen(new_tokens)``, then ``repeats`` rounds of ``gen(2)``, the
       sides interleaved within each round so load on a shared machine hits them alike.
    3. Steady state: median(N) - median(2) covers N - 2 decode steps; compile = first call -
       median(2); a first N-token call costs compile + median(N) (``first_call_n_s``).
    """
    first, full, base = {}, {k: [] for k in sides}, {k: [] for k in sides}
    for name, (gen, n) in sides.items():
        first[name] = _clock(lambda: gen(2))
        log(f"  [{name}] first call (2 new tokens, compile included): {first[name]:.2f} s", flush=True)
    for r in range(repeats):
        for name, (gen, n) in sides.items():
            full[name].append(_clock(lambda: gen(n)))
            log(f"  [{name}] run {r + 1}/{repeats} ({n} new tokens): {full[name][-1]:.2f} s", flush=True)
    for r in range(repeats):
        for name, (gen, n) in sides.items():
            base[name].append(_clock(lambda: gen(2)))
    out = {}
    for name, (gen, n) in sides.items():
        total, prefill = float(np.median(full[name])), float(np.median(base[name]))
        compile_s = max(first[name] - prefill, 0.0)
        out[name] = {"seconds": total - prefill, "steps": n - 2, "prefill_s": prefill, "end_to_end_s": total,
                     "first_call_s": first[name], "compile_s": compile_s, "first_call_n_s": compile_s + total,
                     "runs_s": full[name], "baseline_runs_s": base[name], "repeats": repeats}
    return out


def ours_generator(decoder, batch: int, prompt_len: int):
    """``gen(n)``: our decode of ``batch`` utterances (guidance 3, top-p 0.95), exactly ``n`` new tokens each."""
    config = decoder.config
    prompts = prompts_for(batch, prompt_len, config)
    spk = np.random.default_rng(1).standard_normal((batch, SPEAKER_DIM)).astype(np.float32)
    sampling = SamplingConfig(guidance_scale=3.0, temperature=1.0, top_p=0.95)
    keys = utterance_keys(0, batch)

    def gen(n):
        result = decoder.generate(prompts, spk, keys, sampling, max_new_tokens=n)
        assert all(len(result.generated(i)) == n for i in range(batch))

    return gen


def _import_reference(src: Path):
    """Import the reference fast decoder from a metavoice-src checkout, stubbing modules it imports but
    this benchmark never calls (audio I/O, speaker encoder, quantisation)."""
    sys.path.insert(0, str(src))
    for name in ("librosa", "posthog"):
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                sys.modules[name] = types.ModuleType(name)
    import importlib

    stubs = {
        "fam.quantiser.audio.speaker_encoder.model": ["SpeakerEncoder"],
        "fam.llm.fast_quantize": ["WeightOnlyInt4QuantHandler", "WeightOnlyInt8QuantHandler"],
    }
    for mod, names in stubs.items():
        try:
            importlib.import_module(mod)
        except Exception:
            stub = types.ModuleType(mod)
            for n in names:
                setattr(stub, n, object)
            sys.modules[mod] = stub
    fiu = importlib.import_module("fam.llm.fast_inference_utils")
    fm = importlib.import_module("fam.llm.fast_model")
    return fiu, fm


def compile_reference(fiu, mode: str = "max-autotune") -> None:
    """What the reference's ``build_model(compile=True, compile_prefill=True)`` does (the setting
    of its ``TTS`` class): ``decode_one_token`` under ``torch.compile(mode=mode, fullgraph=True)``
    and ``prefill`` under ``torch.compile(fullgraph=True, dynamic=True)``. Idempotent."""
    import torch

    if getattr(fiu, "_mvjax_compiled", None) == mode:
        return
    if not hasattr(fiu, "_mvjax_eager"):
        fiu._mvjax_eager = (fiu.decode_one_token, fiu.prefill)
    decode_one_token, prefill = fiu._mvjax_eager
    fiu.decode_one_token = torch.compile(decode_one_token, mode=mode, fullgraph=True)
    fiu.prefill = torch.compile(prefill, fullgraph=True, dynamic=True)
    fiu._mvjax_compiled = mode


def reference_generator(src: Path, decoder: FirstStageDecoder, prompt_len: int, device: str = "cpu",
                        dtype: str = "float32", compile: bool = False, compile_mode: str = "max-autotune"):
    """``gen(n)``: the reference's fast-path ``generate`` on ``decoder``'s weights (batch 1, guidance
    3, top-p 0.95), exactly ``n >= 2`` new tokens, on ``device`` in ``dtype``; eager, or with
    ``compile`` set up as its ``build_model`` does (:func:`compile_reference`). Float32 on the
    CPU reads our decoder's weight buffers (no second copy of the weights)."""
    import torch

    fiu, fm = _import_reference(src)
    torch.set_grad_enabled(False)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    config = decoder.config
    args = fm.ModelArgs(
        block_size=config.block_size, vocab_size=config.vocab_sizes[0], n_layer=config.n_layer,
        n_head=config.n_head, dim=config.n_embd, speaker_emb_dim=SPEAKER_DIM,
        intermediate_size=config.mlp_hidden, norm_eps=config.norm_eps,
    )
    args.dtype = torch_dtype  # its KV cache is made in this dtype
    with torch.device("meta"):
        model = fm.Transformer(args)
    share = device == "cpu" and dtype == "float32"

    def t(a):
        a = np.asarray(a)
        if share and a.dtype == np.float32 and a.flags.c_contiguous:
            import warnings

            with warnings.catch_warnings():  # a read-only buffer: inference never writes weights
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(a)
        return torch.from_numpy(np.array(a, dtype=np.float32, order="C"))  # a writable copy

    p = decoder.params  # kernels already in torch's (out, in) layout
    state = {
        "tok_embeddings.weight": t(p["wte"]),
        "pos_embeddings.weight": t(p["wpe"]),
        "speaker_cond_pos.weight": t(p["speaker_proj"]),
        "norm.weight": t(p["ln_f"]["scale"]),
    }
    state["output.weight"] = state["tok_embeddings.weight"]  # tied, as in the released model
    for i, b in enumerate(p["layers"]):
        state.update({
            f"layers.{i}.attention_norm.weight": t(b["ln_1"]["scale"]),
            f"layers.{i}.ffn_norm.weight": t(b["ln_2"]["scale"]),
            f"layers.{i}.attention.wqkv.weight": t(b["attn"]["c_attn"]["w"]),
            f"layers.{i}.attention.wo.weight": t(b["attn"]["c_proj"]["w"]),
            f"layers.{i}.feed_forward.swiglu.w1.weight": t(b["mlp"]["w1"]["w"]),
            f"layers.{i}.feed_forward.swiglu.w3.weight": t(b["mlp"]["w3"]["w"]),
            f"layers.{i}.feed_forward.w2.weight": t(b["mlp"]["c_proj"]["w"]),
        })
    model.load_state_dict(state, assign=True)
    model = model.eval().to(device=device, dtype=torch_dtype)
    with torch.device(device):
        model.setup_spk_cond_mask()
        model.setup_caches(max_batch_size=2, max_seq_length=config.block_size)
    if compile:
        compile_reference(fiu, compile_mode)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    prompt = torch.tensor(prompts_for(1, prompt_len, config)[0], dtype=torch.int, device=device)
    spk = torch.randn(1, SPEAKER_DIM, device=device, dtype=torch_dtype)
    scalar = lambda v: torch.tensor(v, device=device, dtype=torch_dtype)
    kwargs = dict(
        temperature=scalar(1.0), top_k=None, top_p=scalar(0.95), guidance_scale=scalar(3.0),
        end_of_audio_token=config.vocab_sizes[0] + 1,  # never sampled: exactly n tokens
    )

    def gen(n):
        # Its generate() cannot stop after one token (its decode loop would be empty): n >= 2.
        seq = fiu.generate(model, prompt, spk, max_new_tokens=n, **kwargs)
        sync()
        assert int(seq.numel()) - prompt_len == n, (int(seq.numel()) - prompt_len, n)

    return gen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", choices=["tiny", "medium", "full"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per utterance (>= 3)")
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (the median is reported)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quantize", default=None, choices=["int8", "int4", "bf16"],
                        help="first-stage weights stored int8 (per output channel), int4 (group-wise) or bf16, "
                             "as --quantize elsewhere")
    parser.add_argument("--reference-src", type=Path, help="metavoice-src checkout to time the reference decode")
    parser.add_argument("--reference-tokens", type=int, default=None, help="new tokens for the reference (default --tokens)")
    parser.add_argument("--reference-device", default="cpu", help="torch device for the reference (cpu, cuda)")
    parser.add_argument("--reference-dtype", default=None, choices=["float32", "bfloat16"],
                        help="reference weights/activations (default: --dtype)")
    parser.add_argument("--reference-compile", action="store_true",
                        help="torch.compile the reference's decode step and prefill, as its build_model does")
    parser.add_argument("--reference-compile-mode", default="max-autotune",
                        help="torch.compile mode of its decode step (the reference uses max-autotune)")
    args = parser.parse_args(argv)
    if args.tokens < 3 or (args.reference_tokens is not None and args.reference_tokens < 3):
        parser.error("--tokens must be >= 3 (the steady state is time(N) - time(2))")

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    config = make_config(args.config)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}", flush=True)
    bandwidth = measure_bandwidth()
    params = random_params(config, dtype=dtype)
    n_params = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params))
    # An end-of-audio id outside the vocabulary: every row runs the full number of steps.
    decoder = FirstStageDecoder(config, params, end_of_audio=config.vocab_sizes[0] + 1, dtype=dtype,
                                quantize=args.quantize)
    del params  # the decoder keeps its own re-laid copy
    weight_bytes = tree_nbytes(decoder.params)  # as stored: what a step reads
    print(f"config={args.config} params={n_params / 1e9:.3f}B "
          f"weights={weight_bytes / 1e9:.2f} GB  read bandwidth={bandwidth:.1f} GB/s", flush=True)

    ref_dtype = args.reference_dtype or args.dtype
    ref_mode = (f"torch.compile {args.reference_compile_mode}" if args.reference_compile else "eager")
    ref_gen = None
    if args.reference_src:
        ref_gen = reference_generator(args.reference_src, decoder, args.prompt_len, device=args.reference_device,
                                      dtype=ref_dtype, compile=args.reference_compile,
                                      compile_mode=args.reference_compile_mode)
    print(f"timing rule (both sides): first call of 2 tokens from cold (compile included), then "
          f"median of {args.repeats} runs of N and of 2 tokens, sides interleaved; "
          f"steady rate = (N - 2) / (median(N) - median(2)); compile = first call - median(2)", flush=True)

    def timing_line(side, batch, r):
        runs = ",".join(f"{x:.3f}" for x in r["runs_s"])
        print(f"timing side={side} batch={batch} new_tokens={r['steps'] + 2} repeats={r['repeats']} "
              f"first_call_s={r['first_call_s']:.3f} compile_s={r['compile_s']:.3f} "
              f"first_call_n_s={r['first_call_n_s']:.3f} "
              f"median_s={r['end_to_end_s']:.3f} prefill_s={r['prefill_s']:.3f} runs_s={runs}")

    ours = {}
    ref = None
    for batch in args.batch:
        sides = {"ours": (ours_generator(decoder, batch, args.prompt_len), args.tokens)}
        if batch == 1 and ref_gen is not None:
            sides["reference"] = (ref_gen, args.reference_tokens or args.tokens)
        results = timed_protocol(sides, args.repeats)
        r = results["ours"]
        tokens = batch * r["steps"]
        steps_per_s = r["steps"] / r["seconds"]
        tps = tokens / r["seconds"]
        read_weights, read_kv = bytes_per_step(decoder, batch, args.prompt_len, args.tokens)
        gbps = steps_per_s * (read_weights + read_kv) / 1e9
        ours[batch] = tps
        print(f"  ours batch={batch}: {r['steps']} decode steps ({tokens} tokens) in {r['seconds']:.2f} s; "
              f"prefill {r['prefill_s']:.2f} s, end to end {r['end_to_end_s']:.2f} s (median of {r['repeats']}), "
              f"first call (2 tokens) {r['first_call_s']:.2f} s, compile {r['compile_s']:.1f} s, "
              f"first {r['steps'] + 2}-token call (compile + median) {r['first_call_n_s']:.2f} s")
        weights = f" weights={args.quantize}" if args.quantize else ""
        print(f"decode config={args.config} batch={batch} dtype={args.dtype}{weights} tokens_per_s={tps:.3f} "
              f"GB_per_s={gbps:.2f} roofline_frac={gbps / bandwidth:.3f}", flush=True)
        print(f"decode-bytes config={args.config} batch={batch} weights={args.quantize or args.dtype} "
              f"kv_cache={decoder.kv_cache} weights_gb={read_weights / 1e9:.4f} kv_gb={read_kv / 1e9:.4f} "
              f"bandwidth_gb_s={bandwidth:.2f}", flush=True)
        timing_line("ours", batch, r)
        if "reference" in results:
            ref = results["reference"]
    if 1 in ours:
        for batch, tps in ours.items():
            if batch != 1:
                print(f"batch {batch} / batch 1 total tokens/s: {tps / ours[1]:.2f}x")

    if ref is not None:
        tps = ref["steps"] / ref["seconds"]
        ref_bytes = n_params * (2 if ref_dtype == "bfloat16" else 4)
        gbps = tps * ref_bytes / 1e9
        print(f"  reference batch=1 ({args.reference_device}, {ref_dtype}, {ref_mode}): {ref['steps']} decode steps in "
              f"{ref['seconds']:.2f} s; prefill {ref['prefill_s']:.2f} s, end to end {ref['end_to_end_s']:.2f} s "
              f"(median of {ref['repeats']}), first call (2 tokens) {ref['first_call_s']:.2f} s, compile "
              f"{ref['compile_s']:.1f} s, first {ref['steps'] + 2}-token call (compile + median) {ref['first_call_n_s']:.2f} s")
        print(f"decode-reference config={args.config} batch=1 dtype={ref_dtype} device={args.reference_device} "
              f"compiled={int(args.reference_compile)} tokens_per_s={tps:.3f} "
              f"GB_per_s={gbps:.2f} roofline_frac={gbps / bandwidth:.3f}")
        timing_line("reference", 1, ref)
        if 1 in ours:
            print(f"speedup over reference (batch 1, {args.dtype} vs {ref_mode} {ref_dtype}): "
                  f"steady {ours[1] / tps:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
