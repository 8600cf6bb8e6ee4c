"""The speech server's model worker: requests batched together get the tokens they get alone."""

import time

import numpy as np
import pytest

from mvjax.inference.options import SamplingConfig, SynthesisOptions
from mvjax.inference.scheduler import Utterance
from mvjax.serve.jobs import (
    Cancelled,
    ChunkAudio,
    DeadlineExceeded,
    Draining,
    Job,
    QueueFull,
)
from mvjax.serve.worker import SpeechWorker
from tests.serve_util import TEST_MAX_NEW_TOKENS as N
from tests.serve_util import demo_tts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TEXTS = [
    "Hello there.",
    "A second request, with a longer sentence than the first one has.",
    "Short one.",
]


@pytest.fixture(scope="module")
def demo():
    from mvjax.sources.demo import demo_speaker_audio

    tts = demo_tts()
    voices = [tts.speaker_embedding(demo_speaker_audio(seed=s)) for s in (0, 1)]
    return tts, voices


def worker_for(tts, max_batch=8, batching="engine", **kw) -> SpeechWorker:
    options = SynthesisOptions(batch_size=max_batch, batching=batching, max_new_tokens=N)
    return SpeechWorker(tts, options, **kw)


def make_job(pieces, embedding, seed, deadline, sampling=SamplingConfig(), stream=False, **kw) -> Job:
    """A job as the server makes one: its text's pieces as one utterance keyed by ``seed``."""
    return Job(Utterance.seeded(pieces, embedding, seed, sampling=sampling, stream=stream), seed, deadline, **kw)


def plan(tts, text):
    return tts.plan(text, N)


def _collect(job: Job, timeout: float = 300) -> list:
    events = []
    while True:
        event = job.next_event(timeout)
        if event is None:
            return events
        events.append(event)


def _alone(tts, text, voice, seed, sampling) -> list[np.ndarray]:
    speech = tts.tokens(text, voice, seed=seed, sampling=sampling, max_new_tokens=N)
    return np.split(speech.first_stage_codes, np.cumsum([c.frames for c in speech.chunks])[:-1], axis=1)


@pytest.mark.parametrize("batching", ["engine", "static"])
def test_batched_requests_get_their_own_tokens(demo, batching):
    """Mixed texts, voices and settings decoded together (the engine's slots, or one static batch):
    each request's tokens equal the library's for that request alone (same seed), and one round
    really held several requests."""
    tts, voices = demo
    params = [(11, SamplingConfig()), (12, SamplingConfig(temperature=0.7, top_p=0.8, guidance_scale=1.5)),
              (13, SamplingConfig(temperature=1.2, top_p=1.0, guidance_scale=3.0))]
    batches = []
    worker = worker_for(tts, max_batch=8, on_batch=batches.append, batching=batching)
    assert worker.batching == batching
    try:
        jobs = [make_job(plan(tts, t), voices[i % 2], p[0], time.monotonic() + 600, p[1])
                for i, (t, p) in enumerate(zip(TEXTS, params))]
        with worker._lock:  # all three are waiting when the first batch starts
            for job in jobs:
                worker.submit(job)
        results = [_collect(job) for job in jobs]
    finally:
        worker.close()
    assert max(b.utterances for b in batches) == 3
    for text, voice, p, events in zip(TEXTS, [voices[0], voices[1], voices[0]], params, results):
        assert all(isinstance(e, ChunkAudio) for e in events)
        got = [e.tokens[:, : e.frames] for e in events]
        want = _alone(tts, text, voice, *p)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        assert all(e.wav.shape[-1] > 0 for e in events)


def test_one_at_a_time_gives_the_same_tokens(demo):
    tts, voices = demo
    sampling = SamplingConfig(temperature=0.7, top_p=0.8, guidance_scale=1.5)
    worker = worker_for(tts, max_batch=1)
    try:
        events = _collect(worker.submit(make_job(plan(tts, TEXTS[1]), voices[1], 12, time.monotonic() + 600, sampling)))
    finally:
        worker.close()
    want = _alone(tts, TEXTS[1], voices[1], 12, sampling)
    for e, w in zip(events, want, strict=True):
        np.testing.assert_array_equal(e.tokens[:, : e.frames], w)


def test_a_cancelled_job_stops_being_computed(demo):
    """Three chunks one at a time: cancelled after its first chunk arrives, the job computes at most
    one more (the one already running), ends with Cancelled, and leaves the queue."""
    tts, voices = demo
    pieces = tts.plan("First sentence is here. " * 6 + "Second part of the text goes on. " * 6 + "And the end. " * 8)
    assert len(pieces) >= 3
    batches = []
    worker = worker_for(tts, max_batch=1, on_batch=batches.append)
    try:
        job = worker.submit(make_job(pieces, voices[0], 1, time.monotonic() + 600))
        first = job.next_event(300)
        assert isinstance(first, ChunkAudio) and first.index == 0
        job.cancel()
        rest = _collect(job)
        deadline = time.monotonic() + 120
        while worker.depth and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.depth == 0
    finally:
        worker.close()
    assert isinstance(rest[-1], Cancelled)
    assert sum(b.started for b in batches) <= 2 < len(pieces)


def test_queue_limit_deadline_and_drain(demo):
    tts, voices = demo
    worker = worker_for(tts, max_batch=2, max_jobs=1)
    try:
        late = worker.submit(make_job(["Late."], voices[0], 1, time.monotonic() - 1))
        events = _collect(late, 60)
        assert len(events) == 1 and isinstance(events[0], DeadlineExceeded)
        job = worker.submit(make_job(["Hello there."], voices[0], 1, time.monotonic() + 600))
        with pytest.raises(QueueFull):
            worker.submit(make_job(["Another."], voices[0], 2, time.monotonic() + 600))
        assert worker.drain(300)  # waits for the admitted job
        assert job.done and job.error is None
        with pytest.raises(Draining):
            worker.submit(make_job(["After."], voices[0], 3, time.monotonic() + 600))
    finally:
        worker.close()


