"""The second stage's lookahead schedule (benchmarks/stream_lookahead.py) on the fixture model: nothing sent
early reproduces the whole chunk's codes exactly, L=0 sends frames before the end, and the replayed schedule
is the scheduler's own."""

import itertools
import threading
import types

import numpy as np
import pytest

from benchmarks import stream_lookahead as S
from mvjax.inference.options import StreamSettings
from mvjax.inference.scheduler import Scheduler
from mvjax.inference.stages import Batcher

TOP_K = 200


@pytest.fixture(scope="module")
def model(tts):
    """The fixture model (conftest's ``tts``)."""
    return tts


@pytest.fixture(scope="module")
def chunk(model, fixtures):
    """The recorded pipeline case's first-stage frames as one chunk (seed 0, utterance 0)."""
    case = np.load(fixtures / "pipeline_cases.npz")
    return S.make_chunk(model.second_stage, str(case["text"]), case["first_stage_tokens"], case["spk_emb"],
                        S.chunk_key(0))


def test_plan_follows_the_settings():
    assert S.plan(40, StreamSettings(frames=8, lookahead=0), 4) == [(8, 0, 8), (16, 8, 16), (24, 16, 24), (32, 24, 32)]
    assert S.plan(40, StreamSettings(frames=8, lookahead=2), 4) == [(12, 0, 10), (20, 10, 18), (28, 18, 26), (36, 26, 34)]
    assert S.plan(40, StreamSettings(frames=16, first_frames=4, lookahead=0), 4)[:2] == [(4, 0, 4), (20, 4, 20)]
    assert S.plan(40, StreamSettings(frames=8, lookahead=None), 4) == []
    assert S.plan(40, StreamSettings(frames=8, lookahead=40), 4) == []


def test_whole_pass_is_the_recorded_one(model, chunk, fixtures):
    """Greedy, the chunk's whole pass gives the reference's codebooks (the fixture's margins make them exact)."""
    whole = model.second_stage.run([chunk], 0.0, TOP_K, Batcher(1))[0]
    np.testing.assert_array_equal(whole, np.load(fixtures / "pipeline_cases.npz")["all_codebooks"])


def test_lookahead_whole_equals_the_whole_pass(model, chunk):
    total = chunk.first_stage_codes.shape[1]
    alone = model.second_stage.run([chunk], 1.0, TOP_K, Batcher(1))[0]
    schedule = S.plan(total, StreamSettings(frames=8, lookahead=None), 4)
    assert schedule == []
    books = S.passes(model.second_stage, chunk, [total, 8, 16, 24], 1.0, TOP_K)  # batched with other views
    np.testing.assert_array_equal(S.streamed(books, schedule, total), alone)
    (result,) = S.measure(model.second_stage, chunk, [StreamSettings(frames=8, lookahead=None)], 1.0, TOP_K, 4)
    assert (result.passes, result.early, result.equal_all) == (1, 0, 1.0)


def test_lookahead_zero_sends_frames_early(model, chunk):
    total = chunk.first_stage_codes.shape[1]
    schedule = S.plan(total, StreamSettings(frames=8, lookahead=0), 4)
    assert schedule and schedule[0] == (8, 0, 8)
    assert all(a[2] == b[1] for a, b in itertools.pairwise(schedule))  # contiguous pieces
    early = schedule[-1][2]
    assert 0 < early < total
    books = S.passes(model.second_stage, chunk, [total] + [seen for seen, _, _ in schedule], 1.0, TOP_K)
    codes = S.streamed(books, schedule, total)
    np.testing.assert_array_equal(codes[:2], chunk.first_stage_codes)
    np.testing.assert_array_equal(codes[:, early:], books[total][:, early:])
    for seen, start, stop in schedule:
        np.testing.assert_array_equal(codes[:, start:stop], books[seen][:, start:stop])
    (result,) = S.measure(model.second_stage, chunk, [StreamSettings(frames=8, lookahead=0)], 1.0, TOP_K, 4)
    assert result.passes == len(schedule) + 1 and result.early == early and 0 <= result.equal_early <= 1


@pytest.mark.parametrize("lookahead", [0, 2])
def test_replay_matches_the_scheduler(model, chunk, lookahead):
    """The scheduler's own ``_stream_partials``, fed the chunk's frames 4 per engine call, sends the pieces
    :func:`plan` replays, with the codes :func:`streamed` assembles."""
    settings = StreamSettings(frames=8, lookahead=lookahead)
    codes, total, cb = chunk.first_stage_codes, chunk.first_stage_codes.shape[1], model.layout.codebook_size
    pieces = []
    owner = types.SimpleNamespace(embedding=chunk.embedding, streaming=settings, dropped=False, next_index=0,
                                  decoder="encodec", on_piece=lambda u, piece: pieces.append(piece))
    live = S.make_chunk(model.second_stage, chunk.text, codes, chunk.embedding, chunk.key)
    live.owner = owner
    request = types.SimpleNamespace(tag=live)
    state = {"frames": 0}

    def partial(wanted):
        f = state["frames"]
        audio = np.stack([codes[0, :f], codes[1, :f] + cb], axis=1).reshape(-1)
        return [(request, np.concatenate([np.asarray(live.prompt or [3 * cb], np.int64), audio]))] if wanted(request) else []

    def stream(c, books, last):
        return np.zeros((1, books.shape[1]), np.float32)

    fake = types.SimpleNamespace(
        engine=types.SimpleNamespace(partial=partial), first=model.first_stage, second=model.second_stage,
        decoder=types.SimpleNamespace(streams=lambda d: True, stream=stream),
        options=types.SimpleNamespace(stage2_temperature=1.0, stage2_top_k=TOP_K),
        batcher=lambda name: Batcher(4), lock=threading.Lock())
    for seen in range(4, total, 4):
        state["frames"] = seen
        Scheduler._stream_partials(fake)
    schedule = S.plan(total, settings, 4)
    assert [(p.codes.shape[1], p.continues) for p in pieces] == [(stop - start, start > 0) for _, start, stop in schedule]
    books = S.passes(model.second_stage, chunk, [total] + [seen for seen, _, _ in schedule], 1.0, TOP_K)
    whole = model.second_stage.run([chunk], 1.0, TOP_K, Batcher(1))[0]
    played = np.concatenate([live.played, whole[:, live.emitted:]], axis=1)  # what the scheduler's final pass keeps
    np.testing.assert_array_equal(played, S.streamed(books, schedule, total))
