"""The speech server's HTTP API on the demo model, driven by the official OpenAI client and httpx."""

import io
import logging
import re
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.serve_util import (
    DEMO_ARGS,
    TEST_MAX_NEW_TOKENS,
    LogWatch,
    ServerProcess,
    ThreadServer,
    demo_server_app,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ONE_CHUNK = "Hello there, this is a test."
MULTI_CHUNK = ("The first sentence of a longer text is here. " * 3 + "Then the second part of it follows on. " * 3
               + "And finally the end arrives.")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An in-process server (demo model, plain codec, no enhancement) and its model."""
    app, tts = demo_server_app(voices_dir=tmp_path_factory.mktemp("voices"))
    with ThreadServer(app) as srv:
        yield srv, tts


@pytest.fixture(scope="module")
def voice_wav(tmp_path_factory):
    from mvjax.sources.demo import demo_speaker_audio

    audio, rate = demo_speaker_audio(seed=3)
    path = tmp_path_factory.mktemp("rec") / "rec.wav"
    sf.write(path, audio, rate)
    return path


def _client(srv, key="unused"):
    from openai import OpenAI

    return OpenAI(base_url=srv.url + "/v1", api_key=key, timeout=300, max_retries=0)


def _library_audio(tts, text, seed):
    """What mvjax.TTS.synthesize gives for the request (same decoder and post-processing)."""
    from mvjax.sources.demo import demo_speaker_audio

    speech = tts.synthesize(text, tts.speaker_embedding(demo_speaker_audio()), seed=seed, decoder="encodec",
                            enhance=False, max_new_tokens=TEST_MAX_NEW_TOKENS)
    return speech.audio, speech.sample_rate


def test_openai_client_whole_response_equals_the_library(served):
    srv, tts = served
    audio = _client(srv).audio.speech.create(model="tts-1", voice="demo", input=ONE_CHUNK, response_format="wav",
                                             extra_body={"seed": 5})
    data, rate = sf.read(io.BytesIO(audio.content), dtype="int16")
    want, want_rate = _library_audio(tts, ONE_CHUNK, 5)
    assert rate == want_rate == 24000
    want16 = np.round(np.clip(want, -1, 1) * 32767).astype(np.int32)
    assert data.shape[0] == want16.shape[0] > 0
    # The same tokens and decoder: equal up to one step of int16 rounding.
    assert np.abs(data.astype(np.int32) - want16).max() <= 1


def test_openai_client_streams_pcm(served):
    srv, _ = served
    client = _client(srv)
    pieces = []
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="demo", input=MULTI_CHUNK, response_format="pcm",
        extra_body={"stream": True, "seed": 9, "stream_lookahead": -1},
    ) as response:
        assert response.headers["x-sample-rate"] == "24000"
        assert response.headers["x-seed"] == "9"
        assert response.headers["content-type"].startswith("audio/pcm")
        for piece in response.iter_bytes():
            pieces.append(piece)
    streamed = np.frombuffer(b"".join(pieces), np.int16)
    whole = client.audio.speech.create(model="tts-1", voice="demo", input=MULTI_CHUNK, response_format="pcm",
                                       extra_body={"seed": 9})
    whole = np.frombuffer(whole.content, np.int16)
    # Same tokens, same crossfades: as long as the whole answer; the stream's one gain (from its
    # first chunk) differs from the whole text's only by a constant factor before the soft clipper.
    assert streamed.shape == whole.shape and streamed.shape[0] > 0
    assert np.corrcoef(streamed.astype(np.float64), whole.astype(np.float64))[0, 1] > 0.99


def test_streamed_wav_has_a_streaming_header_and_single_chunk_equals_whole(served):
    srv, _ = served
    body = {"input": ONE_CHUNK, "voice": "demo", "response_format": "wav", "seed": 2}
    streamed = {}
    for lookahead in (-1, None):  # whole chunks (the whole answer's codes), then the default: audio within the chunk
        extra = {} if lookahead is None else {"stream_lookahead": lookahead}
        with httpx.stream("POST", srv.url + "/v1/audio/speech", json={**body, "stream": True, **extra},
                          timeout=300) as r:
            assert r.status_code == 200
            streamed[lookahead] = b"".join(r.iter_bytes())
    whole = httpx.post(srv.url + "/v1/audio/speech", json=body, timeout=300).content
    assert streamed[-1][:4] == b"RIFF" and streamed[-1][4:8] == b"\xff\xff\xff\xff"
    assert streamed[-1][44:] == whole[44:]  # one chunk: the stream's gain is the whole text's
    # Streaming within the chunk changes some codebook 3-8 codes, never the length.
    assert len(streamed[None]) == len(whole) and streamed[None][44:] != whole[44:]


def test_sse_events_carry_the_streamed_audio(served):
    """stream_format "sse": speech.audio.delta events whose base64 audio, joined, is the raw stream;
    then one speech.audio.done with the usage."""
    import base64
    import json

    srv, _ = served
    body = {"input": ONE_CHUNK, "voice": "demo", "response_format": "pcm", "seed": 4, "stream_lookahead": -1}
    with httpx.stream("POST", srv.url + "/v1/audio/speech", json={**body, "stream_format": "sse"}, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    raw = httpx.post(srv.url + "/v1/audio/speech", json={**body, "stream": True}, timeout=300).content
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] > 0
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == raw


def test_unsupported_values_are_named(served):
    srv, _ = served
    url = srv.url + "/v1/audio/speech"
    cases = {
        "speed": {"speed": 1.5},
        "instructions": {"instructions": "whisper"},
        "response_format": {"response_format": "aac"},
        "voice": {"voice": "alloy"},
        "temperature": {"temperature": "hot"},
        "nonsense": {"nonsense": 1},
    }
    for param, extra in cases.items():
        r = httpx.post(url, json={"input": "Hi.", "voice": "demo", **extra}, timeout=30)
        assert r.status_code == 400, (param, r.text)
        error = r.json()["error"]
        assert error["param"] == param and param in error["message"]
    r = httpx.post(url, json={"input": "Hi.", "voice": "demo", "response_format": "mp3", "stream": True}, timeout=30)
    assert r.status_code == 400 and "cannot be streamed" in r.json()["error"]["message"]


def test_voice_upload_use_and_delete(served, voice_wav):
    srv, _ = served
    with open(voice_wav, "rb") as fh:
        r = httpx.post(srv.url + "/v1/voices", data={"name": "alice"}, files={"file": ("rec.wav", fh, "audio/wav")},
                       timeout=120)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "alice"
    assert "alice" in httpx.get(srv.url + "/v1/audio/voices").json()["voices"]
    assert {"alice", "demo"} <= {v["name"] for v in httpx.get(srv.url + "/v1/voices").json()["data"]}
    audio = _client(srv).audio.speech.create(model="tts-1", voice="alice", input="Hi there.", response_format="flac",
                                             extra_body={"seed": 1})
    data, rate = sf.read(io.BytesIO(audio.content))
    assert rate == 24000 and data.shape[0] > 0
    assert httpx.delete(srv.url + "/v1/voices/demo").status_code == 403
    assert httpx.delete(srv.url + "/v1/voices/alice").json()["deleted"] is True
    r = httpx.post(srv.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "alice"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "voice"


def test_reference_tts_form_api(served, voice_wav):
    srv, _ = served
    with open(voice_wav, "rb") as fh:
        r = httpx.post(srv.url + "/tts", data={"text": "Testing the form.", "guidance": "3.0", "top_p": "0.95"},
                       files={"audiodata": ("ref.wav", fh, "audio/wav")}, timeout=300)
    assert r.status_code == 200, r.text
    data, rate = sf.read(io.BytesIO(r.content))
    assert r.headers["content-type"] == "audio/wav" and data.shape[0] > 0
    r = httpx.post(srv.url + "/tts", data={"text": "Hi.", "speaker_ref_path": "/etc/passwd"}, timeout=30)
    assert r.status_code == 400 and "never opens a path" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/tts", data={"text": "Hi.", "guidance": "11"}, timeout=30)  # the range is 0-10
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance"


def test_metrics_health_docs(served):
    srv, _ = served
    health = httpx.get(srv.url + "/health").json()
    assert health["status"] == "ok" and "wav" in health["formats"]
    assert "/v1/audio/speech" in httpx.get(srv.url + "/openapi.json").json()["paths"]
    assert httpx.get(srv.url + "/docs").status_code == 200
    text = httpx.get(srv.url + "/metrics").text
    assert 'mvjax_requests_total{route="/v1/audio/speech",status="200"}' in text
    for name in ("mvjax_queue_depth", "mvjax_batch_size_count", "mvjax_speech_latency_seconds_bucket",
                 "mvjax_time_to_first_audio_seconds_count", "mvjax_stage1_tokens_per_second"):
        assert name in text
    batches = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("mvjax_batch_size_count")))
    assert batches >= 1


FORGED = "2024-01-01 12:00:00,000 mvjax.serve INFO FORGED admin login ok"


def test_client_text_cannot_forge_log_lines(served):
    """Paths (and voice names in them) reach the access log escaped and capped: a %0A or NUL in
    the request writes no line of the client's own."""
    srv, _ = served
    with LogWatch() as logs:
        assert httpx.get(srv.url + "/x%0A" + FORGED + "%00%0D%1B[31m").status_code == 404
        assert httpx.delete(srv.url + "/v1/voices/bob%0A" + FORGED).status_code == 404
        assert httpx.get(srv.url + "/long" + "%0A" * 3000).status_code == 404
        line = logs.wait_for("GET /x")
        logs.wait_for("DELETE /v1/voices/bob")
        long = logs.wait_for("GET /long")
    assert line.startswith("GET /x\\n" + FORGED + "\\x00\\r\\x1b[31m 404 ")
    assert len(long) < 500 and "..." in long
    for text in logs.lines():
        assert not text.startswith(("2024", "FORGED")) and not any(c in text for c in "\x00\r\x1b"), text


def test_each_request_logs_one_info_line_with_its_synthesis(served):
    """A speech request, whole or streamed, writes one INFO line (any mvjax logger): its access line,
    which carries the job's summary; the engine's rounds log at DEBUG only."""
    srv, _ = served
    with LogWatch("mvjax", logging.DEBUG) as logs:
        whole = httpx.post(srv.url + "/v1/audio/speech", timeout=300,
                           json={"input": MULTI_CHUNK, "voice": "demo", "seed": 5, "response_format": "wav"})
        with httpx.stream("POST", srv.url + "/v1/audio/speech", timeout=300,
                          json={"input": ONE_CHUNK, "voice": "demo", "seed": 6, "response_format": "pcm",
                                "stream": True}) as r:
            streamed = r.read()
        assert whole.status_code == 200 and r.status_code == 200 and streamed
        logs.wait_for(re.compile(r"POST .* seed 6, "))  # the access line is written once the stream has ended
    info = [rec for rec in logs.records if rec.levelno >= logging.INFO]
    assert len(info) == 2, [rec.getMessage() for rec in info]
    for rec, seed, text in zip(info, (5, 6), (MULTI_CHUNK, ONE_CHUNK)):
        line = rec.getMessage()
        assert re.fullmatch(rf"POST /v1/audio/speech 200 \d+ ms \(job \d+: ok, voice demo, seed {seed}, "
                            rf"\d+ characters in \d+ chunks, [1-9]\d* tokens, first audio after [\d.]+ s, [\d.]+ s\)",
                            line), line
        assert text not in line  # the text itself only with --log-text
    # the rounds are there, at DEBUG (per-chunk lines too, on a logger the synthesize CLI sets for itself)
    assert any(rec.getMessage().startswith("batch:") for rec in logs.records if rec.levelno == logging.DEBUG)


def test_cross_site_requests_are_refused(served, voice_wav):
    """With no API key, a page on another origin may not upload, speak or delete: JSON 403 before
    any work; the server's own page (whatever host name reached it) and non-browser clients may."""
    srv, _ = served
    evil = {"Origin": "http://evil.example"}
    speech = {"input": "", "voice": "demo"}  # refused after the origin check (400), so nothing is synthesised

    def attempts(headers):
        with open(voice_wav, "rb") as fh:
            yield httpx.post(srv.url + "/v1/voices", data={"name": "x"}, files={"file": ("r.wav", fh, "audio/wav")},
                             headers=headers, timeout=120)
        with open(voice_wav, "rb") as fh:
            yield httpx.post(srv.url + "/tts", data={"text": ""}, files={"audiodata": ("r.wav", fh, "audio/wav")},
                             headers=headers, timeout=120)
        yield httpx.post(srv.url + "/v1/audio/speech", json=speech, headers=headers, timeout=30)
        yield httpx.delete(srv.url + "/v1/voices/nobody", headers=headers)

    for r in attempts(evil):
        assert r.status_code == 403, (r.request.url, r.text)
        error = r.json()["error"]
        assert "evil.example" in error["message"] and error["type"] == "invalid_request_error"
    for r in attempts({"Sec-Fetch-Site": "cross-site"}):
        assert r.status_code == 403 and "cross-site" in r.json()["error"]["message"]
    assert "x" not in httpx.get(srv.url + "/v1/audio/voices").json()["voices"]
    host = srv.url.removeprefix("http://")
    port = host.rsplit(":", 1)[1]
    for headers in ({}, {"Origin": srv.url, "Sec-Fetch-Site": "same-origin"},
                    {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}):
        statuses = [r.status_code for r in attempts(headers)]
        assert statuses[1:] == [400, 400, 404], (headers, statuses)
        assert statuses[0] == 201
        assert httpx.delete(srv.url + "/v1/voices/x", headers=headers).status_code == 200
    # reads stay open to every origin (CORS decides whether the page may see the answer)
    assert httpx.get(srv.url + "/v1/audio/voices", headers=evil).status_code == 200
    preflight = httpx.options(srv.url + "/v1/audio/speech",
                              headers={**evil, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code >= 400 and "error" in preflight.json()


def test_cors_origin_allows_that_origin_only():
    app, _ = demo_server_app(cors_origins=("http://app.example",))
    with ThreadServer(app) as srv:
        url = srv.url + "/v1/audio/speech"
        body = {"input": "", "voice": "demo"}
        allowed = httpx.post(url, json=body, headers={"Origin": "http://app.example"})
        assert allowed.status_code == 400 and allowed.headers["access-control-allow-origin"] == "http://app.example"
        assert httpx.post(url, json=body, headers={"Origin": "http://app.example:8080"}).status_code == 403
        assert httpx.post(url, json=body, headers={"Origin": "null"}).status_code == 403
        ok = httpx.options(url, headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert ok.status_code == 200
        refused = httpx.options(url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert refused.status_code == 400 and refused.headers["content-type"] == "application/json"
        assert "CORS" in refused.json()["error"]["message"]


def _upload(srv, path_or_bytes, name="v", url="/v1/voices", field="file", **data):
    body = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return httpx.post(srv.url + url, data={"name": name, **data} if url == "/v1/voices" else data,
                      files={field: ("rec.wav", body, "audio/wav")}, timeout=120)


def _silent_wav(seconds=5.0, rate=16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * rate), np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_control_characters_in_text_are_refused(served, voice_wav):
    """NUL, escape, DEL ... in the text are a 400 naming the character (the form's text too, before
    its upload is embedded); tab, newline and carriage return remain whitespace."""
    from mvjax.serve.settings import ServerSettings
    from mvjax.serve.speech import check_text

    srv, _ = served
    for char in ("\x00", "\x1b", "\x7f"):
        r = httpx.post(srv.url + "/v1/audio/speech", json={"input": f"Hi{char} there.", "voice": "demo"}, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "input" and f"U+{ord(char):04X}" in error["message"]
        assert "control character" in error["message"]
    r = _upload(srv, _silent_wav(), url="/tts", field="audiodata", text="Hi\x00 there.")
    assert r.status_code == 400 and r.json()["error"]["param"] == "text" and "U+0000" in r.json()["error"]["message"]
    check_text("Hello\tthere.\r\nYes.", ServerSettings())  # accepted


def test_upload_errors_name_their_field_and_say_silent(served, voice_wav):
    srv, _ = served
    for bad in ("bad name!", "n" * 65, ".hidden"):
        r = _upload(srv, voice_wav, name=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "name", (bad, r.text)
    for r, param in ((_upload(srv, _silent_wav()), "file"),
                     (_upload(srv, _silent_wav(), url="/tts", field="audiodata", text="Hi."), "audiodata")):
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param, r.text
        assert "is silent" in error["message"] and "AudioError" not in error["message"]


def test_repeated_identical_upload_is_200_with_the_stored_voice(served, voice_wav):
    srv, _ = served
    first = _upload(srv, voice_wav, name="twice")
    again = _upload(srv, voice_wav, name="twice")
    try:
        assert first.status_code == 201 and again.status_code == 200, (first.text, again.text)
        assert again.json() == first.json()
        other = _upload(srv, _silent_wav(), name="twice")  # other audio: refused before it is decoded
        assert other.status_code == 409 and other.json()["error"]["param"] == "name"
        assert _upload(srv, voice_wav, name="twice", replace="true").status_code == 200  # same audio: nothing to do
    finally:
        assert httpx.delete(srv.url + "/v1/voices/twice").status_code == 200


def test_api_key_and_cors(tmp_path):
    app, _ = demo_server_app(api_key="s3cret", cors_origins=("http://app.example",))
    with ThreadServer(app) as srv:
        url = srv.url + "/v1/audio/voices"
        assert httpx.get(srv.url + "/health").json()["auth"] is True
        r = httpx.get(url)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "API key" in r.json()["error"]["message"]
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        # With a key, /metrics needs it too (a scraper sends it as its bearer credentials); the
        # page, health and docs stay open.
        assert httpx.get(srv.url + "/metrics").status_code == 401
        scraped = httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer s3cret"})
        assert scraped.status_code == 200 and "mvjax_" in scraped.text
        assert all(httpx.get(srv.url + path).status_code == 200
                   for path in ("/", "/health", "/docs", "/docs/assets/swagger-ui-bundle.js", "/docs/assets/favicon.png"))
        ok = httpx.options(url, headers={"Origin": "http://app.example", "Access-Control-Request-Method": "GET"})
        assert ok.headers.get("access-control-allow-origin") == "http://app.example"
        other = httpx.options(url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in other.headers
    public, _ = demo_server_app(api_key="s3cret", public_metrics=True)
    with ThreadServer(public) as srv:  # --public-metrics: /metrics open, the API still guarded
        assert httpx.get(srv.url + "/metrics").status_code == 200
        assert httpx.get(srv.url + "/v1/audio/voices").status_code == 401
    plain, _ = demo_server_app()
    with ThreadServer(plain) as srv:  # CORS is off unless configured
        r = httpx.get(srv.url + "/v1/audio/voices", headers={"Origin": "http://app.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_queue_full_answers_503_with_retry_after_and_deadline_504():
    app, _ = demo_server_app(max_queue=1, max_batch=1, timeout_s=600)
    with ThreadServer(app) as srv:
        results = {}
        first = threading.Thread(target=lambda: results.update(first=httpx.post(
            srv.url + "/v1/audio/speech", json={"input": MULTI_CHUNK, "voice": "demo", "seed": 1}, timeout=600)))
        first.start()
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/health").json()["queue_depth"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.post(srv.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "demo"}, timeout=60)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "busy" in r.json()["error"]["message"]
        first.join(600)
        assert results["first"].status_code == 200
    # far below what two chunks take even with every program compiled (a warm run once beat 0.5 s)
    app, _ = demo_server_app(max_batch=1, timeout_s=0.05)
    with ThreadServer(app) as srv:
        r = httpx.post(srv.url + "/v1/audio/speech", json={"input": MULTI_CHUNK, "voice": "demo"}, timeout=120)
        assert r.status_code == 504 and "time limit" in r.json()["error"]["message"]


def test_sigterm_finishes_in_flight_requests_then_exits(tmp_path):
    srv = ServerProcess([*DEMO_ARGS, "--max-batch", "1"], tmp_path / "log")
    with srv:
        result = {}
        body = {"input": MULTI_CHUNK, "voice": "demo", "seed": 4, "response_format": "wav"}
        worker = threading.Thread(target=lambda: result.update(
            r=httpx.post(srv.url + "/v1/audio/speech", json=body, timeout=600)))
        worker.start()
        deadline = time.monotonic() + 120
        while httpx.get(srv.url + "/health").json()["queue_depth"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(httpx.HTTPError):  # no new connections once draining
            httpx.get(srv.url + "/health", timeout=5)
        worker.join(600)
        assert srv.proc.wait(120) == 0
    r = result["r"]
    assert r.status_code == 200
    data, rate = sf.read(io.BytesIO(r.content))
    assert data.shape[0] > 0
    log = srv.output()
    assert "Traceback" not in log
    assert "finally the end arrives" not in log  # texts stay out of the log without --log-text
    assert "characters in" in log and "first audio after" in log  # sizes and time to first audio are logged


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--demo", "--max-batch", "0"], "--max-batch"),
    (["--demo", "--port", "70000"], "--port"),
    (["--demo", "--max-new-tokens", "1"], "max_new_tokens"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    import subprocess
    import sys

    from tests.conftest import REPO

    res = subprocess.run([sys.executable, "-m", "mvjax.serve", *args], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert res.returncode != 0
    last = [line for line in res.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and message in last, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
