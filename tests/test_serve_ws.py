"""The WebSocket text-in stream (``/v1/audio/speech/stream``) on the demo model, driven by a real
WebSocket client (``websocket-client``) against uvicorn in a thread: text sent word by word is
spoken while it is still arriving; refusals are a JSON error frame and a close code; a client that
vanishes frees its slot. Also the open utterance it rests on (:meth:`Scheduler.extend`,
:meth:`Scheduler.close_text`) through the worker."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from mvjax.inference.longform import complete_sentences, split_sentences
from tests.serve_util import LogWatch, ThreadServer, demo_server_app

websocket = pytest.importorskip("websocket", reason="the tests' WebSocket client: pip install websocket-client")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

T = 300  # seconds any one socket operation may take (the first session compiles)
PATH = "/v1/audio/speech/stream"
PARAGRAPH = ("Hello there. This sentence arrives one word at a time, as an agent writes it. "
             "The server speaks each sentence once it is complete, while the rest is still on its way, "
             "so the listener hears the start long before the end is written. That is the whole point of it.")


class Session:
    """A WebSocket client: JSON messages out; binary audio, JSON events and the close frame in."""

    def __init__(self, url: str, **options):
        self.ws = websocket.create_connection(url.replace("http", "ws", 1) + PATH, timeout=T, **options)
        self.audio = bytearray()
        self.events: list[dict] = []
        self.first_audio = None  # time.monotonic() of the first audio bytes
        self.close = None  # (code, reason)

    def send(self, **message) -> float:
        self.ws.send(json.dumps(message))
        return time.monotonic()

    def receive(self, until=lambda session: False):
        """Take frames until the server closes (or ``until(self)``); returns the close (code, reason)."""
        while self.close is None and not until(self):
            opcode, data = self.ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_BINARY:
                if data and self.first_audio is None:
                    self.first_audio = time.monotonic()
                self.audio += data
            elif opcode == websocket.ABNF.OPCODE_TEXT:
                self.events.append(json.loads(data))
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                self.close = (code, data[2:].decode())
        return self.close

    def event(self, kind: str) -> dict:
        (found,) = [e for e in self.events if e["type"] == kind]
        return found

    def vanish(self) -> None:
        """Gone without a close frame (a crashed client, a dropped network)."""
        self.ws.sock.shutdown(socket.SHUT_RDWR)
        self.ws.sock.close()


def start(url: str, **fields) -> Session:
    session = Session(url)
    session.send(**{"type": "start", "voice": "demo", "response_format": "pcm", **fields})
    session.receive(until=lambda s: s.events)
    assert session.events[0]["type"] == "started", session.events
    return session


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    found = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$",
                      text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_idle(app, timeout: float) -> None:
    worker = app.state.mvjax.worker
    deadline = time.monotonic() + timeout
    while worker.depth and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.depth == 0, f"{worker.depth} jobs still in the worker"


@pytest.fixture(scope="module")
def served():
    """(server, app): the demo model's server, warmed up by one streamed HTTP request (compiles)."""
    app, _ = demo_server_app()
    with ThreadServer(app) as srv:
        r = httpx.post(srv.url + "/v1/audio/speech", json={"input": "Warm up.", "voice": "demo", "stream": True,
                                                             "response_format": "pcm", "seed": 1}, timeout=T)
        assert r.status_code == 200
        yield srv, app


def test_complete_sentences_keep_the_unfinished_rest():
    assert complete_sentences("Hello there. How are") == ("Hello there.", "How are")
    assert complete_sentences("It costs 3.") == ("", "It costs 3.")  # "3." may still become "3.5"
    assert complete_sentences("Ask Dr. ") == ("", "Ask Dr. ")  # an abbreviation ends no sentence
    assert complete_sentences('He said "hi." Then') == ('He said "hi."', "Then")
    words = PARAGRAPH.split(" ")
    buffer, done = "", []
    for word in words:
        complete, buffer = complete_sentences(buffer + word + " ")
        done += split_sentences(complete)
    assert done == split_sentences(PARAGRAPH)


