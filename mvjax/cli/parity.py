"""Check mvjax against a reference fixture directory.

    python -m mvjax.parity FIXTURE_DIR [--only tokenizer,stage1-forward,stage2]

The fixture directory has the layout of ``shared/fixtures/metavoice_ref`` (see its
README): released-layout checkpoints with small random weights and the arrays the
original PyTorch code produced from them. The checkpoints are converted with our
converter into a temporary directory, loaded through the normal runtime path, and
every check prints one line::

    PASS|FAIL <component> <check> max_err=<x> tol=<y>

The exit status is non-zero when any requested check fails or a requested
component is not implemented yet. Every size is read from the fixture files.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mvjax.core.errors import MvjaxError

COMPONENTS = (
    "tokenizer",
    "stage1-forward",
    "stage1-decode",
    "stage1-batch",
    "stage2",
    "speaker",
    "encodec",
    "mbd",
    "pipeline",
)
# Margin below which a greedy token is too close to call, per the fixture README.
GREEDY_MARGIN = 1e-3
# Fraction of EnCodec encoder codes allowed to differ (near-tie nearest-codeword choices; see check_encodec).
ENCODE_CODE_TOLERANCE = 0.01


@dataclasses.dataclass
class Check:
    component: str
    name: str
    passed: bool
    max_err: float
    tol: float
    note: str = ""

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        text = f"{status} {self.component} {self.name} max_err={self.max_err:.3g} tol={self.tol:.3g}"
        return f"{text} ({self.note})" if self.note else text


class FixtureError(MvjaxError, RuntimeError):
    """A fixture file or array needed by a check is missing."""


class FixtureArrays(dict):
    """The arrays of one fixture ``.npz``; reading an absent key is a :class:`FixtureError` naming it."""

    def __init__(self, rel: str, arrays: dict):
        super().__init__(arrays)
        self.rel = rel

    def __missing__(self, key):
        raise FixtureError(f"{self.rel} lacks {key!r}")


# Every array the fixture README documents, per file, as the checks read them. ``{g}``: each
# decoding case (gen0, gen1, ... at least the two documented), ``{b}``: each stage-2 row,
# ``{u}``: each diffusion band of the checkpoint. A missing one FAILs the components that use
# the file, naming it, before anything runs: no check may vanish with its data.
DOCUMENTED_KEYS = {
    "stage1/stage1_cases.npz": [
        "texts", "tok_lengths", "tok_ids", "fwd_idx", "fwd_spk", "fwd_logits_cond", "fwd_logits_uncond",
        *(f"{{g}}_{k}" for k in ("prompt", "spk", "guidance", "top_p", "max_new_tokens", "seq", "step_logits",
                                 "margin", "audio_tokens")),
        "batch_prompt", "batch_lens", "batch_spk", "batch_out",
    ],
    "stage2/stage2_cases.npz": [
        "texts", "input", "spk", "logits", "greedy", "margins",
        "row{b}_audio2", "row{b}_frames", "row{b}_tilted_audio", "row{b}_tilted_text_ids",
    ],
    "speaker/speaker_cases.npz": [
        "wav16", "trimmed", "mel_slice_starts", "mels", "partial_embeds", "embedding", "short3s_embedding",
    ],
    "mbd/mbd_cases.npz": [
        "tokens", "latent", "wav_encodec", "unet_in", "unet{u}_out_step500", "noises", "wav_diffusion", "wav",
        "splitbands_in", "splitbands8_out", "splitbands32_out", "encode_in", "encode_codes", "encodec_seed",
        "encodec_state_sha256",
    ],
    "pipeline_cases.npz": [
        "text", "spk_emb", "stage1_seq", "first_stage_tokens", "stage2_audio_start", "all_codebooks",
        "stage1_margin", "stage2_margin", "guidance", "top_p", "max_new_tokens",
    ],
}
# The documented decoding cases of stage1_cases.npz; further gen<i>_seq cases are checked too.
DOCUMENTED_GEN_CASES = ("gen0", "gen1")
# Which fixture files each component reads.
COMPONENT_FILES = {
    "tokenizer": ("stage1/stage1_cases.npz", "stage2/stage2_cases.npz"),
    "stage1-forward": ("stage1/stage1_cases.npz",),
    "stage1-decode": ("stage1/stage1_cases.npz",),
    "stage1-batch": ("stage1/stage1_cases.npz",),
    "stage2": ("stage2/stage2_cases.npz",),
    "speaker": ("speaker/speaker_cases.npz",),
    "encodec": ("mbd/mbd_cases.npz",),
    "mbd": ("mbd/mbd_cases.npz",),
    "pipeline": ("pipeline_cases.npz",),
}


def _close(component: str, name: str, got, ref, rel_tol: float) -> Check:
    """max|got - ref| <= rel_tol * max(1, max|ref|)."""
    return _within(component, name, got, ref, rel_tol * max(1.0, float(np.abs(np.asarray(ref)).max())))


def _within(component: str, name: str, got, ref, tol: float) -> Check:
    """max|got - ref| <= tol (absolute)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return Check(component, name, False, float("inf"), tol, f"shape {got.shape} != {ref.shape}")
    err = float(np.abs(got - ref).max())
    return Check(component, name, bool(err <= tol), err, tol)


