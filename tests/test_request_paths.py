"""Every way into the scheduler gives the same tokens for a fixed seed (fixture model): the library
with the engine and with static batches, the synthesize CLI, and the server's worker answering whole
and streamed requests. Texts cover several planned chunks and a chunk that is re-split."""

import subprocess
import sys
import time

import numpy as np
import pytest

from mvjax.inference.options import SamplingConfig, SynthesisError, SynthesisOptions
from mvjax.inference.scheduler import Utterance
from mvjax.serve.jobs import ChunkAudio, Job
from mvjax.serve.worker import SpeechWorker
from mvjax.text.tokenizer import normalize_text
from tests.conftest import REPO
from tests.test_pipeline import LONG_TEXT

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MAX_NEW = 40
SAMPLING = SamplingConfig(temperature=0.9, top_p=0.9, guidance_scale=2.5)


def _library(tts, voice, batching, **kw):
    return tts.tokens([LONG_TEXT, "One short text."], [voice, voice[::-1].copy()], seed=4, sampling=SAMPLING,
                      max_new_tokens=MAX_NEW, batching=batching, batch_size=2, **kw)


def test_engine_and_static_batches_give_the_same_tokens(tts, voice):
    runs = {b: _library(tts, voice, b) for b in ("engine", "static")}
    assert len(runs["engine"][0].chunks) >= 3  # several planned chunks in flight at once
    for a, b in zip(runs["engine"], runs["static"], strict=True):
        np.testing.assert_array_equal(a.first_stage_codes, b.first_stage_codes)
        np.testing.assert_array_equal(a.all_codebooks, b.all_codebooks)
        assert a.chunks == b.chunks
    # A re-split chunk (no token cap: the random model fills the block) gets the same halves either way.
    split = {b: tts.tokens("Two words.", voice, seed=0, batching=b) for b in ("engine", "static")}
    assert [c.text for c in split["engine"].chunks] == ["Two", "words."]
    np.testing.assert_array_equal(split["engine"].all_codebooks, split["static"].all_codebooks)


def test_a_paged_kv_cache_gives_the_same_tokens(tts, voice):
    """The engine's cache in pages (options.kv_pages) changes where keys and values live, not what is
    sampled: a pool just over one request's block (so requests wait for pages, or are preempted and
    re-decoded) gives the whole-block engine's tokens; a pool that cannot hold one block is refused."""
    page = 8
    block_pages = -(-tts.config1.block_size // page)
    whole = _library(tts, voice, "engine")
    paged = _library(tts, voice, "engine", kv_pages=2 * block_pages + 2, kv_page_size=page)
    for a, b in zip(whole, paged, strict=True):
        np.testing.assert_array_equal(a.all_codebooks, b.all_codebooks)
    with pytest.raises(SynthesisError, match="pages"):
        tts.tokens("One.", voice, kv_pages=block_pages, kv_page_size=page, max_new_tokens=4)
    with pytest.raises(SynthesisError, match="kv_pages"):
        SynthesisOptions(kv_pages=0)


def test_the_cli_saves_the_library_tokens(tts, voice, full_model, tmp_path):
    np.save(tmp_path / "voice.npy", voice)
    cmd = [sys.executable, "-m", "mvjax.synthesize", "--model", str(full_model), "--speaker-embedding",
           str(tmp_path / "voice.npy"), "--text", LONG_TEXT, "--out", str(tmp_path / "out.wav"), "--save-tokens",
           str(tmp_path / "out.npz"), "--decoder", "encodec", "--no-enhance", "--seed", "4", "--temperature", "0.9",
           "--top-p", "0.9", "--guidance-scale", "2.5", "--max-new-tokens", str(MAX_NEW), "--batching", "static",
           "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    saved = np.load(tmp_path / "out.npz")
    want = _library(tts, voice, "engine")[0]
    np.testing.assert_array_equal(saved["first_stage"], want.first_stage_codes)
    np.testing.assert_array_equal(saved["all_codebooks"], want.all_codebooks)


@pytest.mark.parametrize("batching", ["engine", "static"])
def test_the_server_worker_answers_whole_and_streamed_with_the_library_tokens(tts, voice, batching):
    """A whole and a streamed request, in flight together, each get the tokens the library gives
    that text alone with the same seed (a request's key is its seed's first utterance key)."""
    worker = SpeechWorker(tts, SynthesisOptions(batch_size=4, batching=batching, max_new_tokens=MAX_NEW,
                                                decoder="encodec"))
    pieces = tts.plan(normalize_text(LONG_TEXT), MAX_NEW)  # as the library plans it
    try:
        jobs = {stream: Job(Utterance.seeded(pieces, voice, 11, sampling=SAMPLING, decoder="encodec", stream=stream),
                            11, time.monotonic() + 600) for stream in (False, True)}
        for job in jobs.values():
            worker.submit(job)
        events = {}
        for stream, job in jobs.items():
            events[stream] = []
            while (event := job.next_event(600)) is not None:
                assert isinstance(event, ChunkAudio), event
                events[stream].append(event)
    finally:
        worker.close()
    want = tts.tokens(LONG_TEXT, voice, seed=11, sampling=SAMPLING, max_new_tokens=MAX_NEW)
    assert len(events[True]) == len(want.chunks) >= 3
    for stream in (False, True):
        assert [e.index for e in events[stream]] == sorted(e.index for e in events[stream])
        got = np.concatenate([e.tokens[:, : e.frames] for e in events[stream]], axis=1)
        np.testing.assert_array_equal(got, want.first_stage_codes)
        assert all(e.wav.shape[-1] == e.frames * tts.codec.config.hop_length for e in events[stream])
