"""The continuous-batching first-stage engine against decoding each request alone (fixture model)."""

import numpy as np
import pytest

from mvjax.inference.decode import FirstStageDecoder
from mvjax.inference.engine import EngineRequest, FirstStageEngine
from mvjax.inference.keys import utterance_keys
from mvjax.inference.options import SamplingConfig
from mvjax.io.checkpoint import load_gpt_stage

TEXTS = [
    "One.",
    "Two words here, please.",
    "And a third, somewhat longer prompt for the engine to chew on!",
    "Short again.",
    "The fifth request arrives while the others are decoding.",
    "Six.",
    "Seventh text, with its own settings.",
]


@pytest.fixture(scope="module")
def model(converted):
    config, params, tok = load_gpt_stage(converted, "first_stage")
    return FirstStageDecoder(config, params, end_of_audio=tok.offset - 1), tok


def _requests(tok, seed=5):
    rng = np.random.default_rng(seed)
    keys = utterance_keys(seed, len(TEXTS))
    settings = [
        SamplingConfig(temperature=1.0, top_p=0.95),
        SamplingConfig(guidance_scale=1.5, temperature=0.7, top_p=0.8),
        SamplingConfig(guidance_scale=3.0, temperature=1.3, top_k=20, top_p=None),
        SamplingConfig(temperature=0.0),
        SamplingConfig(guidance_scale=2.0, temperature=1.0, top_p=0.9),
        SamplingConfig(temperature=1.0, top_p=0.95),
        SamplingConfig(guidance_scale=4.0, temperature=0.9, top_p=0.99),
    ]
    out = []
    for i, text in enumerate(TEXTS):
        speaker = None if i == 3 else rng.standard_normal(256).astype(np.float32)
        out.append(EngineRequest(tok.encode(text), keys[i], speaker, settings[i], max_new_tokens=[40, 25, 60, 12, 33, 50, 8][i],
                                 tag=i))
    return out


def _alone(dec, request):
    speaker = None if request.speaker is None else request.speaker[None]
    result = dec.generate([request.prompt], speaker, np.asarray(request.key)[None], request.sampling,
                          max_new_tokens=request.max_new_tokens)
    return result.sequences[0], bool(result.finished[0])


@pytest.mark.parametrize("kv_cache", ["float32", "int8"])
def test_engine_tokens_equal_decoding_each_request_alone(model, kv_cache):
    """Seven requests with their own prompts, speakers (one none), sampling settings and limits
    through three slots, a few steps per call, so requests are admitted while others decode and
    slots are reused: every request's tokens are exactly its tokens decoded alone (with an int8
    KV cache too: each row's keys and values are quantised on their own, whatever shares the slots)."""
    dec, tok = model
    dec = dec.with_kv_cache(kv_cache)
    requests = _requests(tok)
    engine = FirstStageEngine(dec, slots=3, steps=5)
    results = engine.run(requests)
    assert [r.tag for r in results] == list(range(len(TEXTS)))
    for request, result in zip(requests, results):
        expected, finished = _alone(dec, request)
        np.testing.assert_array_equal(result.sequence, expected, err_msg=f"request {request.tag}")
        assert result.finished == finished and result.prompt_length == len(request.prompt)
        assert len(result.generated) <= request.max_new_tokens
    assert engine.idle and engine.free_slots == 3


def test_arrivals_between_steps_and_retirement_order(model):
    """Requests submitted one at a time while the engine runs (as a server does) come out equal to
    decoding alone; a short request admitted after a long one retires first."""
    dec, tok = model
    requests = _requests(tok, seed=9)
    engine = FirstStageEngine(dec, slots=2, steps=3)
    done = {}
    pending = list(requests)
    rounds = 0
    while pending or not engine.idle:
        if pending and rounds % 2 == 0:
            engine.submit(pending.pop(0))
        for result in engine.step():
            done[result.tag] = (result, rounds)
        rounds += 1
        assert rounds < 500
    assert sorted(done) == list(range(len(TEXTS)))
    for request in requests:
        expected, _ = _alone(dec, request)
        np.testing.assert_array_equal(done[request.tag][0].sequence, expected)
    # Request 3 (12 tokens, greedy) was submitted after request 2 (60 tokens) and still retired first.
    assert done[3][1] < done[2][1]



