"""The parity tool's fixture side: reading a fixture directory (converting its checkpoints with our
converter), the arrays every fixture must hold, and how results are compared and reported."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np

from convert_weights.convert import convert_directory
from mvjax.core.errors import MvjaxError
from mvjax.inference.speaker import SpeakerEncoder
from mvjax.io.checkpoint import load_encodec, load_gpt_stage, load_mbd

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
# ``{u}``: each diffusion band of the checkpoint, ``{r}``: each fine-tuning row, ``{name}``: each
# trainable parameter the fine-tuning case lists. A missing one FAILs the components that use
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
    "finetune/finetune_cases.npz": [
        "texts", "codes_{r}", "spk", "tokens", "order", "val_rows", "ctx_window", "pad_token",
        "num_max_audio_tokens_timesteps", "last_n_blocks", "learning_rate", "weight_decay", "betas", "grad_clip",
        "batch_size", "steps", "trainable_names", "train_losses", "grad_norms", "step0_token_losses",
        "val_loss_before", "val_loss_after", "param/{name}",
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
    "finetune": ("finetune/finetune_cases.npz",),
}


def close_check(component: str, name: str, got, ref, rel_tol: float) -> Check:
    """max|got - ref| <= rel_tol * max(1, max|ref|)."""
    return within_check(component, name, got, ref, rel_tol * max(1.0, float(np.abs(np.asarray(ref)).max())))


def within_check(component: str, name: str, got, ref, tol: float) -> Check:
    """max|got - ref| <= tol (absolute)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return Check(component, name, False, float("inf"), tol, f"shape {got.shape} != {ref.shape}")
    err = float(np.abs(got - ref).max())
    return Check(component, name, bool(err <= tol), err, tol)


def exact_check(component: str, name: str, got, ref, where=None) -> Check:
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


def cosine_checks(component: str, name: str, got, ref, min_cos: float = 0.9999, max_abs: float = 1e-3) -> list[Check]:
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
            elif "{r}" in key:
                names += [key.format(r=r) for r in range(len(data.get("texts", ())))]
            elif "{name}" in key:
                names += [key.format(name=n) for n in data.get("trainable_names", ())]
            else:
                names.append(key)
        return [k for k in names if k not in data]

    def mbd_band_count(self) -> int:
        config, _ = self.mbd()
        return config.n_bands

    def converted(self, sub: str, filename: str, name: str) -> Path:
        """Convert ``sub/filename`` of the fixture with our converter (once); the model directory."""
        out = self.workdir / name
        if not out.exists():
            if not (self.root / sub / filename).is_file():
                raise FixtureError(f"missing fixture file {sub}/{filename}")
            convert_directory(self.root / sub, out)
        return out

    def assembled(self, name: str, files: list[tuple[str, str]]) -> Path:
        """Several fixture checkpoints ((subdirectory, file name) pairs) converted into one model directory."""
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
        sub = {"first_stage": "stage1", "second_stage": "stage2"}[name]
        return self.cached(name, lambda: load_gpt_stage(self.converted(sub, f"{name}.pt", name), name, verify=True))

    def speaker_encoder(self):
        return self.cached("speaker", lambda: SpeakerEncoder.load(
            self.converted("speaker", "speaker_encoder.pt", "speaker_encoder"), cache_dir=None))

    def mbd(self):
        return self.cached("mbd", lambda: load_mbd(self.converted("mbd", "mbd_comp_8.pt", "mbd"), verify=True))

    def encodec(self):
        """(recipe digest, config, params) of the fixture recipe's random codec, rebuilt with torch + encodec."""
        return self.cached("encodec", self._build_encodec)

    def _build_encodec(self):
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