def test_text_sent_word_by_word_is_spoken_before_the_last_word(served):
    """An agent's pace: a word every 0.15 s (about 7 a second, slower than an LLM writes). The first
    sentence is two words; the rest take ~7 s to send, far more than a warm first chunk's first
    audio on the demo model (well under a second on 2 CPU cores). Each sentence is planned as it
    completes, so the job has one chunk per sentence (each fits a chunk alone)."""
    srv, app = served
    tts = app.state.mvjax.tts
    session = start(srv.url, seed=11)
    words = PARAGRAPH.split(" ")
    sent = {}

    def send_words():
        for i, word in enumerate(words):
            sent["last"] = session.send(type="text", text=word + ("" if i == len(words) - 1 else " "))
            time.sleep(0.15)
        session.send(type="end")

    sender = threading.Thread(target=send_words)
    sender.start()
    code, reason = session.receive()
    sender.join(T)
    assert (code, reason) == (1000, ""), session.events
    assert session.first_audio is not None and session.first_audio < sent["last"], \
        f"first audio {session.first_audio - sent['last']:.2f} s after the last word was sent"
    done = session.event("audio.done")
    print(f"first audio {sent['last'] - session.first_audio:.2f} s before the last word; audio.done: {done}")
    assert done["samples"] * 2 == len(session.audio) > 0  # pcm: 2 bytes a sample
    assert done["time_to_first_audio"] is not None and done["time_to_first_audio"] > 0
    sentences = split_sentences(PARAGRAPH)
    assert all(len(tts.plan(s)) == 1 for s in sentences)
    assert done["chunks"] == len(sentences)


def test_how_text_is_cut_into_messages_does_not_change_the_audio(served):
    """Chunks are planned where sentences complete, whatever the messages' sizes: a paragraph sent
    word by word and the same paragraph sent a sentence a message give the same chunks, keys and
    hence the same audio (same seed)."""
    srv, _ = served
    audio = []
    for pieces in ([w + " " for w in PARAGRAPH.split(" ")], [s + " " for s in split_sentences(PARAGRAPH)]):
        session = start(srv.url, seed=5)
        for piece in pieces:
            session.send(type="text", text=piece)
        session.send(type="end")
        assert session.receive() == (1000, "")
        audio.append(bytes(session.audio))
    assert len(audio[0]) > 0 and audio[0] == audio[1]


def test_text_in_one_message_is_planned_as_the_http_api_plans_it(served):
    """A text whose sentences all arrive at once (it ends with whitespace, so its last sentence is
    complete) is planned as one text, as ``POST /v1/audio/speech`` plans it: the same chunks and
    keys, so the stream has the same length as the HTTP stream with the same seed; the same
    assembler and encoder make the bytes equal too. (Sentences that arrive apart are planned apart:
    the HTTP API may pack them into one chunk where the socket cannot wait for later text.)"""
    srv, app = served
    assert len(app.state.mvjax.tts.plan(PARAGRAPH)) < len(split_sentences(PARAGRAPH))  # packed: planning differs
    session = start(srv.url, seed=8)
    session.send(type="text", text=PARAGRAPH + " ")
    session.send(type="end")
    assert session.receive() == (1000, "")
    body = {"input": PARAGRAPH, "voice": "demo", "response_format": "pcm", "stream": True, "seed": 8}
    with httpx.stream("POST", srv.url + "/v1/audio/speech", json=body, timeout=T) as r:
        assert r.status_code == 200
        http = b"".join(r.iter_bytes())
    assert len(session.audio) == len(http) > 0
    assert bytes(session.audio) == http


def test_wav_streams_its_header_first(served):
    srv, _ = served
    session = start(srv.url, seed=2, response_format="wav")
    session.send(type="text", text="Hello there.")
    session.send(type="end")
    assert session.receive() == (1000, "")
    assert session.audio[:4] == b"RIFF" and session.audio[4:8] == b"\xff\xff\xff\xff"
    assert session.event("audio.done")["samples"] * 2 == len(session.audio) - 44