def _exact(component: str, name: str, got, ref, where=None) -> Check:
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return Check(component, name, False, float("inf"), 0.0, f"shape {got.shape} != {ref.shape}")
    diff = got != ref
    compared = ref.size
    if where is not None:
        diff = diff & where
        compared = int(np.sum(where))
    if compared == 0:  # a check that compares nothing proves nothing
        return Check(component, name, False, float("nan"), 0.0, "nothing to compare (every position masked out)")
    wrong = int(diff.sum())
    err = float(np.abs(got.astype(np.int64) - ref.astype(np.int64))[diff].max()) if wrong else 0.0
    return Check(component, name, wrong == 0, err, 0.0, f"{wrong}/{compared} differ" if wrong else f"{compared} compared")


def _cosine(component: str, name: str, got, ref, min_cos: float = 0.9999, max_abs: float = 1e-3) -> list[Check]:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return [Check(component, name, False, float("inf"), max_abs, f"shape {got.shape} != {ref.shape}")]
    g, r = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
    cos = float(np.min(np.sum(g * r, -1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(r, axis=-1))))
    err = float(np.abs(got - ref).max())
    return [
        Check(component, f"{name}-cosine", cos >= min_cos, 1.0 - cos, 1.0 - min_cos),
        Check(component, f"{name}-max-abs", err <= max_abs, err, max_abs),
    ]


