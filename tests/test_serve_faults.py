"""Fault tests of the speech server (``python -m mvjax.serve``) on the demo model.

Malformed requests, clients that go away, kill -9 during an upload, concurrent uploads of one
name, and a concurrent burst past the queue limit. Every HTTP call has a timeout, every test a
time budget, and every server is stopped (fixtures / try-finally).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from mvjax.serve.voices import UPLOAD_PREFIX
from tests.serve_util import ServerProcess, ThreadServer, demo_server_app

T = 30.0  # seconds: any single HTTP call
UPLOAD_LIMIT = 3_000_000
VOICE_RATE = 16000
MAX_NEW_TOKENS = 256  # bounds the random demo model's work per chunk (it rarely stops by itself)
DEMO_ARGS = ["--demo", "--decoder", "encodec", "--no-enhance", "--max-new-tokens", str(MAX_NEW_TOKENS)]
# The demo model plans it into 12 chunks: more than a serial worker can start within the whole request's
# 1.5 s read timeout below (4 did not suffice once the second stage sampled only the frames it sends).
LONG_TEXT = "This is a sentence of speech. " * 48


# --- helpers ---------------------------------------------------------------------------------


def wav_bytes(seconds: float, seed: int = 0, subtype: str = "PCM_16") -> bytes:
    """A synthetic voice recording of ``seconds`` as a wav file."""
    from mvjax.sources.demo import demo_speaker_audio

    audio, rate = demo_speaker_audio(seed=seed, seconds=seconds)
    buf = io.BytesIO()
    sf.write(buf, np.asarray(audio, np.float32), rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def tone_wav(seconds: float, freq: float = 200.0) -> bytes:
    """A cheap recording (a tone) of ``seconds``: for duration checks that must not be embedded."""
    t = np.arange(int(seconds * VOICE_RATE)) / VOICE_RATE
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), VOICE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    pattern = re.escape(name + ("{" + labels + "}" if labels else "")) + r" ([0-9.e+-]+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def metrics(url: str) -> str:
    r = httpx.get(url + "/metrics", timeout=T)
    assert r.status_code == 200
    return r.text


def wait_idle(url: str, budget: float) -> float:
    """Seconds until /health reports queue_depth 0 (fails past ``budget``)."""
    start = time.monotonic()
    while time.monotonic() - start < budget:
        r = httpx.get(url + "/health", timeout=T)
        assert r.status_code == 200
        if r.json()["queue_depth"] == 0:
            return time.monotonic() - start
        time.sleep(0.2)
    pytest.fail(f"queue_depth did not return to 0 within {budget} s")


def assert_clean_error(r: httpx.Response, what: str, statuses=range(400, 500)) -> dict:
    assert r.status_code in statuses, f"{what}: status {r.status_code}: {r.text[:300]}"
    try:
        body = r.json()
    except ValueError:
        pytest.fail(f"{what}: status {r.status_code} with a non-JSON body {r.text[:200]!r}")
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"{what}: {body}"
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, f"{what}: {err}"
    msg = err["message"]
    assert isinstance(msg, str) and msg.strip(), f"{what}: empty message {err}"
    assert "\n" not in msg and "\r" not in msg, f"{what}: multi-line message {msg!r}"
    assert "Traceback" not in msg and 'File "' not in msg, f"{what}: traceback in {msg!r}"
    return err


def check_audio(fmt: str, body: bytes) -> int:
    """Samples in a valid non-empty response body of ``fmt``."""
    assert body, f"empty {fmt} body"
    if fmt == "pcm":
        assert len(body) % 2 == 0
        return len(body) // 2
    if fmt in ("wav", "flac"):
        audio, rate = sf.read(io.BytesIO(body), dtype="float32")
        assert rate == 24000 and audio.shape[0] > 0 and np.all(np.isfinite(audio))
        return audio.shape[0]
    return len(body)  # mp3 / opus: non-empty is what can be checked without a decoder


def speech(url: str, timeout: float = 120, **fields) -> httpx.Response:
    body = {"model": "metavoice-1b", "voice": "demo", "response_format": "wav", **fields}
    return httpx.post(url + "/v1/audio/speech", json=body, timeout=timeout)


# --- the in-process server (one demo model for the module) -----------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from mvjax.serve.settings import ServerSettings
    from mvjax.serve.voices import VoiceLimits

    voices = tmp_path_factory.mktemp("voices")
    settings = ServerSettings(model_name="metavoice-1b-demo", max_batch=8, max_queue=8, decoder="encodec",
                              enhance=False, response_format="wav", max_new_tokens=MAX_NEW_TOKENS,
                              voice_limits=VoiceLimits(max_upload_bytes=UPLOAD_LIMIT))
    app, tts = demo_server_app(settings=settings, voices_dir=voices)
    srv = ThreadServer(app).start()
    srv.tts, srv.app, srv.voices = tts, app, voices
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def serial(server):
    """A second app on the same model and voices with ``max_batch=1``: one chunk per batch.

    With a larger max_batch the worker puts every chunk of a lone request into its first batch
    (up to max_batch of them), so nothing is left to cancel when its client goes away; see the
    report. Only one of the two servers works at a time (they share the model)."""
    import dataclasses

    from mvjax.serve.app import create_app

    state = server.app.state.mvjax
    app = create_app(server.tts, state.registry, dataclasses.replace(state.settings, max_batch=1))
    srv = ThreadServer(app).start()
    srv.tts = server.tts
    try:
        yield srv
    finally:
        srv.stop()


# --- 1. malformed requests -------------------------------------------------------------------


def _malformed_cases() -> list[tuple[str, str, str, dict]]:
    """(label, method, path, httpx kwargs): 200 requests that must each be refused with a 4xx."""
    S = "/v1/audio/speech"
    ok = {"model": "metavoice-1b", "input": "Hello there.", "voice": "demo", "response_format": "wav"}
    cases: list[tuple[str, str, str, dict]] = []

    def js(label, body, path=S, method="POST"):
        cases.append((label, method, path, {"json": body}))

    def raw(label, content, headers=None, path=S, method="POST"):
        cases.append((label, method, path, {"content": content,
                                            "headers": headers or {"content-type": "application/json"}}))

    # bad JSON
    for i, text in enumerate(['{', '{"input": "hi", "voice": "demo"', 'not json', '{"input": hi}', "{'input': 'x'}",
                              '{"input": "a",}', '[1, 2', '', '   ', '{"input": "\\ud800x", "voice": "demo"']):
        raw(f"badjson{i}", text.encode())
    raw("badutf8", b'{"input": "\xff\xfe", "voice": "demo"}')
    raw("nul", b"\x00" * 64)
    # not an object
    for i, v in enumerate([[1, 2], "text", 123, None, True, [ok]]):
        js(f"notobject{i}", v)
    # missing fields
    for drop in (["input"], ["voice"], ["input", "voice"], list(ok)):
        js(f"missing-{'-'.join(drop)}", {k: v for k, v in ok.items() if k not in drop})
    # unknown fields
    for extra in ("foo", "speaker", "voice_id", "text", "Input", "max_tokens", "speaker_ref_path", "lang", "",
                  "stream_options"):
        js(f"unknown-{extra}", {**ok, extra: 1})
    # wrong types and out-of-range values, field by field
    bad_values = {
        "input": [1, 1.5, True, None, ["hi"], {"t": "hi"}],
        "voice": [1, None, ["demo"], {"name": "demo"}, False],
        "model": [1, None, ["m"], {}],
        "response_format": [1, ["wav"], "aac", "WAVE", "mp4", "wav;rate=8000", "../wav", "ogg"],
        "speed": ["fast", 0, 0.5, 2, 4.0, -1, 0.999, True, [1]],
        "instructions": ["speak slowly", 1, ["x"]],
        "stream_format": ["events", "", 1],  # "sse" is valid: server-sent events
        "stream": ["yes", 1, 0, "true", None, [True]],
        "seed": [-1, 2**32, 2**64, 1.5, "1", True, [1], -(2**63)],
        "temperature": [-0.1, 5.01, 100, "1", None, True, [1.0], float("nan"), float("inf"), -1e300],
        "top_p": [0, -0.5, 1.0001, 2, "0.9", None, False, float("nan")],
        "guidance_scale": [-1, 10.5, 1e9, "3", None, True, float("-inf")],
        "decoder": ["vocos", "MBD", "", 1, True],
        "enhance": ["yes", 1, 0, "false", [True]],
    }
    for field, values in bad_values.items():
        for i, v in enumerate(values):
            if isinstance(v, float) and not np.isfinite(v):  # JSON's NaN/Infinity extension, sent raw
                raw(f"{field}-nonfinite{i}", json.dumps({**ok, field: v}).encode())
            else:
                js(f"{field}-bad{i}", {**ok, field: v})
    # streaming formats that cannot stream
    for fmt in ("mp3", "flac"):
        js(f"stream-{fmt}", {**ok, "response_format": fmt, "stream": True})
    # empty, whitespace-only, over-limit and untokenisable text
    for i, text in enumerate(["", " ", "\n\t  \r\n", "\u3000\u2003", "*", " * * ", "\t*\n"]):
        js(f"emptytext{i}", {**ok, "input": text})
    for n in (4097, 5000, 12000):
        js(f"longtext{n}", {**ok, "input": "a" * n})
    js("longtext-words", {**ok, "input": "word " * 1000})
    for i, text in enumerate(["Hello 😀 there.", "你好，世界。", "Zero\u200bwidth", "Привет.", "\U0001F600" * 50,
                              "ok " * 10 + "\u2603", "Arabic مرحبا"]):
        js(f"untokenisable{i}", {**ok, "input": text})
    # voices that do not exist or are not names
    for i, v in enumerate(["nobody", "", " ", "../etc/passwd", "/etc/passwd", "demo\n", "DEMO", "a" * 500,
                           "demo.npz", "http://example.com/x.wav", "..", "demo "]):
        js(f"voice{i}", {**ok, "voice": v})
    # oversized bodies
    raw("oversized-json", json.dumps({**ok, "input": "a" * 70_000}).encode())
    raw("oversized-padding", json.dumps({**ok, "model": "m" * 100_000}).encode())
    cases.append(("oversized-chunked", "POST", S, {"content": iter([json.dumps({**ok, "input": "b" * 80_000}).encode()]),
                                                   "headers": {"content-type": "application/json"}}))
    # wrong content types
    raw("form-as-json", b"input=hi&voice=demo", {"content-type": "application/x-www-form-urlencoded"})
    raw("text-plain", b"hello", {"content-type": "text/plain"})
    cases.append(("multipart-to-speech", "POST", S, {"data": {"input": "hi", "voice": "demo"},
                                                     "files": {"f": ("a.txt", b"x")}}))
    # wrong methods and paths
    for method, path in [("GET", S), ("PUT", S), ("DELETE", S), ("PATCH", "/v1/voices"), ("PUT", "/v1/voices"),
                         ("POST", "/v1/audio/voices"), ("DELETE", "/v1/audio/voices"), ("POST", "/health"),
                         ("DELETE", "/metrics"), ("GET", "/tts"), ("POST", "/v1/models"), ("GET", "/nope"),
                         ("POST", "/v1/audio/speech/extra"), ("GET", "/v1/voices/demo/x"), ("GET", "/v1/audio"),
                         ("GET", "/../../etc/passwd"), ("POST", "/v1/audio/transcriptions"),
                         ("DELETE", "/v1/voices/demo"), ("DELETE", "/v1/voices/nobody"),
                         ("DELETE", "/v1/voices/bad%20name"), ("DELETE", "/v1/voices/" + "x" * 100)]:
        cases.append((f"route-{method}-{path[:30]}", method, path, {}))

    # voice uploads: bad names, bad audio, wrong fields
    good = wav_bytes(2.0)
    not_audio = [b"hello, this is not audio" * 10, b"", good[:44], good[:20], b"RIFF\xff\xff\xff\xffWAVEfmt ",
                 b"\x00" * 5000, b"ID3" + b"\x00" * 500, b"fLaC" + b"\x01" * 100, b"OggS" + b"\x00" * 200,
                 bytes(range(256)) * 8]
    for i, data in enumerate(not_audio):
        cases.append((f"upload-notaudio{i}", "POST", "/v1/voices",
                      {"data": {"name": f"bad{i}"}, "files": {"file": ("x.wav", data, "audio/wav")}}))
    for i, data in enumerate([tone_wav(0.3), tone_wav(0.9), tone_wav(61.0)]):
        cases.append((f"upload-duration{i}", "POST", "/v1/voices",
                      {"data": {"name": f"dur{i}"}, "files": {"file": ("x.wav", data, "audio/wav")}}))
    cases.append(("upload-oversized", "POST", "/v1/voices",
                  {"data": {"name": "big"}, "files": {"file": ("x.wav", b"\x00" * (UPLOAD_LIMIT + 200_000))}}))
    for i, name in enumerate(["", "a b", ".hidden", "x" * 65, "../x", "é", "a/b", "name\n", "demo"]):
        cases.append((f"upload-name{i}", "POST", "/v1/voices",
                      {"data": {"name": name}, "files": {"file": ("x.wav", good, "audio/wav")}}))
    for i, kw in enumerate([
        {"data": {"name": "nofile"}},
        {"files": {"file": ("x.wav", good, "audio/wav")}},
        {"data": {"voice": "w1"}, "files": {"file": ("x.wav", good, "audio/wav")}},
        {"data": {"name": "w2"}, "files": {"audio": ("x.wav", good, "audio/wav")}},
        {"data": {"name": "w3", "file": "not a file"}},
        {"json": {"name": "w4", "file": "aGVsbG8="}},
        {"data": {"name": "w5", "replace": "maybe"}, "files": {"file": ("x.wav", good, "audio/wav")}},
    ]):
        cases.append((f"upload-fields{i}", "POST", "/v1/voices", kw))

    # the reference /tts form
    audio = ("ref.wav", good, "audio/wav")
    for i, (data, files) in enumerate([
        ({}, {"audiodata": audio}),
        ({"text": ""}, {"audiodata": audio}),
        ({"text": "   "}, {"audiodata": audio}),
        ({"text": "a" * 4097}, {"audiodata": audio}),
        ({"text": "Hi."}, None),
        ({"text": "Hi.", "voice": "nobody"}, None),
        ({"text": "Hi.", "speaker_ref_path": "/etc/passwd"}, None),
        ({"text": "Hi.", "speaker_ref_path": "http://example.com/a.wav", "voice": "demo"}, None),
        ({"text": "Hi.", "guidance": "6"}, {"audiodata": audio}),
        ({"text": "Hi.", "guidance": "-1", "voice": "demo"}, None),
        ({"text": "Hi.", "guidance": "abc", "voice": "demo"}, None),
        ({"text": "Hi.", "top_p": "1.5", "voice": "demo"}, None),
        ({"text": "Hi.", "top_p": "-0.1", "voice": "demo"}, None),
        ({"text": "Hi.", "seed": "-1", "voice": "demo"}, None),
        ({"text": "Hi.", "seed": "x", "voice": "demo"}, None),
        ({"text": "Hi.", "seed": str(2**40), "voice": "demo"}, None),
        ({"text": "Hi."}, {"audiodata": ("x.wav", b"not audio at all", "audio/wav")}),
        ({"text": "Hi."}, {"audiodata": ("x.wav", b"", "audio/wav")}),
        ({"text": "Hi."}, {"audiodata": ("x.wav", good[:44], "audio/wav")}),
        ({"text": "Hi."}, {"audiodata": ("x.wav", tone_wav(0.4), "audio/wav")}),
        ({"text": "Hi."}, {"audio": audio}),
        ({"text": "Hello 😀."}, {"audiodata": audio}),
        ({"text": "*"}, {"audiodata": audio}),
    ]):
        cases.append((f"tts{i}", "POST", "/tts", {"data": data, "files": files} if files else {"data": data}))

    # fill up to 200 with seeded random mixes of one bad field over a valid body
    rng = np.random.default_rng(1234)
    fields = list(bad_values)
    i = 0
    while len(cases) < 200:
        field = fields[rng.integers(len(fields))]
        values = [v for v in bad_values[field] if not (isinstance(v, float) and not np.isfinite(v))]
        body = {**ok, "seed": int(rng.integers(0, 2**31)), "input": "Random text %d." % i}
        body[field] = values[rng.integers(len(values))]
        js(f"mix{i}-{field}", body)
        i += 1
    return cases[:200]


def test_malformed_requests_get_clean_4xx(server):
    cases = _malformed_cases()
    assert len(cases) == 200 and len({c[0] for c in cases}) == 200
    start = time.monotonic()
    failures = []
    with httpx.Client(base_url=server.url, timeout=T) as client:
        for label, method, path, kwargs in cases:
            assert time.monotonic() - start < 150, "the malformed requests took too long"
            try:
                r = client.request(method, path, **kwargs)
                assert_clean_error(r, label)
            except AssertionError as exc:
                failures.append(str(exc).split("\nassert")[0])
            except httpx.HTTPError as exc:
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
    assert not failures, f"{len(failures)} of 200 bad answers:\n" + "\n".join(failures)
    # still healthy, and serving
    r = httpx.get(server.url + "/health", timeout=T)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = speech(server.url, input="Hello there.", seed=7)
    assert r.status_code == 200, r.text[:300]
    check_audio("wav", r.content)
    assert not list(server.voices.iterdir()), "a refused upload was stored"


# --- 2. clients that go away -----------------------------------------------------------------


@pytest.mark.parametrize("which", ["serial", "server"])
def test_stream_disconnect_cancels_remaining_chunks(which, request):
    """``serial``: max_batch 1; ``server``: max_batch 8 (the default, through the engine), where a
    streamed request still has one chunk in flight at a time: a client leaving after the first
    audio leaves the chunks after the next one uncomputed (counted as chunks started)."""
    server = request.getfixturevalue(which)
    planned = len(server.tts.plan(LONG_TEXT))
    assert planned >= 3
    wait_idle(server.url, 120)
    before = metrics(server.url)
    start = time.monotonic()
    with httpx.Client(timeout=httpx.Timeout(T, read=120)) as client:
        with client.stream("POST", server.url + "/v1/audio/speech",
                           json={"input": LONG_TEXT, "voice": "demo", "response_format": "pcm", "stream": True,
                                 "seed": 3}) as r:
            assert r.status_code == 200
            first = next(r.iter_raw())
            assert first
        # leaving the blocks closes the response and its connection
    wait_idle(server.url, 90)
    assert time.monotonic() - start < 150
    after = metrics(server.url)
    computed = metric(after, "mvjax_chunks_started_total") - metric(before, "mvjax_chunks_started_total")
    dropped = (metric(after, "mvjax_jobs_dropped_total", 'reason="Cancelled"')
               - metric(before, "mvjax_jobs_dropped_total", 'reason="Cancelled"'))
    assert dropped == 1 and 1 <= computed < planned, \
        f"{computed} chunks computed of {planned} planned; cancelled jobs counted: {dropped}"


def test_whole_request_client_timeout_cancels(serial):
    server = serial
    planned = len(server.tts.plan(LONG_TEXT))
    wait_idle(server.url, 120)
    before = metrics(server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/audio/speech", json={"input": LONG_TEXT, "voice": "demo", "seed": 4},
                   timeout=httpx.Timeout(T, read=1.5))
    wait_idle(server.url, 90)
    after = metrics(server.url)
    computed = metric(after, "mvjax_chunks_started_total") - metric(before, "mvjax_chunks_started_total")
    dropped = (metric(after, "mvjax_jobs_dropped_total", 'reason="Cancelled"')
               - metric(before, "mvjax_jobs_dropped_total", 'reason="Cancelled"'))
    assert dropped == 1 and computed < planned, \
        f"{computed} chunks computed of {planned} planned; cancelled jobs counted: {dropped}"
    r = httpx.get(server.url + "/health", timeout=T)
    assert r.status_code == 200 and r.json()["queue_depth"] == 0


# --- 4. concurrent uploads of one name -------------------------------------------------------


def test_concurrent_uploads_of_one_name(server):
    uploads = [wav_bytes(1.5, seed=10 + i) for i in range(8)]
    shas = [hashlib.sha256(u).hexdigest() for u in uploads]
    assert len(set(shas)) == 8
    barrier = threading.Barrier(8)

    def upload(i):
        barrier.wait(30)
        return httpx.post(server.url + "/v1/voices", data={"name": "same"},
                          files={"file": (f"take{i}.wav", uploads[i], "audio/wav")}, timeout=120)

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(upload, range(8)))
    statuses = [r.status_code for r in answers]
    assert sorted(statuses) == [201] + [409] * 7, statuses
    for r in answers:
        if r.status_code == 409:
            assert_clean_error(r, "conflict", [409])
    winner = statuses.index(201)
    assert answers[winner].json()["sha256"] == shas[winner]
    listed = [v for v in httpx.get(server.url + "/v1/voices", timeout=T).json()["data"] if v["name"] == "same"]
    assert len(listed) == 1 and listed[0]["sha256"] == shas[winner]
    with np.load(server.voices / "same.npz") as npz:
        assert str(npz["sha256"]) == shas[winner]
        np.testing.assert_array_equal(npz["embedding"], server.app.state.mvjax.registry.get("same"))
    assert sorted(p.name for p in server.voices.iterdir()) == ["same.npz"]
    # the same bytes again: 200 (an idempotent repeat) with the stored voice, unchanged
    r = httpx.post(server.url + "/v1/voices", data={"name": "same"},
                   files={"file": ("again.wav", uploads[winner], "audio/wav")}, timeout=120)
    assert r.status_code == 200 and r.json()["sha256"] == shas[winner]


# --- 5. a burst past the queue limit ---------------------------------------------------------


def test_burst_of_50(server):
    texts = ["Hi.", "Hello there.", "Good morning to you.", "One, two, three.", "See you soon!"]
    formats = ["wav", "pcm", "flac", "wav", "opus", "mp3"]
    rng = np.random.default_rng(5)
    reqs = []
    for i in range(50):
        fmt = formats[i % len(formats)]
        reqs.append({"input": texts[rng.integers(len(texts))], "voice": "demo", "response_format": fmt,
                     "seed": int(rng.integers(0, 2**32)), "stream": bool(fmt in ("wav", "pcm") and i % 4 == 0)})
    wait_idle(server.url, 120)
    start = time.monotonic()
    barrier = threading.Barrier(50)

    def send(req):
        barrier.wait(30)
        return httpx.post(server.url + "/v1/audio/speech", json=req, timeout=240)

    with cf.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(send, reqs))
    elapsed = time.monotonic() - start
    assert len(answers) == 50
    ok, busy = [], []
    for req, r in zip(reqs, answers):
        if r.status_code == 200:
            assert r.headers["x-seed"] == str(req["seed"])
            check_audio(req["response_format"], r.content)
            ok.append((req, r))
        else:
            assert_clean_error(r, f"burst {req}", [503])
            assert int(r.headers["retry-after"]) >= 1
            busy.append(req)
    assert ok, "no request of the burst was served"
    assert busy, "max-queue 8 refused none of 50 concurrent requests"
    assert elapsed < 240
    wait_idle(server.url, 60)
    # nothing mixed: the same request alone gives the same audio
    # Whole (non-streamed) lossless answers only: a streamed answer's codebooks 3-8 of early frames come from
    # partial second-stage passes whose extent depends on how the engine's calls fell (README, "Streaming
    # within a chunk"), so it is not the whole answer's audio by design. 30 of the 50 requests qualify; all 8+
    # served ones missing them has probability ~2e-4.
    replay = [x for x in ok if x[0]["response_format"] in ("wav", "pcm", "flac") and not x[0]["stream"]][:2]
    assert replay
    diffs = []
    for req, r in replay:
        again = httpx.post(server.url + "/v1/audio/speech", json=req, timeout=240)
        assert again.status_code == 200
        if again.content == r.content:
            diffs.append(0.0)
            continue
        a = _samples(req["response_format"], r.content)
        b = _samples(req["response_format"], again.content)
        assert a.shape == b.shape, f"{req}: {a.shape} vs {b.shape}"
        diffs.append(float(np.max(np.abs(a - b))))
    print(f"burst: {len(ok)} served, {len(busy)} refused with 503 in {elapsed:.1f} s; replay max abs diff {diffs}")
    assert max(diffs) <= 2e-3, f"replayed audio differs: {diffs}"


def _samples(fmt: str, body: bytes) -> np.ndarray:
    if fmt == "pcm":
        return np.frombuffer(body, "<i2").astype(np.float32) / 32768
    return sf.read(io.BytesIO(body), dtype="float32")[0]


# --- 3. kill -9 during a voice upload --------------------------------------------------------


def _multipart(name: str, data: bytes, boundary: str = "mvjaxfaultboundary") -> tuple[bytes, str]:
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _check_registry(srv: ServerProcess, voices: Path, a_sha: str, b_sha: str) -> set:
    names = set(httpx.get(srv.url + "/v1/audio/voices", timeout=T).json()["voices"])
    listed = {v["name"]: v for v in httpx.get(srv.url + "/v1/voices", timeout=T).json()["data"]}
    assert "a" in names and listed["a"]["sha256"] == a_sha
    if "b" in names:
        assert listed["b"]["sha256"] == b_sha
        with np.load(voices / "b.npz") as npz:
            assert str(npz["sha256"]) == b_sha and npz["embedding"].shape == (listed["b"]["dims"],)
    left = sorted(p.name for p in voices.iterdir())
    assert all(n.endswith(".npz") for n in left), f"stray files in the voice directory: {left}"
    assert {n[:-4] for n in left} == names - {"demo"}, (left, names)
    return names


def _upload_dirs(root: Path) -> list:
    return [p for p in root.iterdir() if p.name.startswith(UPLOAD_PREFIX)]


def test_kill_during_upload_keeps_registry(tmp_path):
    deadline = time.monotonic() + 200
    voices = tmp_path / "voices"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {"TMPDIR": str(scratch)}
    a = wav_bytes(3.0, seed=1)
    b = wav_bytes(55.0, seed=2)
    a_sha, b_sha = (hashlib.sha256(x).hexdigest() for x in (a, b))
    log = tmp_path / "server.log"

    def start():
        return ServerProcess([*DEMO_ARGS, "--voices", str(voices)], log, env=env, start_timeout=120).start()

    srv = start()
    try:
        r = httpx.post(srv.url + "/v1/voices", data={"name": "a"}, files={"file": ("a.wav", a, "audio/wav")},
                       timeout=120)
        assert r.status_code == 201, r.text
        # 1) killed while the body of "b" is still arriving
        body, ctype = _multipart("b", b)
        sent = threading.Event()

        def slow_body():
            step = 64 * 1024
            for i in range(0, len(body), step):
                yield body[i:i + step]
                if i >= len(body) // 2:
                    sent.set()
                    time.sleep(0.5)

        def upload():
            try:
                httpx.post(srv.url + "/v1/voices", content=slow_body(), headers={"content-type": ctype}, timeout=60)
            except httpx.HTTPError:
                pass

        t = threading.Thread(target=upload, daemon=True)
        t.start()
        assert sent.wait(60)
        srv.kill()
        t.join(60)
        srv.stop()
        orphans = _upload_dirs(scratch)
        srv = start()
        assert _check_registry(srv, voices, a_sha, b_sha) >= {"a"}
        assert not any(p.exists() for p in orphans), "the restart left the killed server's upload copy"
        # 2) killed after the whole body is in (reading or embedding it)
        result = {}

        def upload_whole():
            try:
                result["r"] = httpx.post(srv.url + "/v1/voices", data={"name": "b"},
                                         files={"file": ("b.wav", b, "audio/wav")}, timeout=60)
            except httpx.HTTPError as exc:
                result["e"] = exc

        t = threading.Thread(target=upload_whole, daemon=True)
        t.start()
        time.sleep(0.4)
        srv.kill()
        t.join(60)
        srv.stop()
        orphans += _upload_dirs(scratch)
        srv = start()
        names = _check_registry(srv, voices, a_sha, b_sha)
        assert not any(p.exists() for p in orphans), "the restart left the killed server's upload copy"
        # "a" is usable after two kills
        r = speech(srv.url, input="Hi.", voice="a", seed=1, timeout=120)
        assert r.status_code == 200, r.text[:300]
        check_audio("wav", r.content)
        print(f"after kill during embedding: b {'stored' if 'b' in names else 'absent'}; "
              f"upload answer: {result.get('r') or result.get('e')!r}")
        assert time.monotonic() < deadline
    finally:
        srv.stop()
    leftovers = list(scratch.rglob("*"))
    print(f"upload copies the killed servers left, removed at restart: {len(orphans)}; "
          f"anything else left in TMPDIR: {len(leftovers)}")
    assert not _upload_dirs(scratch)