@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_a_request_admitted_while_others_run_is_prefilled_in_pieces(model, chunk):
    """Two requests decode; two more arrive after the first call and are prefilled piece by piece inside
    the next calls (pieces of 1, 4 and 16 tokens are shorter than their prompts, 64 covers a prompt's
    bucket): every request's tokens equal decoding it alone (the pieces compute what the whole-prompt
    prefill computes), and the running requests keep producing tokens in every call while the others
    are admitted (no call without their tokens)."""
    dec, tok = model
    requests = _requests(tok, seed=21)[1:5]  # prompts of 8-22 tokens: buckets 16 and 32
    engine = FirstStageEngine(dec, slots=4, steps=3, prefill_chunk=chunk)
    for request in requests[:2]:
        engine.submit(request)
    results = {r.tag: r for r in engine.step()}
    assert engine._prefill is None and len(engine.running) == 2
    for request in requests[2:]:
        engine.submit(request)
    admitting_calls = 0
    while not engine.idle:
        before = dict(zip(engine.running, engine._lengths[list(engine.running)]))
        was_admitting = engine._prefill is not None or bool(engine.waiting)
        for result in engine.step():
            results[result.tag] = result
        if was_admitting or engine._prefill is not None:
            admitting_calls += 1
            running = [s for s in before if s != getattr(engine._prefill, "slot", None)
                       and s in engine.running]
            assert all(engine._lengths[s] > before[s] for s in running)
    longest = max(len(r.prompt) for r in requests[2:])
    assert admitting_calls >= (2 if chunk * engine.steps < longest else 1)
    for request in requests:
        expected, finished = _alone(dec, request)
        np.testing.assert_array_equal(results[request.tag].sequence, expected, err_msg=f"request {request.tag}")
        assert results[request.tag].finished == finished

def test_requests_move_down_when_slots_free_up(model):
    """Four slots, the short requests in slots 0 and 2 retire first: the long one in slot 3 moves
    down to slot 0 so the next calls compute two slots instead of four; tokens still equal alone."""
    dec, tok = model
    requests = _requests(tok, seed=13)[:4]
    for request, new in zip(requests, [4, 30, 4, 30]):
        request.max_new_tokens = new
    engine = FirstStageEngine(dec, slots=4, steps=3)
    results = engine.run(requests)
    assert engine.moves >= 1
    assert any(rows == 2 for _, rows in engine._generate_fns)
    for request, result in zip(requests, results):
        np.testing.assert_array_equal(result.sequence, _alone(dec, request)[0])


def test_compiles_once_per_prompt_bucket_and_window(model):
    dec, tok = model
    engine = FirstStageEngine(dec, slots=2, steps=4)
    engine.run(_requests(tok)[:3])
    first = engine.compile_count
    assert first == len(engine._admit_fns) + len(engine._generate_fns)
    engine.run(_requests(tok, seed=11)[:3])  # new keys, texts of the same buckets: nothing new to compile
    assert engine.compile_count == first


def test_full_calls_read_the_whole_cache_and_row_use_counts_idle_slots(model):
    """With the attention kernel, a call over every slot runs on the whole block (no window copy),
    whatever the lengths; calls over fewer rows keep their windows. ``row_use`` is tokens per
    slot-step computed: below 1 exactly when some slot of a call sat idle."""
    dec, tok = model
    engine = FirstStageEngine(dec, slots=2, steps=4)
    requests = _requests(tok)[:2]
    requests[0].max_new_tokens, requests[1].max_new_tokens = 9, 9  # 8 decode steps each, two calls
    engine.run(requests)
    assert engine.steps_run == 8 and engine.tokens_generated == 16 and engine.row_use == 1.0
    full = [window for window, rows in engine._generate_fns if rows == 2]
    if engine._whole_cache(2):
        assert full == [dec.config.block_size]
    else:
        assert full and max(full) < dec.config.block_size
    engine = FirstStageEngine(dec, slots=2, steps=4)
    requests = _requests(tok)[:2]
    requests[0].max_new_tokens, requests[1].max_new_tokens = 3, 9  # slot 0 idles for 2 of the first 4 steps
    engine.run(requests)
    assert engine.tokens_generated == 10 and engine.row_steps == 2 * 4 + 1 * 4 and engine.row_use == 10 / 12