class Fixture:
    """Lazily converts and loads what the checks need from one fixture directory."""

    def __init__(self, root: Path, workdir: Path):
        self.root = root
        self.workdir = workdir
        self._cache: dict[str, object] = {}
        self._npz: dict[str, dict] = {}

    def npz(self, rel: str) -> dict:
        if rel not in self._npz:
            path = self.root / rel
            if not path.is_file():
                raise FixtureError(f"missing fixture file {rel}")
            with np.load(path, allow_pickle=False) as data:
                self._npz[rel] = FixtureArrays(rel, {k: data[k] for k in data.files})
        return self._npz[rel]

    def gen_cases(self) -> list[str]:
        """The stage-1 decoding cases: the documented gen0, gen1 and any further gen<i> present."""
        s1 = self.npz("stage1/stage1_cases.npz")
        extra = {k.split("_")[0] for k in s1 if k.startswith("gen") and k.endswith("_seq")}
        return sorted(set(DOCUMENTED_GEN_CASES) | extra, key=lambda g: int(g[3:]) if g[3:].isdigit() else 0)

    def missing_keys(self, rel: str) -> list[str]:
        """Documented arrays of ``rel`` that the file lacks (``{g}``/``{b}``/``{u}`` expanded)."""
        data = self.npz(rel)
        names = []
        for key in DOCUMENTED_KEYS[rel]:
            if "{g}" in key:
                names += [key.format(g=g) for g in self.gen_cases()]
            elif "{b}" in key:
                rows = data["input"].shape[0] if "input" in data else len(data.get("texts", ()))
                names += [key.format(b=b) for b in range(rows)]
            elif "{u}" in key:
                names += [key.format(u=u) for u in range(self.mbd_band_count())]
            else:
                names.append(key)
        return [k for k in names if k not in data]

    def mbd_band_count(self) -> int:
        config, _ = self.mbd()
        return int(config["n_bands"])

    def converted(self, sub: str, filename: str, name: str) -> Path:
        """Convert ``sub/filename`` of the fixture with our converter (once); the model directory."""
        out = self.workdir / name
        if not out.exists():
            from convert_weights.convert import convert_directory

            if not (self.root / sub / filename).is_file():
                raise FixtureError(f"missing fixture file {sub}/{filename}")
            convert_directory(self.root / sub, out)
        return out

    def assembled(self, name: str, files: list[tuple[str, str]]) -> Path:
        """Several fixture checkpoints ((subdirectory, file name) pairs) converted into one model directory."""
        from convert_weights.convert import convert_directory

        src = self.workdir / f"{name}-released"
        src.mkdir()
        for sub, filename in files:
            if not (self.root / sub / filename).is_file():
                raise FixtureError(f"missing fixture file {sub}/{filename}")
            (src / filename).symlink_to((self.root / sub / filename).absolute())
        out = self.workdir / name
        convert_directory(src, out)
        return out

    def cached(self, name: str, build):
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    def stage(self, name: str):
        """(config, params, tokenizer) of ``first_stage`` / ``second_stage``."""
        from mvjax.io.checkpoint import load_gpt_stage

        sub = {"first_stage": "stage1", "second_stage": "stage2"}[name]
        return self.cached(name, lambda: load_gpt_stage(self.converted(sub, f"{name}.pt", name), name, verify=True))

    def speaker_encoder(self):
        from mvjax.inference.speaker import SpeakerEncoder

        return self.cached("speaker", lambda: SpeakerEncoder.load(
            self.converted("speaker", "speaker_encoder.pt", "speaker_encoder"), cache_dir=None))

    def mbd(self):
        from mvjax.io.checkpoint import load_mbd

        return self.cached("mbd", lambda: load_mbd(self.converted("mbd", "mbd_comp_8.pt", "mbd"), verify=True))

    def encodec(self):
        """(recipe digest, config, params) of the fixture recipe's random codec, rebuilt with torch + encodec."""
        return self.cached("encodec", self._build_encodec)

    def _build_encodec(self):
        import subprocess

        from convert_weights.convert import convert_directory
        from mvjax.io.checkpoint import load_encodec

        recipe = self.root / "make_random_encodec.py"
        if not recipe.is_file():
            raise FixtureError("missing fixture file make_random_encodec.py")
        src = self.workdir / "encodec_src"
        src.mkdir(exist_ok=True)
        proc = subprocess.run([sys.executable, str(recipe), str(src / "encodec_24khz-d7cc33bc.th")],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise FixtureError(
                "rebuilding the random codec needs torch and the encodec package "
                f"(pip install torch && pip install --no-deps encodec einops): {last}"
            )
        out = self.workdir / "encodec"
        convert_directory(src, out)
        return (proc.stdout.strip().splitlines()[-1],) + load_encodec(out, verify=True)


# --- Components -----------------------------------------------------------------------


def check_tokenizer(fx: Fixture) -> Iterator[Check]:
    from mvjax.text.layout import split_first_stage_tokens, tilted_decode
    from mvjax.text.tokenizer import normalize_text

    s1 = fx.npz("stage1/stage1_cases.npz")
    _, _, tok1 = fx.stage("first_stage")
    ids = [tok1.encode(normalize_text(str(t))) for t in s1["texts"]]
    yield _exact("tokenizer", "stage1-lengths", [len(i) for i in ids], s1["tok_lengths"])
    yield _exact("tokenizer", "stage1-ids", np.concatenate(ids), s1["tok_ids"])

    s2 = fx.npz("stage2/stage2_cases.npz")
    cfg2, _, tok2 = fx.stage("second_stage")
    for b, text in enumerate(s2["texts"]):
        got = np.asarray(tok2.encode(normalize_text(str(text))))
        ref = s2["input"][b, 0, : min(got.size, s2["input"].shape[-1])]
        yield _exact("tokenizer", f"stage2-ids[{b}]", got[: ref.size], ref)

    codebook_size = (tok1.offset - 1) // 2
    for g in fx.gen_cases():
        _, audio = split_first_stage_tokens(s1[f"{g}_seq"], codebook_size)
        yield _exact("tokenizer", f"stage1-adapter[{g}]", audio, s1[f"{g}_audio_tokens"])

    pad = tok2.offset - 1
    for b in range(s2["input"].shape[0]):
        text_ids, audio = tilted_decode(np.concatenate([s2["input"][b], s2["greedy"][b]]), pad)
        yield _exact("tokenizer", f"stage2-adapter-audio[{b}]", np.asarray(audio), s2[f"row{b}_tilted_audio"])
        yield _exact("tokenizer", f"stage2-adapter-text[{b}]", np.asarray(text_ids), s2[f"row{b}_tilted_text_ids"])


def check_stage1_forward(fx: Fixture) -> Iterator[Check]:
    from mvjax.nn.gpt import forward

    s1 = fx.npz("stage1/stage1_cases.npz")
    cfg, params, _ = fx.stage("first_stage")
    idx, spk = s1["fwd_idx"], s1["fwd_spk"]
    cond = forward(cfg, params, idx, spk)[0]
    uncond = forward(cfg, params, idx, None)[0]
    yield _close("stage1-forward", "logits-cond", cond, s1["fwd_logits_cond"], 1e-4)
    yield _close("stage1-forward", "logits-uncond", uncond, s1["fwd_logits_uncond"], 1e-4)


def check_stage2(fx: Fixture) -> Iterator[Check]:
    from mvjax.nn.gpt import forward
    from mvjax.text.layout import build_second_stage_input
    from mvjax.text.tokenizer import normalize_text

    s2 = fx.npz("stage2/stage2_cases.npz")
    cfg, params, tok = fx.stage("second_stage")
    pad = tok.offset - 1
    built = np.stack([
        build_second_stage_input(tok.encode(normalize_text(str(t))), s2[f"row{b}_audio2"], cfg.block_size, pad)
        for b, t in enumerate(s2["texts"])
    ])
    yield _exact("stage2", "frames", [s2[f"row{b}_audio2"].shape[-1] for b in range(len(s2["texts"]))],
                 [int(s2[f"row{b}_frames"]) for b in range(len(s2["texts"]))])
    yield _exact("stage2", "input", built, s2["input"])
    spk = s2["spk"] if cfg.speaker_emb_dim is not None else None
    logits = np.stack([np.asarray(x) for x in forward(cfg, params, s2["input"], spk)], axis=1)
    yield _close("stage2", "logits", logits, s2["logits"], 1e-4)
    yield _exact("stage2", "greedy", logits.argmax(-1), s2["greedy"], where=s2["margins"] > GREEDY_MARGIN)


def check_speaker(fx: Fixture) -> Iterator[Check]:
    from mvjax.audio.io import load_audio

    sp = fx.npz("speaker/speaker_cases.npz")
    wav_path = fx.root / "speaker" / "reference_speaker.wav"
    if not wav_path.is_file():
        raise FixtureError("missing fixture file speaker/reference_speaker.wav")
    encoder = fx.speaker_encoder()
    audio, rate = load_audio(wav_path)
    wav16, trimmed = encoder.preprocess(audio, rate)
    yield _within("speaker", "wav16", wav16, sp["wav16"], 1e-4)
    yield _within("speaker", "trimmed", trimmed, sp["trimmed"], 1e-4)
    # Features and embeddings from the reference's trimmed audio, so each stage is judged on its own.
    utt = encoder.embed_utterance(sp["trimmed"])
    yield _exact("speaker", "slice-starts", np.array([a for a, _ in utt.slices]), sp["mel_slice_starts"])
    yield _within("speaker", "mels", utt.mels, sp["mels"], 1e-3 * float(np.abs(sp["mels"]).max()))
    yield from _cosine("speaker", "partial-embeds", utt.partial_embeddings, sp["partial_embeds"])
    yield from _cosine("speaker", "embedding", utt.embedding, sp["embedding"])
    short = encoder.embed_utterance(sp["trimmed"][: 3 * encoder.config.sample_rate])
    yield from _cosine("speaker", "short3s-embedding", short.embedding, sp["short3s_embedding"])


def check_encodec(fx: Fixture) -> Iterator[Check]:
    import jax

    from mvjax.nn import encodec

    mb = fx.npz("mbd/mbd_cases.npz")
    digest, cfg, params = fx.encodec()
    same = digest == str(mb["encodec_state_sha256"])
    yield Check("encodec", "recipe-sha256", same, 0.0 if same else 1.0, 0.0,
                "" if same else "the rebuilt codec differs from the fixture's: recipe or package mismatch, not our bug")
    latent = np.asarray(encodec.codes_to_latent(params, mb["tokens"]))
    yield _within("encodec", "latent", latent, mb["latent"], 1e-4 * float(np.abs(mb["latent"]).max()))
    wav = np.asarray(jax.jit(lambda p, x: encodec.decode_latent(cfg, p, x))(params, mb["latent"]))
    yield _within("encodec", "decode", wav, mb["wav_encodec"], 1e-4 * float(np.abs(mb["wav_encodec"]).max()))
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
    from mvjax.audio.bands import split_bands

    mb = fx.npz("mbd/mbd_cases.npz")
    for n in (8, 32):
        got = split_bands(mb["splitbands_in"], 24000, n)
        yield _within("mbd", f"splitbands{n}", got, mb[f"splitbands{n}_out"], 1e-5)


def check_mbd(fx: Fixture) -> Iterator[Check]:
    """Band splitting, each band's U-Net at step 500, and the whole sampler + re-EQ with the fixture's noises."""
    import jax

    from mvjax.inference.diffusion import MultiBandDiffusion, re_eq
    from mvjax.nn.diffusion_unet import UnetConfig, unet_apply

    yield from check_splitbands(fx)
    mb = fx.npz("mbd/mbd_cases.npz")
    config, params = fx.mbd()
    for b, band in enumerate(config["bands"]):
        key = f"unet{b}_out_step500"
        cfg = UnetConfig(**band["unet"])
        out = jax.jit(lambda p, x, c, cfg=cfg: unet_apply(cfg, p, x, 500, c))(params[f"band_{b}"], mb["unet_in"], mb["latent"])
        yield _within("mbd", f"unet{b}-step500", out, mb[key], 1e-4 * float(np.abs(mb[key]).max()))
    model = MultiBandDiffusion(config, params)
    if model.noise_count() != mb["noises"].shape[0]:
        yield Check("mbd", "noise-count", False, float("inf"), 0.0,
                    f"sampler draws {model.noise_count()} noises, the fixture holds {mb['noises'].shape[0]}")
        return
    diffused = model.generate(mb["latent"], mb["wav_encodec"].shape, noises=mb["noises"])
    yield _within("mbd", "wav-diffusion", diffused, mb["wav_diffusion"], 1e-3 * float(np.abs(mb["wav_diffusion"]).max()))
    wav = re_eq(diffused, mb["wav_encodec"], model.sample_rate)
    yield _within("mbd", "wav", wav, mb["wav"], 1e-3 * float(np.abs(mb["wav"]).max()))


def _first_stage_decoder(fx: Fixture):
    from mvjax.inference.decode import FirstStageDecoder

    cfg, params, tok = fx.stage("first_stage")
    return FirstStageDecoder(cfg, params, end_of_audio=tok.offset - 1)


def check_stage1_decode(fx: Fixture) -> Iterator[Check]:
    """The reference fast path, greedy: sequences exact, guided step logits close."""
    from mvjax.inference.decode import SamplingConfig
    from mvjax.inference.keys import utterance_keys

    s1 = fx.npz("stage1/stage1_cases.npz")
    decoder = _first_stage_decoder(fx)
    for g in fx.gen_cases():
        top_p = float(s1[f"{g}_top_p"])
        sampling = SamplingConfig(
            guidance=float(s1[f"{g}_guidance"]), temperature=0.0, top_p=top_p if top_p > 0 else None
        )
        result = decoder.generate(
            [s1[f"{g}_prompt"].tolist()], s1[f"{g}_spk"], utterance_keys(0, 1), sampling,
            max_new_tokens=int(s1[f"{g}_max_new_tokens"]), return_logits=True,
        )
        yield _exact("stage1-decode", f"{g}-seq", result.sequences[0], s1[f"{g}_seq"])
        ref_logits = s1[f"{g}_step_logits"]
        got = result.step_logits[0]
        check = _close("stage1-decode", f"{g}-step-logits", got, ref_logits, 1e-4)
        margin = float(s1[f"{g}_margin"])
        if margin < GREEDY_MARGIN:
            check.note = f"reference greedy margin {margin:.2g} is below {GREEDY_MARGIN:g}"
        yield check


def check_stage1_batch(fx: Fixture) -> Iterator[Check]:
    """Three prompts of different lengths in one call, greedy, against the reference batched sampler."""
    from mvjax.inference.decode import SamplingConfig
    from mvjax.inference.keys import utterance_keys

    s1 = fx.npz("stage1/stage1_cases.npz")
    decoder = _first_stage_decoder(fx)
    prompts_in, lens, ref = s1["batch_prompt"], s1["batch_lens"], s1["batch_out"]
    total = ref.shape[-1]
    prompts = [prompts_in[i, 0, : lens[i]].tolist() for i in range(len(lens))]
    result = decoder.generate(
        prompts, s1["batch_spk"], utterance_keys(0, len(prompts)), SamplingConfig(guidance=3.0, temperature=0.0, top_p=None),
        max_new_tokens=[total - int(n) for n in lens],
    )
    out = np.full(ref.shape, decoder.end_of_audio, np.int64)  # the reference pads finished rows with end of audio
    for i, seq in enumerate(result.sequences):
        out[i, 0, : len(seq)] = seq[:total]
    yield _exact("stage1-batch", "batch-out", out, ref)


def check_pipeline(fx: Fixture) -> Iterator[Check]:
    """Speaker embedding from the fixture voice, then both stages through :class:`mvjax.inference.pipeline.TTS`
    (greedy, the case's guidance / top-p / max_new_tokens, no chunking)."""
    from mvjax.inference.decode import SamplingConfig
    from mvjax.inference.keys import utterance_keys
    from mvjax.inference.pipeline import TTS
    from mvjax.text.tokenizer import normalize_text

    p = fx.npz("pipeline_cases.npz")
    wav_path = fx.root / "speaker" / "reference_speaker.wav"
    if not wav_path.is_file():
        raise FixtureError("missing fixture file speaker/reference_speaker.wav")
    model = fx.cached("pipeline-model", lambda: fx.assembled(
        "pipeline", [("stage1", "first_stage.pt"), ("stage2", "second_stage.pt"), ("speaker", "speaker_encoder.pt")]))
    tts = TTS.load(model, mesh=None, speaker_cache_dir=None)
    embedding = tts.speaker_embedding(wav_path)
    yield from _cosine("pipeline", "speaker-embedding", embedding, p["spk_emb"])
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
        SamplingConfig(guidance=float(p["guidance"]), temperature=0.0, top_p=top_p),
        max_new_tokens=int(p["max_new_tokens"]),
    )
    seq = _exact("pipeline", "stage1-seq", result.sequences[0], p["stage1_seq"])
    if float(p["stage1_margin"]) < GREEDY_MARGIN:
        seq.note += f"; reference stage-1 margin {float(p['stage1_margin']):.2g} is below {GREEDY_MARGIN:g}"
    yield seq
    yield _exact("pipeline", "first-stage-tokens", speech.first_stage_codes, p["first_stage_tokens"])
    yield _exact("pipeline", "stage2-audio-start", [speech.chunks[0].prompt_tokens], [int(p["stage2_audio_start"])])
    margin = float(p["stage2_margin"])
    check = _exact("pipeline", "all-codebooks", speech.all_codebooks, p["all_codebooks"])
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
}


def run(fixture_dir: str | Path, only: list[str] | None = None, emit: Callable[[str], None] = print,
        matmul_precision: str | None = None) -> list[Check]:
    """Run the checks of ``only`` (default: every component) at the runtime's matmul policy
    (:mod:`mvjax.core.precision`; ``matmul_precision`` overrides it like the CLIs' flag)."""
    from mvjax.core.precision import apply as apply_precision

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvjax.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture_dir", help="fixture directory (layout of shared/fixtures/metavoice_ref)")
    parser.add_argument("--only", help=f"comma-separated components: {','.join(COMPONENTS)}")
    parser.add_argument("--matmul-precision", choices=["highest", "high", "default"],
                        help="float32 matmul precision to certify (default: the runtime's, $MVJAX_MATMUL_PRECISION "
                             "or 'highest')")
    args = parser.parse_args(argv)
    only = None
    if args.only:
        only = [c.strip() for c in args.only.split(",") if c.strip()]
        unknown = [c for c in only if c not in COMPONENTS]
        if unknown:
            print(f"error: unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}", file=sys.stderr)
            return 2
    try:
        results = run(args.fixture_dir, only, matmul_precision=args.matmul_precision)
    except (FixtureError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
