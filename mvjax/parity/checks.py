"""The parity checks, one function per component, and :func:`run` / :func:`run_checks` that run them on a
fixture directory and report one line per check (the command is :mod:`mvjax.parity.__main__`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np

from mvjax.audio.bands import split_bands
from mvjax.audio.io import load_audio
from mvjax.core.precision import apply as apply_precision
from mvjax.inference.decode import FirstStageDecoder
from mvjax.inference.diffusion import MultiBandDiffusion, re_eq
from mvjax.inference.keys import utterance_keys
from mvjax.inference.options import SamplingConfig
from mvjax.inference.pipeline import TTS
from mvjax.nn import encodec
from mvjax.nn.diffusion_unet import unet_apply
from mvjax.nn.gpt import forward
from mvjax.parity import COMPONENTS
from mvjax.parity.finetune import check_finetune
from mvjax.parity.fixture import (
    COMPONENT_FILES,
    ENCODE_CODE_TOLERANCE,
    GREEDY_MARGIN,
    Check,
    Fixture,
    FixtureError,
    close_check,
    cosine_checks,
    exact_check,
    within_check,
)
from mvjax.text.layout import build_second_stage_input, split_first_stage_tokens, tilted_decode
from mvjax.text.tokenizer import normalize_text


def check_tokenizer(fx: Fixture) -> Iterator[Check]:
    s1 = fx.npz("stage1/stage1_cases.npz")
    _, _, tok1 = fx.stage("first_stage")
    ids = [tok1.encode(normalize_text(str(t))) for t in s1["texts"]]
    yield exact_check("tokenizer", "stage1-lengths", [len(i) for i in ids], s1["tok_lengths"])
    yield exact_check("tokenizer", "stage1-ids", np.concatenate(ids), s1["tok_ids"])

    s2 = fx.npz("stage2/stage2_cases.npz")
    cfg2, _, tok2 = fx.stage("second_stage")
    for b, text in enumerate(s2["texts"]):
        got = np.asarray(tok2.encode(normalize_text(str(text))))
        ref = s2["input"][b, 0, : min(got.size, s2["input"].shape[-1])]
        yield exact_check("tokenizer", f"stage2-ids[{b}]", got[: ref.size], ref)

    codebook_size = (tok1.offset - 1) // 2
    for g in fx.gen_cases():
        _, audio = split_first_stage_tokens(s1[f"{g}_seq"], codebook_size)
        yield exact_check("tokenizer", f"stage1-adapter[{g}]", audio, s1[f"{g}_audio_tokens"])

    pad = tok2.offset - 1
    for b in range(s2["input"].shape[0]):
        text_ids, audio = tilted_decode(np.concatenate([s2["input"][b], s2["greedy"][b]]), pad)
        yield exact_check("tokenizer", f"stage2-adapter-audio[{b}]", np.asarray(audio), s2[f"row{b}_tilted_audio"])
        yield exact_check("tokenizer", f"stage2-adapter-text[{b}]", np.asarray(text_ids), s2[f"row{b}_tilted_text_ids"])


def check_stage1_forward(fx: Fixture) -> Iterator[Check]:
    s1 = fx.npz("stage1/stage1_cases.npz")
    cfg, params, _ = fx.stage("first_stage")
    idx, spk = s1["fwd_idx"], s1["fwd_spk"]
    cond = forward(cfg, params, idx, spk)[0]
    uncond = forward(cfg, params, idx, None)[0]
    yield close_check("stage1-forward", "logits-cond", cond, s1["fwd_logits_cond"], 1e-4)
    yield close_check("stage1-forward", "logits-uncond", uncond, s1["fwd_logits_uncond"], 1e-4)


def check_stage2(fx: Fixture) -> Iterator[Check]:
    s2 = fx.npz("stage2/stage2_cases.npz")
    cfg, params, tok = fx.stage("second_stage")
    pad = tok.offset - 1
    built = np.stack([
        build_second_stage_input(tok.encode(normalize_text(str(t))), s2[f"row{b}_audio2"], cfg.block_size, pad)
        for b, t in enumerate(s2["texts"])
    ])
    yield exact_check("stage2", "frames", [s2[f"row{b}_audio2"].shape[-1] for b in range(len(s2["texts"]))],
                 [int(s2[f"row{b}_frames"]) for b in range(len(s2["texts"]))])
    yield exact_check("stage2", "input", built, s2["input"])
    spk = s2["spk"] if cfg.speaker_emb_dim is not None else None
    logits = np.stack([np.asarray(x) for x in forward(cfg, params, s2["input"], spk)], axis=1)
    yield close_check("stage2", "logits", logits, s2["logits"], 1e-4)
    yield exact_check("stage2", "greedy", logits.argmax(-1), s2["greedy"], where=s2["margins"] > GREEDY_MARGIN)


def check_speaker(fx: Fixture) -> Iterator[Check]:
    sp = fx.npz("speaker/speaker_cases.npz")
    wav_path = fx.root / "speaker" / "reference_speaker.wav"
    if not wav_path.is_file():
        raise FixtureError("missing fixture file speaker/reference_speaker.wav")
    encoder = fx.speaker_encoder()
    audio, rate = load_audio(wav_path)
    wav16, trimmed = encoder.preprocess(audio, rate)
    yield within_check("speaker", "wav16", wav16, sp["wav16"], 1e-4)
    yield within_check("speaker", "trimmed", trimmed, sp["trimmed"], 1e-4)
    # Features and embeddings from the reference's trimmed audio, so each stage is judged on its own.
    utt = encoder.embed_utterance(sp["trimmed"])
    yield exact_check("speaker", "slice-starts", np.array([a for a, _ in utt.slices]), sp["mel_slice_starts"])
    yield within_check("speaker", "mels", utt.mels, sp["mels"], 1e-3 * float(np.abs(sp["mels"]).max()))
    yield from cosine_checks("speaker", "partial-embeds", utt.partial_embeddings, sp["partial_embeds"])
    yield from cosine_checks("speaker", "embedding", utt.embedding, sp["embedding"])
    short = encoder.embed_utterance(sp["trimmed"][: 3 * encoder.config.sample_rate])
    yield from cosine_checks("speaker", "short3s-embedding", short.embedding, sp["short3s_embedding"])


def check_encodec(fx: Fixture) -> Iterator[Check]:
    mb = fx.npz("mbd/mbd_cases.npz")
    digest, cfg, params = fx.encodec()
    same = digest == str(mb["encodec_state_sha256"])
    yield Check("encodec", "recipe-sha256", same, 0.0 if same else 1.0, 0.0,
                "" if same else "the rebuilt codec differs from the fixture's: recipe or package mismatch, not our bug")
    latent = np.asarray(encodec.codes_to_latent(params, mb["tokens"]))
    yield within_check("encodec", "latent", latent, mb["latent"], 1e-4 * float(np.abs(mb["latent"]).max()))
    wav = np.asarray(jax.jit(lambda p, x: encodec.decode_latent(cfg, p, x))(params, mb["latent"]))
    yield within_check("encodec", "decode", wav, mb["wav_encodec"], 1e-4 * float(np.abs(mb["wav_encodec"]).max()))
    n_q = mb["encode_codes"].shape[1]
    codes = np.asarray(jax.jit(lambda p, x: encodec.latent_to_codes(p, encodec.encode_latent(cfg, p, x), n_q))(
        params, mb["encode_in"]))
    if codes.shape != mb["encode_codes"].shape:
        yield Check("encodec", "encode-codes", False, float("inf"), 0.01, f"shape {codes.shape} != {mb['encode_codes'].shape}")
    else:
        # Encoding ends in nearest-neighbour searches over 1024 codewords per quantizer. Where two
        # codewords are within float32 rounding of the residual, either choice is a faithful
        # float32 result, and the flip changes the residual that every later quantizer sees. The
        # fixture stores no margins to mask such frames, so up to 1 % of codes may differ
        # (measured: 0 on the shared fixtures); decoding (above) is compared value by value.
        mismatch = float(np.mean(codes != mb["encode_codes"]))
        yield Check("encodec", "encode-codes", mismatch <= ENCODE_CODE_TOLERANCE, mismatch, ENCODE_CODE_TOLERANCE,
                    "fraction of codes that differ")


def check_splitbands(fx: Fixture) -> Iterator[Check]:
    """julius SplitBands at the codec rate, 8 and 32 bands (the band processor's and the EQ's)."""
    mb = fx.npz("mbd/mbd_cases.npz")
    for n in (8, 32):
        got = split_bands(mb["splitbands_in"], 24000, n)
        yield within_check("mbd", f"splitbands{n}", got, mb[f"splitbands{n}_out"], 1e-5)


def check_mbd(fx: Fixture) -> Iterator[Check]:
    """Band splitting, each band's U-Net at step 500, and the whole sampler + re-EQ with the fixture's noises."""
    yield from check_splitbands(fx)
    mb = fx.npz("mbd/mbd_cases.npz")
    config, params = fx.mbd()
    for b, band in enumerate(config.bands):
        key = f"unet{b}_out_step500"
        cfg = band.unet
        out = jax.jit(lambda p, x, c, cfg=cfg: unet_apply(cfg, p, x, 500, c))(params[f"band_{b}"], mb["unet_in"], mb["latent"])
        yield within_check("mbd", f"unet{b}-step500", out, mb[key], 1e-4 * float(np.abs(mb[key]).max()))
    model = MultiBandDiffusion(config, params)
    if model.noise_count() != mb["noises"].shape[0]:
        yield Check("mbd", "noise-count", False, float("inf"), 0.0,
                    f"sampler draws {model.noise_count()} noises, the fixture holds {mb['noises'].shape[0]}")
        return
    diffused = model.generate(mb["latent"], mb["wav_encodec"].shape, noises=mb["noises"])
    yield within_check("mbd", "wav-diffusion", diffused, mb["wav_diffusion"], 1e-3 * float(np.abs(mb["wav_diffusion"]).max()))
    wav = re_eq(diffused, mb["wav_encodec"], model.sample_rate)
    yield within_check("mbd", "wav", wav, mb["wav"], 1e-3 * float(np.abs(mb["wav"]).max()))


def _first_stage_decoder(fx: Fixture):
    cfg, params, tok = fx.stage("first_stage")
    return FirstStageDecoder(cfg, params, end_of_audio=tok.offset - 1)


def check_stage1_decode(fx: Fixture) -> Iterator[Check]:
    """The reference fast path, greedy: sequences exact, guided step logits close."""
    s1 = fx.npz("stage1/stage1_cases.npz")
    decoder = _first_stage_decoder(fx)
    for g in fx.gen_cases():
        top_p = float(s1[f"{g}_top_p"])
        sampling = SamplingConfig(
            guidance_scale=float(s1[f"{g}_guidance"]), temperature=0.0, top_p=top_p if top_p > 0 else None
        )
        result = decoder.generate(
            [s1[f"{g}_prompt"].tolist()], s1[f"{g}_spk"], utterance_keys(0, 1), sampling,
            max_new_tokens=int(s1[f"{g}_max_new_tokens"]), return_logits=True,
        )
        yield exact_check("stage1-decode", f"{g}-seq", result.sequences[0], s1[f"{g}_seq"])
        ref_logits = s1[f"{g}_step_logits"]
        got = result.step_logits[0]
        check = close_check("stage1-decode", f"{g}-step-logits", got, ref_logits, 1e-4)
        margin = float(s1[f"{g}_margin"])
        if margin < GREEDY_MARGIN:
            check.note = f"reference greedy margin {margin:.2g} is below {GREEDY_MARGIN:g}"
        yield check


def check_stage1_batch(fx: Fixture) -> Iterator[Check]:
    """Three prompts of different lengths in one call, greedy, against the reference batched sampler."""
    s1 = fx.npz("stage1/stage1_cases.npz")
    decoder = _first_stage_decoder(fx)
    prompts_in, lens, ref = s1["batch_prompt"], s1["batch_lens"], s1["batch_out"]
    total = ref.shape[-1]
    prompts = [prompts_in[i, 0, : lens[i]].tolist() for i in range(len(lens))]
    result = decoder.generate(
        prompts, s1["batch_spk"], utterance_keys(0, len(prompts)), SamplingConfig(guidance_scale=3.0, temperature=0.0, top_p=None),
        max_new_tokens=[total - int(n) for n in lens],
    )
    out = np.full(ref.shape, decoder.end_of_audio, np.int64)  # the reference pads finished rows with end of audio
    for i, seq in enumerate(result.sequences):
        out[i, 0, : len(seq)] = seq[:total]
    yield exact_check("stage1-batch", "batch-out", out, ref)


def check_pipeline(fx: Fixture) -> Iterator[Check]:
    """Speaker embedding from the fixture voice, then both stages through :class:`mvjax.inference.pipeline.TTS`
    (greedy, the case's guidance / top-p / max_new_tokens, no chunking)."""
    p = fx.npz("pipeline_cases.npz")
    wav_path = fx.root / "speaker" / "reference_speaker.wav"
    if not wav_path.is_file():
        raise FixtureError("missing fixture file speaker/reference_speaker.wav")
    model = fx.cached("pipeline-model", lambda: fx.assembled(
        "pipeline", [("stage1", "first_stage.pt"), ("stage2", "second_stage.pt"), ("speaker", "speaker_encoder.pt")]))
    tts = TTS.load(model, mesh=None, speaker_cache_dir=None)
    embedding = tts.speaker_embedding(wav_path)
    yield from cosine_checks("pipeline", "speaker-embedding", embedding, p["spk_emb"])
    top_p = float(p["top_p"])
    top_p = top_p if top_p > 0 else None
    speech = tts.tokens(
        str(p["text"]), embedding, temperature=0.0, stage2_temperature=0.0, guidance_scale=float(p["guidance"]),
        top_p=top_p, max_new_tokens=int(p["max_new_tokens"]), long_form=False,
    )
    # The whole first-stage sequence (prompt, then every sampled token) from the same decoder.
    prompt = tts.tokenizers[0].encode(normalize_text(str(p["text"])))
    result = tts.first_stage_decoder.generate(
        [prompt], embedding[None], utterance_keys(0, 1),
        SamplingConfig(guidance_scale=float(p["guidance"]), temperature=0.0, top_p=top_p),
        max_new_tokens=int(p["max_new_tokens"]),
    )
    seq = exact_check("pipeline", "stage1-seq", result.sequences[0], p["stage1_seq"])
    if float(p["stage1_margin"]) < GREEDY_MARGIN:
        seq.note += f"; reference stage-1 margin {float(p['stage1_margin']):.2g} is below {GREEDY_MARGIN:g}"
    yield seq
    yield exact_check("pipeline", "first-stage-tokens", speech.first_stage_codes, p["first_stage_tokens"])
    yield exact_check("pipeline", "stage2-audio-start", [speech.chunks[0].prompt_tokens], [int(p["stage2_audio_start"])])
    margin = float(p["stage2_margin"])
    check = exact_check("pipeline", "all-codebooks", speech.all_codebooks, p["all_codebooks"])
    if margin < GREEDY_MARGIN:
        check.note += f"; reference stage-2 margin {margin:.2g} is below {GREEDY_MARGIN:g}"
    yield check


CHECKS: dict[str, Callable[[Fixture], Iterator[Check]]] = {
    "tokenizer": check_tokenizer,
    "stage1-forward": check_stage1_forward,
    "stage1-decode": check_stage1_decode,
    "stage1-batch": check_stage1_batch,
    "stage2": check_stage2,
    "speaker": check_speaker,
    "encodec": check_encodec,
    "mbd": check_mbd,
    "pipeline": check_pipeline,
    "finetune": check_finetune,
}


def run(fixture_dir: str | Path, only: list[str] | None = None, emit: Callable[[str], None] = print,
        matmul_precision: str | None = None) -> list[Check]:
    """Run the checks of ``only`` (default: every component) at the runtime's matmul policy
    (:mod:`mvjax.core.precision`; ``matmul_precision`` overrides it like the CLIs' flag)."""
    policy = apply_precision(matmul_precision)
    emit(f"matmul precision: {policy}")
    root = Path(fixture_dir)
    if not root.is_dir():
        raise FixtureError(f"fixture directory not found: {root}")
    with tempfile.TemporaryDirectory(prefix="mvjax-parity-") as tmp:
        return run_checks(Fixture(root, Path(tmp)), only, emit)


def run_checks(fx: Fixture, only: list[str] | None = None, emit: Callable[[str], None] = print) -> list[Check]:
    """The checks of ``only`` on an open :class:`Fixture`; a component whose fixture files lack a
    documented array FAILs, naming every missing one, without running."""
    results: list[Check] = []

    def record(check: Check) -> None:
        results.append(check)
        emit(check.line())

    for component in only or list(COMPONENTS):
        fn = CHECKS.get(component)
        if fn is None:
            record(Check(component, "all", False, float("nan"), float("nan"), "not implemented yet"))
            continue
        try:
            missing = [f"{rel} lacks {key!r}" for rel in COMPONENT_FILES[component] for key in fx.missing_keys(rel)]
            if missing:
                record(Check(component, "fixture", False, float("nan"), float("nan"), "; ".join(missing)))
                continue
            for check in fn(fx):
                record(check)
        except FixtureError as exc:
            record(Check(component, "fixture", False, float("nan"), float("nan"), str(exc)))
    return results
