"""What streaming within a chunk costs at the second stage: codes equal to the whole chunk's, per lookahead.

    python -m benchmarks.stream_lookahead [--quick] [--model DIR] [--released-frames 150 250 400]

While a chunk's first stage decodes, the scheduler (``Scheduler._stream_partials``) runs the second
stage over the frames made so far every ``N`` new frames and sends codebooks 3-8 of the frames at
least ``L`` behind the newest (:class:`~mvjax.inference.options.StreamSettings`); the chunk's final
pass sends the rest, and frames already sent keep their codes. Those early codes come from a pass
that saw pads where the whole-chunk pass sees later frames, so some differ from the whole answer.
This benchmark replays that schedule with the library's own :class:`~mvjax.inference.stages.SecondStage`
(the same keys, inputs and sampler the scheduler uses) and counts the codes that equal the
whole-chunk pass's, for ``N`` in {8, 16} and ``L`` in {0, 2, 4, 8, 16, 32, whole}, at the default
second-stage sampling (temperature 1.0, top-k 200) and greedy (temperature 0).

Models: the shared fixture's (``--model DIR``, or both GPT stages of the fixtures converted into a
temporary directory), chunks from its own first stage (``TTS.tokens``, several texts and seeds);
and the released second-stage shape with random weights (6 x 384, block 1024) on random codes of
``--released-frames`` frames. The first stage is taken to make one frame per two tokens, so a
chunk gains ``--engine-steps / 2`` frames per engine call, and the scheduler looks for due pieces
after each call, as it does.

Per (model, N, L, sampling): passes per chunk (the partial ones plus the final one: the cost),
the frames the first stage has made when the first audio goes out, the share of the chunk's
frames sent before its end, and the fraction of codebook 3-8 codes equal to the whole-chunk
pass's among the frames sent early ("early") and over the whole chunk ("all"), mean and minimum
over chunks. Ends with one line per row:
``stream_lookahead model=<m> frames=<N> lookahead=<L|whole> temperature=<t> passes=<p>
first_audio_frames=<f> early_share=<s> equal_early_mean=<x> equal_early_min=<y> equal_all_mean=<u>
equal_all_min=<v>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
import types
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from benchmarks.common import RELEASED_SECOND_STAGE

LOOKAHEADS: tuple = (0, 2, 4, 8, 16, 32, None)  # None: whole (nothing sent before the chunk ends)
PIECE_FRAMES = (8, 16)
TEMPERATURES = (1.0, 0.0)
TOP_K = 200
REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MVJAX_FIXTURES", REPO.parent / "shared" / "fixtures" / "metavoice_ref"))
FIXTURE_TEXTS = (
    "Hello from the tiny test voice.",
    "Streaming sends audio while the model still thinks.",
    "The quick brown fox jumps over the lazy dog.",
    "A short one, then a pause.",
)
RELEASED_TEXTS = (
    "The first audio should leave long before the sentence is done.",
    "A second stage sees the whole block at once, text and frames alike.",
    "Every frame keeps the codes it was sent with.",
    "Lookahead trades a little delay for codes closer to the whole answer.",
)


# --- The schedule --------------------------------------------------------------------------------


def plan(total: int, settings, step: int) -> list[tuple[int, int, int]]:
    """The partial passes the scheduler runs for a chunk whose first stage makes ``total`` frames,
    ``step`` more per engine call: ``(frames the pass sees, first frame sent, end)`` each, for
    :class:`~mvjax.inference.options.StreamSettings` ``settings``. The call that finishes the chunk
    makes no partial pass (its final pass sends the rest)."""
    if settings.lookahead is None:
        return []
    out, emitted = [], 0
    for seen in range(step, total, step):
        upto = seen - settings.lookahead
        if upto - emitted >= settings.due(emitted):
            out.append((seen, emitted, upto))
            emitted = upto
    return out


def passes(second, chunk, seen: Sequence[int], temperature: float, top_k: Optional[int],
           batch: int = 4) -> dict[int, np.ndarray]:
    """All codebooks (n_q, frames) from a second-stage pass over each prefix of ``chunk``'s frames in
    ``seen`` (its whole length included), as the scheduler runs them (a view of the chunk per pass)."""
    from mvjax.inference.stages import Batcher

    seen = sorted(set(seen))
    views = [dataclasses.replace(chunk, first_stage_codes=chunk.first_stage_codes[:, :n]) for n in seen]
    return dict(zip(seen, second.run(views, temperature, top_k, Batcher(batch))))


def streamed(books: dict[int, np.ndarray], schedule: list[tuple[int, int, int]], total: int) -> np.ndarray:
    """The codes a streamed chunk ends with: each partial pass's frames as sent, the final pass's after."""
    out = books[total].copy()
    for seen, start, stop in schedule:
        out[:, start:stop] = books[seen][:, start:stop]
    return out


@dataclasses.dataclass
class ChunkResult:
    passes: int
    first_audio_frames: int
    early: int  # frames sent before the chunk's end
    frames: int
    equal_early: float  # nan when nothing is sent early
    equal_all: float


def measure(second, chunk, settings_list: Sequence, temperature: float, top_k: Optional[int],
            step: int) -> list[ChunkResult]:
    """One :class:`ChunkResult` per settings in ``settings_list`` for ``chunk`` (its frames cut to the block)."""
    total = chunk.first_stage_codes.shape[1]
    schedules = [plan(total, s, step) for s in settings_list]
    books = passes(second, chunk, [total] + [seen for sch in schedules for seen, _, _ in sch], temperature, top_k)
    whole = books[total]
    out = []
    for schedule in schedules:
        codes = streamed(books, schedule, total)
        same = codes[2:] == whole[2:]
        early = schedule[-1][2] if schedule else 0
        out.append(ChunkResult(len(schedule) + 1, schedule[0][0] if schedule else total, early, total,
                               float(same[:, :early].mean()) if early else float("nan"), float(same.mean())))
    return out


def make_chunk(second, text: str, codes: np.ndarray, embedding: np.ndarray, key) -> object:
    """A :class:`~mvjax.inference.stages.Chunk` as the scheduler builds it, its frames cut to the block."""
    from mvjax.inference.stages import Chunk

    owner = types.SimpleNamespace(embedding=np.asarray(embedding, np.float32), sampling=None)
    chunk = Chunk(owner, (0,), text, np.asarray(key), [], second.tokenizer.encode(text))
    chunk.first_stage_codes = np.asarray(codes)[:, : second.room(chunk)]
    return chunk


def chunk_key(seed: int, utterance: int = 0, index: int = 0) -> np.ndarray:
    """The key the scheduler gives chunk ``index`` of utterance ``utterance`` under ``seed``."""
    from mvjax.inference import keys as K

    return K.fold(K.keys_for(seed, [utterance])[0], index)


# --- Models ------------------------------------------------------------------------------------


def fixture_model_dir(out: Path) -> Path:
    """Both GPT stages of the shared fixtures converted into ``out`` (as tests/conftest.py ``converted``)."""
    from convert_weights.convert import convert_directory

    src = out / "released"
    src.mkdir(parents=True)
    for sub, name in (("stage1", "first_stage.pt"), ("stage2", "second_stage.pt")):
        shutil.copy(FIXTURES / sub / name, src / name)
    convert_directory(src, out / "model")
    return out / "model"


def fixture_chunks(model_dir: Path, texts: Sequence[str], seeds: Sequence[int]):
    """(second stage, chunks): the fixture first stage's chunks for ``texts`` under each seed (one chunk
    per text, the recorded reference voice), with the keys the scheduler gives them."""
    from mvjax.inference.pipeline import TTS

    tts = TTS.load(model_dir, mesh=None, speaker_cache_dir=None)
    emb = np.load(FIXTURES / "pipeline_cases.npz")["spk_emb"]
    chunks = []
    for seed in seeds:
        speeches = tts.tokens(list(texts), speaker=np.stack([emb] * len(texts)), long_form=False, seed=seed)
        for i, speech in enumerate(speeches):
            chunks.append(make_chunk(tts.second_stage, speech.text, speech.first_stage_codes, emb, chunk_key(seed, i)))
    return tts.second_stage, chunks


def released_second_stage(seed: int = 0):
    """The released second-stage shape with random weights, as the library's :class:`SecondStage`."""
    from convert_weights import random_checkpoints as R
    from convert_weights.gpt import convert_gpt_checkpoint
    from mvjax.inference.second_stage import SecondStageSampler
    from mvjax.inference.stages import SecondStage
    from mvjax.text.layout import TokenLayout
    from mvjax.text.tokenizer import Tokenizer

    ranks = R.train_bpe(R.TRAINING_TEXT)
    ckpt = R.gpt_checkpoint(R.component_rng(seed, 2), R.model_args(**RELEASED_SECOND_STAGE), R.SECOND_STAGE_TEXT_OFFSET,
                            ranks, {"causal": False}, "")
    config, params, spec = convert_gpt_checkpoint(ckpt, source="second_stage")
    tokenizer = Tokenizer(spec)
    layout = TokenLayout.from_offsets(R.FIRST_STAGE_TEXT_OFFSET, tokenizer.offset)
    sampler = SecondStageSampler(config, params, pad_token=layout.stage2_pad)
    return SecondStage(sampler, tokenizer, layout, config.block_size)


