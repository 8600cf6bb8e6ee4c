"""Speech servers for tests: on 127.0.0.1, a free port, always stopped.

``ServerProcess``: ``python -m mvjax.serve`` as a child process (for signals, kill -9 and restarts).
``ThreadServer``: an app from :func:`mvjax.serve.app.create_app` served by uvicorn in a thread of
the test process (shares one loaded model between tests; far quicker to start).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was healthy")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not healthy within {timeout} s")


class ServerProcess:
    """``with ServerProcess(["--demo", ...]) as srv: httpx.get(srv.url + "/health")``.

    Output goes to ``srv.log`` (a file); the server is stopped with SIGTERM (then SIGKILL) on exit."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, start_timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--port", str(self.port), *args]
        self.log = Path(log)
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self._fh = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mvjax.serve", *self.args], cwd=REPO, env=self.env,
                                     stdout=self._fh, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.url, self.start_timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._fh.close()
        return self.proc.returncode if self.proc is not None else None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class ThreadServer:
    """uvicorn serving ``app`` in a daemon thread; ``stop()`` runs the app's shutdown (drain)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "ThreadServer":
        self.thread.start()
        wait_healthy(self.url, 60)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(120)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class LogWatch(logging.Handler):
    """The records a logger writes while the ``with`` block runs (at ``level``); :meth:`wait_for` waits
    (on a condition the handler signals, not by sleeping) until one matches, since a server may log
    a request's line after the client has its answer."""

    def __init__(self, name: str = "mvjax.serve", level: int = logging.INFO):
        super().__init__(level)
        self.logger, self.records = logging.getLogger(name), []
        self._level, self._changed = level, threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.records.append(record)
            self._changed.notify_all()

    def lines(self) -> list[str]:
        """The log as an operator's file would hold it: every line of every formatted message."""
        with self._changed:
            return [line for r in self.records for line in r.getMessage().splitlines()]

    def wait_for(self, text, timeout: float = 30) -> str:
        """The first message containing ``text`` (or, given a regular expression, matching it from its
        start); AssertionError after ``timeout`` seconds."""
        def matches(message: str) -> bool:
            return text in message if isinstance(text, str) else text.match(message) is not None

        def found():
            return next((r.getMessage() for r in self.records if matches(r.getMessage())), None)

        with self._changed:
            if not self._changed.wait_for(found, timeout):
                raise AssertionError(f"no log message containing {text!r} within {timeout} s")
            return found()

    def __enter__(self) -> "LogWatch":
        self._old = self.logger.level
        self.logger.setLevel(min(self._old or logging.WARNING, self._level))
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self._old)


# Tests cap the first stage's tokens per chunk: the random demo model seldom ends its audio, and
# a full block per chunk would make every request take seconds for nothing.
TEST_MAX_NEW_TOKENS = 160
DEMO_ARGS = ["--demo", "--decoder", "encodec", "--no-enhance", "--max-new-tokens", str(TEST_MAX_NEW_TOKENS)]


@functools.lru_cache(maxsize=1)
def demo_tts():
    """The demo model, loaded once per test session (its compiled programs are shared by every test)."""
    from mvjax.inference.pipeline import TTS
    from mvjax.sources.demo import demo_model_dir

    return TTS.load(demo_model_dir())


def demo_server_app(settings=None, voices_dir=None, **overrides):
    """(app, tts) for the demo model with its ``demo`` voice, as ``python -m mvjax.serve`` + DEMO_ARGS
    builds it; ``overrides``: ServerSettings fields to change."""
    import dataclasses

    from mvjax.cli.serve import _parser, build
    from mvjax.serve.app import create_app

    args = list(DEMO_ARGS)
    if voices_dir is not None:
        args += ["--voices", str(voices_dir)]
    tts, registry, defaults = build(_parser().parse_args(args), tts=demo_tts())
    settings = dataclasses.replace(settings or defaults, **overrides)
    return create_app(tts, registry, settings), tts
