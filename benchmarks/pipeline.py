"""End-to-end speed: real-time factor of the whole pipeline and of each stage, ours vs the reference.

    python -m benchmarks.pipeline --config released --seconds 2 [--tokens N] [--decoder encodec|mbd]
                                  [--reference-src PATH [--reference-compile]] [--quantize int8]
                                  [--throughput 8]

Random weights in the released checkpoint layouts (``--config released``: first stage 1.2B,
second stage 6 x 384, the 24 kHz EnCodec, the real speaker encoder; ``--unet realistic`` MBD
bands as in benchmarks/vocode.py) or at the fixtures' small sizes (``--config tiny``). The
checkpoints are built in memory, converted with our converter, and the same arrays are loaded
into the reference modules, so both sides run identical weights on identical inputs.

RTF = processing seconds / audio seconds (below 1 is faster than real time). Timing, the same
rule on both sides: one first call from cold (compilation included; reported apart), then
``--repeats`` runs, ours and the reference interleaved run by run so load on a shared machine
hits both alike; each stage's figure is the median of those runs. Stages: speaker (embedding
of a 10 s reference; outside the end-to-end time, as in the reference's own RTF), stage1,
stage2, codec, diffusion (``--decoder mbd``), loudness, enhance. ``--reference-src`` (a
metavoice-src checkout) times the reference's first stage (its gpt-fast ``generate``), second
stage (``GPT._non_causal_sample``) and the ``encodec`` package's decoder on the same weights
and token counts (``--tokens``, or ``--seconds`` of audio at 150 tokens/s), in the same
process, and prints the ratios; ``--reference-compile`` compiles its first stage as its
``TTS`` class does (``torch.compile(mode="max-autotune", fullgraph=True)`` on the decode step,
``dynamic=True`` on the prefill; its second stage and codec stay eager there and here).
``--throughput B`` also synthesises B texts as one batch and reports utterances per minute
(with the batch sizes :func:`mvjax.inference.throughput.plan_batch_sizes` picks).

Memory: resident set after loading and the process peak (VmRSS / VmHWM).
Ends with machine-readable lines ``pipeline side=<ours|reference> stage=<s> seconds=<x> rtf=<y>``
(medians) and ``pipeline side=<ours|reference> stage=first_call seconds=<x>`` (stage 1 + 2 +
codec, first call, compile included; ``--first-call-tokens`` makes that call shorter than the
timed ones on both sides, to save time at long lengths).
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np

from benchmarks.common import FIRST_STAGE_SHAPES, FIRST_STAGE_VOCAB, RELEASED_SECOND_STAGE, memory_mb

TEXT = "Speed matters: this sentence is what both implementations speak, token for token."


# --- Models in the released layouts, random weights ---------------------------------------


def released_checkpoints(config: str, seed: int = 0) -> dict:
    """In-memory checkpoints (numpy) in the released layouts."""
    from convert_weights import random_checkpoints

    ranks = random_checkpoints.train_bpe(random_checkpoints.TRAINING_TEXT)
    if config == "released":
        first = random_checkpoints.model_args(vocab_sizes=[FIRST_STAGE_VOCAB], **FIRST_STAGE_SHAPES["released"])
        second = random_checkpoints.model_args(**RELEASED_SECOND_STAGE)
    else:
        first, second = random_checkpoints.FIRST_STAGE_ARGS, random_checkpoints.SECOND_STAGE_ARGS
    rng = lambda c: random_checkpoints.component_rng(seed, c)
    return {
        "first_stage": random_checkpoints.gpt_checkpoint(rng(1), first, random_checkpoints.FIRST_STAGE_TEXT_OFFSET, ranks, {"causal": True}, ""),
        "second_stage": random_checkpoints.gpt_checkpoint(rng(2), second, random_checkpoints.SECOND_STAGE_TEXT_OFFSET, ranks, {"causal": False}, ""),
        "speaker_encoder": random_checkpoints.speaker_checkpoint(rng(3)),
        "encodec": random_checkpoints.encodec_state(rng(4)),
    }


def build_ours(ckpts: dict, unet: str, decoder: str, quantize=None):
    from convert_weights.encodec import convert_encodec_state
    from convert_weights.gpt import convert_gpt_checkpoint
    from convert_weights.speaker import convert_speaker_checkpoint
    from mvjax.inference.pipeline import TTS
    from mvjax.inference.speaker import SpeakerEncoder
    from mvjax.text.tokenizer import Tokenizer

    def gpt(name):
        cfg, params, spec = convert_gpt_checkpoint(ckpts[name], source=name)
        return cfg, params, Tokenizer(spec)

    mbd = None
    if decoder == "mbd":
        from benchmarks import vocode as vocode_bench
        from mvjax.inference.diffusion import MultiBandDiffusion

        mbd = MultiBandDiffusion(*vocode_bench.mbd_model(unet))
    return TTS(gpt("first_stage"), gpt("second_stage"), convert_encodec_state(ckpts["encodec"]),
               speaker_encoder=SpeakerEncoder(*convert_speaker_checkpoint(ckpts["speaker_encoder"]), "", None),
               diffusion=mbd, mesh=None, quantize=quantize)


def reference_voice(seconds: float = 10.0):
    from mvjax.sources.demo import demo_speaker_audio

    return demo_speaker_audio(seed=1, seconds=seconds)


def speaker_timing(tts):
    """Speaker embedding of a 10 s voice: (embedding, steady seconds, compile seconds)."""
    audio, rate = reference_voice()
    t = time.perf_counter()
    tts.speaker_embedding((audio, rate))
    first = time.perf_counter() - t
    t = time.perf_counter()
    emb = tts.speaker_embedding((audio, rate))
    steady = time.perf_counter() - t
    return emb, steady, max(first - steady, 0.0)


def ours_synthesizer(tts, emb, new_tokens: int, decoder: str, seed: int = 0):
    """``call(r)``: one synthesis (seed + r) of exactly ``new_tokens`` first-stage tokens; returns
    (wall seconds, the pipeline's per-stage timings, frames spoken)."""
    kw = dict(max_new_tokens=new_tokens, decoder=decoder, long_form=False)
    # A random first stage could sample end of audio at any step (a 1/2562 chance each), which
    # would time fewer tokens than asked: move it outside the vocabulary, as the reference side
    # does, so every run decodes exactly new_tokens (checked below).
    tts.first_stage_decoder.end_of_audio = int(tts.config1.vocab_sizes[0]) + 1

    def call(r, n=new_tokens):
        t = time.perf_counter()
        speech = tts.synthesize(TEXT, emb, seed=seed + r, **{**kw, "max_new_tokens": n})
        total = time.perf_counter() - t
        generated = sum(c.generated_tokens for c in speech.chunks)
        assert generated == n, f"decoded {generated} first-stage tokens, not {n}"
        return total, dict(tts.last_timings), speech.all_codebooks.shape[1]

    return call


def _median_stages(runs: list[dict]) -> dict:
    return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}