def released_chunks(second, frames: Sequence[int], seed: int = 0) -> list:
    """Chunks of uniformly random codes (what a random first stage makes) of each length in ``frames``,
    a text each, random unit speaker embeddings, the scheduler's keys for utterances 0, 1, ..."""
    rng = np.random.default_rng([seed, 29])
    chunks = []
    for i, n in enumerate(frames):
        emb = rng.standard_normal(256).astype(np.float32)
        chunks.append(make_chunk(second, RELEASED_TEXTS[i % len(RELEASED_TEXTS)], rng.integers(0, 1024, (2, n)),
                                 emb / np.linalg.norm(emb), chunk_key(seed, i)))
    return chunks


# --- Report ------------------------------------------------------------------------------------


def summarise(results: list[ChunkResult]) -> dict:
    early = [r.equal_early for r in results if r.early]
    return dict(passes=float(np.mean([r.passes for r in results])),
                first_audio_frames=float(np.mean([r.first_audio_frames for r in results])),
                early_share=float(np.mean([r.early / r.frames for r in results])),
                equal_early_mean=float(np.mean(early)) if early else float("nan"),
                equal_early_min=float(np.min(early)) if early else float("nan"),
                equal_all_mean=float(np.mean([r.equal_all for r in results])),
                equal_all_min=float(np.min([r.equal_all for r in results])))