def _refused(session: Session, code: int, param=None, message: str = "") -> dict:
    assert session.receive()[0] == code, session.events
    error = session.event("error")
    assert error["param"] == param and message in error["message"], error
    assert "Traceback" not in json.dumps(session.events)
    return error


@pytest.mark.parametrize("case", ["not-json", "not-object", "no-type", "unknown-type", "text-before-start", "binary",
                                  "bad-voice", "bad-format", "unknown-field", "bad-seed", "sse", "twice-start",
                                  "bad-text", "after-end", "empty"])
def test_bad_messages_get_a_json_error_and_1008(served, case):
    srv, app = served
    session = Session(srv.url)
    start_msg = {"type": "start", "voice": "demo", "response_format": "pcm"}
    expect = {"not-json": (None, "not valid JSON"), "not-object": ("type", "JSON object"),
              "no-type": ("type", "JSON object"), "unknown-type": ("type", "first message must be"),
              "text-before-start": ("type", "first message must be"), "binary": (None, "text frames"),
              "bad-voice": ("voice", "unknown voice"), "bad-format": ("response_format", "cannot be streamed"),
              "unknown-field": ("input", "unknown field"), "bad-seed": ("seed", "seed"),
              "sse": ("stream_format", "always streams"), "twice-start": ("type", "started already"),
              "bad-text": ("text", "text"), "after-end": ("type", "follow end"), "empty": ("text", "empty")}[case]
    if case == "not-json":
        session.ws.send("{not json")
    elif case == "not-object":
        session.ws.send("[1, 2]")
    elif case == "no-type":
        session.ws.send(json.dumps({"voice": "demo"}))
    elif case == "unknown-type":
        session.send(type="hello")
    elif case == "text-before-start":
        session.send(type="text", text="Hi.")
    elif case == "binary":
        session.ws.send_binary(b"\x00\x01")
    elif case == "bad-voice":
        session.send(**{**start_msg, "voice": "nobody"})
    elif case == "bad-format":
        session.send(**{**start_msg, "response_format": "flac"})
    elif case == "unknown-field":
        session.send(**start_msg, input="Hi.")
    elif case == "bad-seed":
        session.send(**start_msg, seed=-1)
    elif case == "sse":
        session.send(**start_msg, stream_format="sse")
    else:
        session.send(**start_msg)
        session.receive(until=lambda s: s.events)
        if case == "twice-start":
            session.send(**start_msg)
        elif case == "bad-text":
            session.send(type="text", text="Bell \x07 rings. ")
        elif case == "after-end":
            session.send(type="text", text="Hi.")
            session.send(type="end")
            session.send(type="text", text="More.")
        elif case == "empty":
            session.send(type="text", text="   ")
            session.send(type="end")
    error = _refused(session, 1008, *expect)
    assert error["status"] == 400
    wait_idle(app, 60)


def test_oversize_message_and_text_close_with_1009():
    app, _ = demo_server_app(max_json_bytes=2000, max_input_chars=1500)
    with ThreadServer(app) as srv:
        session = start(srv.url)
        session.send(type="text", text="x" * 2100)  # one message over the JSON limit
        assert _refused(session, 1009, None, "over the limit of 2000 bytes")["status"] == 413
        session = start(srv.url)
        for _ in range(3):  # 3 x 600 characters, no sentence end: nothing planned, over the text limit
            session.send(type="text", text="word " * 120)
        assert _refused(session, 1009, "text", "1500 characters")["status"] == 413
        wait_idle(app, 60)


def test_api_key_and_cross_site_origin_are_refused():
    app, _ = demo_server_app(api_key="s3cret")
    with ThreadServer(app) as srv:
        for headers in ([], ["Authorization: Bearer wrong"]):
            session = Session(srv.url, header=headers)
            assert _refused(session, 1008, None, "API key")["status"] == 401
        session = Session(srv.url, header=["Authorization: Bearer s3cret"], origin="http://evil.example")
        assert _refused(session, 1008, None, "cross-origin")["status"] == 403
        session = Session(srv.url, header=["Authorization: Bearer s3cret"])  # its own origin: let through
        session.send(type="start", voice="demo", response_format="pcm")
        session.receive(until=lambda s: s.events)
        assert session.events[0]["type"] == "started"
        session.ws.close()
        key = {"Authorization": "Bearer s3cret"}
        scraped = httpx.get(srv.url + "/metrics", headers=key, timeout=30).text
        assert f'mvjax_requests_total{{route="{PATH}",status="1008"}} 3.0' in scraped
        wait_idle(app, 60)