def test_a_waiting_request_ends_the_call_when_a_slot_frees(model):
    """Two slots busy and a third request waiting: the call ends at the step in which the short
    request finishes (2 of its 8 steps), the waiting request takes that slot at the next call, and
    no slot-step is spent idle until the queue is empty. Without a waiting request the same short
    request idles its slot to the call's end. Tokens equal decoding alone either way."""
    dec, tok = model
    requests = _requests(tok, seed=17)[:3]
    for request, new in zip(requests, [3, 30, 20]):
        request.max_new_tokens = new
    engine = FirstStageEngine(dec, slots=2, steps=8)
    for request in requests:
        engine.submit(request)
    first = engine.step()  # admits requests 0 and 1; request 2 waits
    assert [r.tag for r in first] == [requests[0].tag] and len(engine.waiting) == 1
    assert engine.steps_run == 2 and engine.row_steps == 4 and engine.row_use == 1.0
    results = {r.tag: r for r in first}
    while not engine.idle:
        for result in engine.step():
            results[result.tag] = result
    for request in requests:
        np.testing.assert_array_equal(results[request.tag].sequence, _alone(dec, request)[0])

    engine = FirstStageEngine(dec, slots=2, steps=8)
    out = engine.run(requests[:2])  # nobody waits: slot 0 idles after its 2 steps
    assert engine.row_steps > engine.tokens_generated
    for request, result in zip(requests[:2], out):
        np.testing.assert_array_equal(result.sequence, _alone(dec, request)[0])


def test_block_end_is_reported(converted):
    config, params, tok = load_gpt_stage(converted, "first_stage")
    dec = FirstStageDecoder(config, params, end_of_audio=config.vocab_sizes[0] + 5)  # never produced
    engine = FirstStageEngine(dec, slots=2, steps=64)
    prompt = tok.encode("Never ends.")
    (result,) = engine.run([EngineRequest(prompt, utterance_keys(0, 1)[0], None, SamplingConfig(temperature=0.0))])
    assert result.hit_block_end and not result.finished and len(result.sequence) == config.block_size


def test_bad_requests(model):
    dec, tok = model
    engine = FirstStageEngine(dec, slots=1)
    key = utterance_keys(0, 1)[0]
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit(EngineRequest([], key))
    with pytest.raises(ValueError, match="block"):
        engine.submit(EngineRequest([1] * dec.config.block_size, key))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit(EngineRequest([1, 2], key, max_new_tokens=0))
    with pytest.raises(ValueError, match="slot"):
        FirstStageEngine(dec, slots=0)
    assert engine.idle


def test_synthesis_through_the_engine_equals_static_batches():
    """The scheduler over several texts (one planned into several chunks) gives the same codes with
    the engine (the default on one device, two slots here) as with static batches of two."""
    from mvjax.inference import keys as K
    from mvjax.inference.options import SynthesisOptions
    from mvjax.inference.scheduler import Utterance
    from mvjax.sources.demo import demo_speaker_audio
    from tests.serve_util import demo_tts

    tts = demo_tts()
    voices = np.stack([tts.speaker_embedding(demo_speaker_audio(seed=s)) for s in (0, 1, 0)])
    texts = ["Hello there.", "First sentence is here. " * 6 + "Second part of the text goes on. " * 6 + "And the end. " * 8,
             "Short one."]
    runs = {}
    for batching in ("engine", "static"):
        opts = SynthesisOptions(batch_size=2, max_new_tokens=48, batching=batching, engine_steps=7)
        scheduler = tts.scheduler(opts, audio=False)
        assert (scheduler.engine is not None) == (batching == "engine")
        utterances = [Utterance(tts.plan(text), voices[u], key, opts.sampling) for u, (text, key)
                      in enumerate(zip(texts, K.keys_for(4, range(len(texts)))))]
        scheduler.run(utterances)
        runs[batching] = [c for u in utterances for c in u.chunks]
    assert len(runs["engine"]) > len(texts) + 1
    for a, b in zip(runs["engine"], runs["static"], strict=True):
        assert a.order == b.order and a.text == b.text
        np.testing.assert_array_equal(a.first_stage_codes, b.first_stage_codes)
        np.testing.assert_array_equal(a.all_codebooks, b.all_codebooks)
        assert a.report == b.report