def run_model(name: str, second, chunks: list, step: int) -> list[tuple]:
    """Rows (model, N, L, temperature, summary) for every setting on ``chunks``."""
    from mvjax.inference.options import StreamSettings

    settings = [StreamSettings(frames=n, lookahead=lookahead) for n in PIECE_FRAMES for lookahead in LOOKAHEADS]
    rows = []
    for temperature in TEMPERATURES:
        start = time.perf_counter()
        per_chunk = [measure(second, c, settings, temperature, TOP_K, step) for c in chunks]
        print(f"# {name} temperature={temperature}: {len(chunks)} chunks in {time.perf_counter() - start:.1f} s",
              flush=True)
        for j, s in enumerate(settings):
            rows.append((name, s.frames, s.lookahead, temperature, summarise([r[j] for r in per_chunk])))
    return rows


def fmt(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.3f}"


def markdown(rows: list[tuple], frames_info: dict) -> str:
    """The table: one line per (model, N, L), the default sampling's and greedy's fractions side by side."""
    by = {(m, n, la, t): s for m, n, la, t, s in rows}
    header = ("| model (chunk frames) | N | L | passes / chunk | first audio after (frames) | sent early |"
              " equal, early codes T=1 top-k 200: mean / min | equal, all codes T=1: mean / min |"
              " equal, early codes greedy: mean / min | equal, all codes greedy: mean / min |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for m, n, la, t, s in rows:
        if t != TEMPERATURES[0]:
            continue
        g = by[(m, n, la, TEMPERATURES[1])]
        lines.append(f"| {m} ({frames_info[m]}) | {n} | {'whole' if la is None else la} | {s['passes']:.1f} | "
                     f"{s['first_audio_frames']:.0f} | {s['early_share']:.0%} | "
                     f"{fmt(s['equal_early_mean'])} / {fmt(s['equal_early_min'])} | "
                     f"{fmt(s['equal_all_mean'])} / {fmt(s['equal_all_min'])} | "
                     f"{fmt(g['equal_early_mean'])} / {fmt(g['equal_early_min'])} | "
                     f"{fmt(g['equal_all_mean'])} / {fmt(g['equal_all_min'])} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer chunks: 2 fixture texts x 1 seed, one released chunk")
    p.add_argument("--model", help="a converted fixture-size model directory (default: convert the shared fixtures)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="fixture seeds (default 0 1)")
    p.add_argument("--released-frames", type=int, nargs="*", default=None,
                   help="frames of each released-shape chunk (default 150 250 400; --quick 160; none: skip)")
    p.add_argument("--engine-steps", type=int, default=None, help="first-stage tokens per engine call (default: the library's)")
    args = p.parse_args(argv)

    from mvjax.inference.options import DEFAULT_STEPS

    step = max(1, (args.engine_steps or DEFAULT_STEPS) // 2)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    texts = FIXTURE_TEXTS[:2] if args.quick else FIXTURE_TEXTS
    released = args.released_frames if args.released_frames is not None else ([160] if args.quick else [150, 250, 400])
    rows, frames_info = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else fixture_model_dir(Path(tmp))
        second, chunks = fixture_chunks(model_dir, texts, seeds)
        frames_info["fixture"] = ", ".join(str(c.first_stage_codes.shape[1]) for c in chunks)
        rows += run_model("fixture", second, chunks, step)
    if released:
        second = released_second_stage()
        chunks = released_chunks(second, released)
        frames_info["released"] = ", ".join(str(c.first_stage_codes.shape[1]) for c in chunks)
        rows += run_model("released", second, chunks, step)
    print(markdown(rows, frames_info))
    for m, n, la, t, s in rows:
        print(f"stream_lookahead model={m} frames={n} lookahead={'whole' if la is None else la} temperature={t:g} "
              f"passes={s['passes']:.2f} first_audio_frames={s['first_audio_frames']:.1f} "
              f"early_share={s['early_share']:.3f} " + " ".join(f"{k}={fmt(s[k])}" for k in (
                  "equal_early_mean", "equal_early_min", "equal_all_mean", "equal_all_min")))


if __name__ == "__main__":
    main()