def test_a_static_worker_never_calls_the_engine(demo, monkeypatch):
    """``batching="static"`` decodes static batches: the engine is never built, fed or stepped, and
    the requests still get their audio."""
    from mvjax.inference.engine import FirstStageEngine

    tts, voices = demo
    calls = []
    for name in ("__init__", "submit", "step", "run"):
        monkeypatch.setattr(FirstStageEngine, name, lambda self, *a, name=name, **kw: calls.append(name))
    worker = worker_for(tts, max_batch=2, batching="static")
    try:
        jobs = [worker.submit(make_job(plan(tts, text), voices[0], 5, time.monotonic() + 600))
                for text in TEXTS[:2]]
        results = [_collect(job) for job in jobs]
    finally:
        worker.close()
    assert worker.batching == "static" and worker.engine is None
    assert calls == []
    assert all(events and all(isinstance(e, ChunkAudio) for e in events) for events in results)


def test_the_worker_logs_rounds_and_request_summaries_at_debug_only(demo, caplog):
    """Two requests through the engine with the server's round logger: the worker writes nothing at
    INFO (a server's one INFO line per request is its access line, which carries the job's summary);
    each job's summary (id, outcome, voice, seed, characters, chunks, tokens, seconds) and the
    engine rounds log at DEBUG. A failed request gets its summary too."""
    import logging
    import types

    from mvjax.serve.app import _on_batch
    from mvjax.serve.metrics import Metrics
    from mvjax.serve.settings import ServerSettings

    tts, voices = demo
    caplog.set_level(logging.DEBUG, logger="mvjax")
    worker = worker_for(tts, max_batch=8, on_batch=_on_batch(types.SimpleNamespace(metrics=Metrics(), settings=ServerSettings())))
    assert worker.batching == "engine" and worker.devices == 1
    try:
        jobs = [worker.submit(make_job(plan(tts, text), voices[0], 3, time.monotonic() + 600, voice="demo"))
                for text in TEXTS[:2]]
        results = [_collect(job) for job in jobs]
        late = worker.submit(make_job(["Late."], voices[0], 1, time.monotonic() - 1))
        assert isinstance(_collect(late, 60)[-1], DeadlineExceeded)
    finally:
        worker.close()
    records = [r for r in caplog.records if r.name.startswith("mvjax")]
    assert [r.getMessage() for r in records if r.levelno >= logging.INFO] == []
    summaries = [r.getMessage() for r in records if r.getMessage().startswith("job ")]
    assert len(summaries) == 3, summaries
    for job, events, line in zip(jobs, results, summaries):
        tokens = sum(e.generated_tokens for e in events)
        assert line == job.summary() and tokens > 0
        assert line.startswith(f"job {job.id}: ok, voice demo, seed 3, {sum(map(len, job.pieces))} characters in "
                               f"{len(job.pieces)} chunks, {tokens} tokens, first audio after "), line
        assert line.endswith(" s")
    assert summaries[2].startswith(f"job {late.id}: 504 DeadlineExceeded, voice -, seed 1, ")
    rounds = [r for r in records if r.getMessage().startswith("batch:")]
    assert len(rounds) >= 2 and all(r.levelno == logging.DEBUG for r in rounds)


def test_the_access_line_adds_the_text_only_with_log_text_escaped():
    """``--log-text`` puts the request's text (its chunks, joined) in its access line, escaped like any
    client text; without it the line has the job's summary and no text."""
    import dataclasses

    from mvjax.serve.guard import job_words
    from mvjax.serve.settings import ServerSettings

    one = make_job(["Hello\tthere.", "Bye \u00e9 now."], np.zeros(256, np.float32), 9, time.monotonic() + 60, voice="demo")
    scope = {"state": {"job": one}}
    plain = job_words(scope, ServerSettings())
    assert plain.startswith(f" (job {one.id}: unfinished, voice demo, seed 9, 22 characters in 2 chunks, 0 tokens, ")
    assert "Hello" not in plain
    logged = job_words(scope, dataclasses.replace(ServerSettings(), log_text=True))
    assert logged.endswith(", text 'Hello\\tthere. Bye \\xe9 now.')"), logged
    assert job_words({}, ServerSettings()) == "" and job_words({"state": {}}, ServerSettings()) == ""


def test_log_rounds_puts_the_round_lines_at_info(caplog):
    import logging
    import types

    from mvjax.inference.scheduler import RoundStats
    from mvjax.serve.app import _on_batch
    from mvjax.serve.metrics import Metrics
    from mvjax.serve.settings import ServerSettings

    caplog.set_level(logging.DEBUG, logger="mvjax")
    for log_rounds, level in ((False, logging.DEBUG), (True, logging.INFO)):
        caplog.clear()
        record = _on_batch(types.SimpleNamespace(metrics=Metrics(), settings=ServerSettings(log_rounds=log_rounds)))
        record(RoundStats(3, 2, 48, 0.5, 0.7, started=1, stream_seconds=0.2))
        (line,) = [r for r in caplog.records if r.getMessage().startswith("batch:")]
        assert line.levelno == level
        assert line.getMessage() == ("batch: 3 chunks of 2 requests (1 started), 48 tokens, 0.70 s "
                                     "(stage 1 0.50 s, streaming 0.20 s)")