def time_decoders(tts, frames: int, decoder: str, repeats: int) -> tuple[dict, dict]:
    """Codec (+ diffusion), loudness and enhancement on ``frames`` of random codes, through the
    pipeline's own path: (first call's timings, compile included; median of ``repeats`` more)."""
    import jax

    from mvjax.inference.options import SynthesisOptions
    from mvjax.inference.scheduler import Utterance
    from mvjax.inference.speech import ChunkReport
    from mvjax.inference.stages import Batcher, Chunk

    key = np.asarray(jax.random.PRNGKey(0))

    def chunk(owner):
        c = Chunk(owner, (0,), TEXT, key, [], [])
        c.all_codebooks = np.random.default_rng(0).integers(0, 1024, (8, frames))
        c.first_stage_codes = c.all_codebooks[:2]
        c.report = ChunkReport(TEXT, 0, 0, frames, True, False, False)
        return c

    runs = []
    for _ in range(1 + repeats):  # the first compiles
        tts.last_timings = {}
        utterance = Utterance([TEXT], np.zeros(256, np.float32), key, decoder=decoder, text=TEXT)
        c = chunk(utterance)
        (c.wav,) = tts.wave_decoder.run([c], decoder, Batcher(1, tts.mesh, tts.last_timings))
        utterance.chunks = [c]
        tts.finish(utterance, SynthesisOptions(decoder=decoder))
        runs.append(dict(tts.last_timings))
    return runs[0], _median_stages(runs[1:])