def test_busy_and_draining_close_with_1013():
    app, _ = demo_server_app(max_queue=1)
    with ThreadServer(app) as srv:
        holder = start(srv.url)  # an open job holds the one slot while it waits for text
        session = Session(srv.url)
        session.send(type="start", voice="demo", response_format="pcm")
        assert _refused(session, 1013, None, "busy")["status"] == 503
        holder.ws.close()
        wait_idle(app, 60)
        app.state.mvjax.draining = True
        try:
            assert _refused(Session(srv.url), 1013, None, "shutting down")["status"] == 503
        finally:
            app.state.mvjax.draining = False


def test_a_client_that_vanishes_mid_stream_frees_its_slot(served):
    srv, app = served
    wait_idle(app, 60)
    dropped = metric(srv.url, "mvjax_jobs_dropped_total", 'reason="Cancelled"')
    with LogWatch(level=logging.DEBUG) as watch, LogWatch("uvicorn.error", logging.WARNING) as server_log:
        session = start(srv.url, seed=4)
        session.send(type="text", text=PARAGRAPH + " And more text is still to come, ")
        session.receive(until=lambda s: s.first_audio is not None)
        assert app.state.mvjax.worker.depth == 1
        session.vanish()
        wait_idle(app, 60)
        watch.wait_for(f"WS {PATH} ")  # its access line
    assert metric(srv.url, "mvjax_jobs_dropped_total", 'reason="Cancelled"') == dropped + 1
    # nothing above DEBUG but the access line (no error, no traceback)
    assert [r.getMessage() for r in watch.records + server_log.records if r.levelno > logging.INFO] == []
    assert len([r for r in watch.records if r.levelno == logging.INFO]) == 1


def _chunk(job, index: int) -> np.ndarray:
    """The first-stage codes of a streamed job's planned chunk ``index``: its pieces' codes, up to the
    delivery of the whole chunk (the one event with the chunk's generated tokens)."""
    codes = []
    while True:
        event = job.next_event(T)
        assert event is not None and event.index == index, event
        codes.append(event.tokens)
        if event.generated_tokens:
            return np.concatenate(codes, axis=1)


def test_an_open_job_takes_text_until_it_is_closed(served):
    """The worker under the socket: an open job gets planned pieces while it runs, and ends (its last
    event None) only when its text is closed, even after everything it had was delivered; its chunks'
    tokens are those of a job given the same pieces at once (same key, same indices)."""
    from mvjax.inference.options import SamplingConfig, StreamSettings
    from mvjax.inference.scheduler import Utterance
    from mvjax.serve.jobs import Job

    _, app = served
    state = app.state.mvjax
    worker, embedding = state.worker, state.registry.get("demo")
    pieces = ["Hello there.", "A second piece."]

    def job(given, open_):
        utterance = Utterance.seeded(given, embedding, 21, sampling=SamplingConfig(), decoder="encodec", stream=True,
                                     streaming=StreamSettings(), open=open_)
        return worker.submit(Job(utterance, 21, time.monotonic() + T))

    opened = job([], True)
    worker.extend(opened, pieces[:1])
    first = _chunk(opened, 0)
    with pytest.raises(TimeoutError):  # all delivered, but still open: no end yet
        opened.next_event(0.5)
    worker.extend(opened, pieces[1:])
    second = _chunk(opened, 1)
    worker.close_text(opened)
    assert opened.next_event(T) is None and opened.done and opened.error is None
    closed = job(pieces, False)
    np.testing.assert_array_equal(first, _chunk(closed, 0))
    np.testing.assert_array_equal(second, _chunk(closed, 1))
    assert closed.next_event(T) is None
    wait_idle(app, 60)