# --- The reference, same weights -------------------------------------------------------------


def reference_stages(src: Path, ckpts: dict, tts, new_tokens: int, frames: int, embedding: np.ndarray,
                     compile: bool = False) -> dict:
    """Reference stage 1 (fast path), stage 2 and the encodec decoder on the same weights and
    sizes, set up but not yet run: stage name -> a call that runs it once. With ``compile``, its
    first stage is compiled as its ``TTS`` class sets it up (``build_model(compile=True,
    compile_prefill=True)``: benchmarks/decode.py's ``compile_reference``); its second stage
    and codec run eagerly there too (``compile=False``), so they do here."""
    import torch

    from benchmarks import decode as decode_bench

    torch.set_grad_enabled(False)
    fiu, fm = decode_bench._import_reference(src)
    import fam.llm.model as ref_model

    out = {}
    if compile:
        decode_bench.compile_reference(fiu)
    # Stage 1: the fast path decoder, loaded from the same released-layout arrays.
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpts["first_stage"]["model"].items()}
    args = ckpts["first_stage"]["model_args"]
    cfg1 = tts.config1
    margs = fm.ModelArgs(block_size=args["block_size"], vocab_size=args["vocab_sizes"][0], n_layer=args["n_layer"],
                         n_head=args["n_head"], dim=args["n_embd"], speaker_emb_dim=embedding.shape[0],
                         intermediate_size=cfg1.mlp_hidden, norm_eps=args["rmsnorm_eps"])
    margs.dtype = torch.float32
    with torch.device("meta"):
        model = fm.Transformer(margs)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))
    sd = {"tok_embeddings.weight": t(state["transformer.wtes.0.weight"]), "pos_embeddings.weight": t(state["transformer.wpe.weight"]),
          "speaker_cond_pos.weight": t(state["speaker_cond_pos.weight"]), "norm.weight": t(state["transformer.ln_f.weight"])}
    sd["output.weight"] = sd["tok_embeddings.weight"]
    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}."
        sd.update({f"layers.{i}.attention_norm.weight": t(state[h + "ln_1.weight"]),
                   f"layers.{i}.ffn_norm.weight": t(state[h + "ln_2.weight"]),
                   f"layers.{i}.attention.wqkv.weight": t(state[h + "attn.c_attn.weight"]),
                   f"layers.{i}.attention.wo.weight": t(state[h + "attn.c_proj.weight"]),
                   f"layers.{i}.feed_forward.swiglu.w1.weight": t(state[h + "mlp.swiglu.w1.weight"]),
                   f"layers.{i}.feed_forward.swiglu.w3.weight": t(state[h + "mlp.swiglu.w3.weight"]),
                   f"layers.{i}.feed_forward.w2.weight": t(state[h + "mlp.c_proj.weight"])})
    model.load_state_dict(sd, assign=True)
    model = model.eval()
    model.setup_spk_cond_mask()
    model.setup_caches(max_batch_size=2, max_seq_length=args["block_size"])
    prompt = torch.tensor(tts.tokenizers[0].encode(TEXT), dtype=torch.int)
    spk = torch.from_numpy(embedding[None].astype(np.float32))
    kwargs = dict(temperature=torch.tensor(1.0), top_k=None, top_p=torch.tensor(0.95), guidance_scale=torch.tensor(3.0),
                  end_of_audio_token=args["vocab_sizes"][0] + 1)  # never produced: decode exactly new_tokens

    def stage1(n=new_tokens):
        seq = fiu.generate(model, prompt, spk, max_new_tokens=n, **kwargs)
        assert int(seq.numel()) - int(prompt.numel()) == n

    out["stage1"] = stage1

    # Stage 2: the reference GPT, non-causal sampling over a full block (top-k 200).
    ck2 = ckpts["second_stage"]
    a2 = dict(ck2["model_args"])
    gcfg = ref_model.GPTConfig(**{k: v for k, v in a2.items() if k in ref_model.GPTConfig.__dataclass_fields__})
    gpt2 = ref_model.GPT(gcfg, speaker_emb_dim=embedding.shape[0]).eval()
    gpt2.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ck2["model"].items()})
    text2 = tts.tokenizers[1].encode(TEXT)
    rng = np.random.default_rng(0)
    from mvjax.text.layout import build_second_stage_input

    codebooks = rng.integers(0, 1024, (2, frames))
    x = torch.from_numpy(build_second_stage_input(text2, codebooks, gcfg.block_size, 1024)[None])
    out["stage2"] = lambda: gpt2._non_causal_sample(idx=x, speaker_embs=spk, temperature=1.0, top_k=200)

    # Codec: the encodec package's 24 kHz model with the same weights.
    if "torchaudio" not in sys.modules:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")  # encodec imports it for file helpers only
    from encodec import EncodecModel

    codec = EncodecModel.encodec_model_24khz(pretrained=False)
    codec.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ckpts["encodec"].items()})
    codec.eval()
    codes = torch.from_numpy(rng.integers(0, 1024, (1, 8, frames)))

    def ref_decode():
        latent = codec.quantizer.decode(codes.transpose(0, 1))
        return codec.decoder(latent)

    out["codec"] = ref_decode
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["tiny", "released"], default="released")
    parser.add_argument("--seconds", type=float, default=2.0, help="nominal audio length (2 first-stage tokens per frame)")
    parser.add_argument("--tokens", type=int, default=None, help="first-stage tokens (overrides --seconds)")
    parser.add_argument("--decoder", choices=["encodec", "mbd"], default="encodec")
    parser.add_argument("--unet", choices=["tiny", "realistic"], default="realistic", help="MBD band size (--decoder mbd)")
    parser.add_argument("--quantize", choices=["int8", "int4", "bf16"], default=None, help="first-stage weights")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side after the first (median reported)")
    parser.add_argument("--reference-src", type=Path, help="metavoice-src checkout: time the reference too")
    parser.add_argument("--reference-compile", action="store_true",
                        help="compile the reference's first stage as its TTS class does (torch.compile max-autotune)")
    parser.add_argument("--first-call-tokens", type=int, default=None,
                        help="first-stage tokens of the first (compiling) call on both sides (default: the timed count)")
    parser.add_argument("--throughput", type=int, default=0, help="also synthesise this many texts as one batch")
    args = parser.parse_args(argv)

    import jax

    print(f"devices: {jax.devices()}")
    t = time.perf_counter()
    ckpts = released_checkpoints(args.config)
    tts = build_ours(ckpts, args.unet, args.decoder, args.quantize)
    print(f"built and converted {args.config} models in {time.perf_counter() - t:.1f} s; memory {memory_mb()}", flush=True)
    frame_rate = tts.codec.config.frame_rate
    new_tokens = args.tokens or int(round(args.seconds * frame_rate * 2))
    frames = new_tokens // 2
    audio_s = frames / frame_rate
    emb, speaker_s, speaker_compile = speaker_timing(tts)
    synth = ours_synthesizer(tts, emb, new_tokens, args.decoder)
    ref_calls = None
    ref_mode = "torch.compile max-autotune first stage" if args.reference_compile else "eager"
    if args.reference_src:
        ref_calls = reference_stages(args.reference_src, ckpts, tts, new_tokens, frames, emb,
                                     compile=args.reference_compile)
    print(f"timing rule (both sides): one first call from cold (compile included), then the median of "
          f"{args.repeats} runs per stage, ours and the reference interleaved run by run", flush=True)

    first_tokens = args.first_call_tokens or new_tokens

    def ref_round(label, first=False):
        times = {}
        for stage, call in ref_calls.items():
            t = time.perf_counter()
            call(first_tokens) if first and stage == "stage1" else call()
            times[stage] = time.perf_counter() - t
        print(f"  [reference] {label}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()), flush=True)
        return times

    first_total, first_stages, spoken = synth(0, first_tokens)
    print(f"  [ours] first call ({first_tokens} tokens): {first_total:.2f} s ({', '.join(f'{k} {v:.2f}' for k, v in first_stages.items())})",
          flush=True)
    ref_first = ref_round(f"first call ({first_tokens} tokens)", first=True) if ref_calls else None
    ours_runs, ref_runs = [], []
    for r in range(args.repeats):
        total, stages, spoken = synth(1 + r)
        ours_runs.append(stages)
        print(f"  [ours] run {r + 1}/{args.repeats}: {total:.2f} s "
              f"({', '.join(f'{k} {v:.2f}' for k, v in stages.items())})", flush=True)
        if ref_calls:
            ref_runs.append(ref_round(f"run {r + 1}/{args.repeats}"))
    ours_stages = _median_stages(ours_runs)
    print(f"\nours ({args.config}, {args.decoder}, {args.quantize or 'float32'}): {new_tokens} first-stage tokens = "
          f"{audio_s:.2f} s of audio for a trained model (the random one spoke {spoken} frames)")
    # A random first stage emits few codec frames, so the decoders are timed on the nominal length.
    dec_first, decoded = time_decoders(tts, frames, args.decoder, args.repeats)
    ours_stages.update(decoded)
    # First call: the first synthesis's stage times (compile included); the decoders' is the larger
    # of that and their first call at the nominal length.
    for k, v in dec_first.items():
        first_stages[k] = max(first_stages.get(k, 0.0), v)
    e2e = ("stage1", "stage2", "codec")
    ours_e2e = sum(ours_stages[s] for s in e2e)
    ours_first = sum(first_stages[s] for s in e2e)
    lines = [("ours", "speaker", speaker_s, speaker_s / audio_s)]
    lines += [("ours", k, v, v / audio_s) for k, v in ours_stages.items() if k != "speaker"]  # embedding passed in
    lines.append(("ours", "end_to_end", ours_e2e, ours_e2e / audio_s))
    if ref_calls:
        ref = _median_stages(ref_runs)
        ref["end_to_end"] = sum(ref[s] for s in e2e)
        ref_first["end_to_end"] = sum(ref_first[s] for s in e2e)
        lines += [("reference", k, v, v / audio_s) for k, v in ref.items()]
    print(f"{'side':10s} {'stage':12s} {'seconds':>9s} {'RTF':>8s} {'first call':>11s}")
    for side, stage, seconds, rtf in lines:
        if side == "ours":
            fc = {"end_to_end": ours_first, "speaker": speaker_s + speaker_compile}.get(stage, first_stages.get(stage))
        else:
            fc = ref_first[stage]
        print(f"{side:10s} {stage:12s} {seconds:9.3f} {rtf:8.3f} {fc:11.3f}")
    if ref_calls:
        for stage in e2e:
            print(f"speedup {stage}: {ref[stage] / ours_stages[stage]:.2f}x")
        print(f"speedup stage1+stage2+codec ({args.quantize or 'float32'} vs reference {ref_mode}, {new_tokens} "
              f"tokens, median of {args.repeats}): {ref['end_to_end'] / ours_e2e:.2f}x "
              f"(ours {ours_e2e:.2f} s, reference {ref['end_to_end']:.2f} s, same weights and token counts)")
        print(f"first call incl. compile ({first_tokens} first-stage tokens), stage1+stage2+codec: ours {ours_first:.2f} s, reference "
              f"{ref_first['end_to_end']:.2f} s ({ref_first['end_to_end'] / ours_first:.2f}x)")
    if args.throughput:
        from mvjax.inference.throughput import plan_batch_sizes

        plan = plan_batch_sizes(tts, frames=spoken, decoder=args.decoder)
        print(f"\nthroughput: batch sizes {plan}")
        texts = [f"{TEXT} Number {i}." for i in range(args.throughput)]
        kw = dict(max_new_tokens=new_tokens, decoder=args.decoder, long_form=False, batch_size=plan)
        tts.synthesize(texts, emb, **kw)  # compiles the batch shapes
        t = time.perf_counter()
        tts.synthesize(texts, emb, **{**kw, "seed": 9})
        seconds = time.perf_counter() - t
        print(f"throughput: {len(texts)} utterances in {seconds:.1f} s = {60 * len(texts) / seconds:.1f} utterances/min")
    mem = memory_mb()
    print(f"memory: resident {mem.get('VmRSS', 0):.0f} MB, peak {mem.get('VmHWM', 0):.0f} MB")
    for side, stage, seconds, rtf in lines:
        print(f"pipeline side={side} stage={stage} seconds={seconds:.4f} rtf={rtf:.4f}")
    print(f"pipeline side=ours stage=first_call seconds={ours_first:.4f}")
    if ref_calls:
        print(f"pipeline side=reference stage=first_call seconds={ref_first['end_to_end']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
