"""The web page at ``/`` in a real headless browser (Debian's chromium + chromedriver, via selenium).

Types text, presses Speak and checks that the stream arrived, was played through Web Audio, and ended up
as a playable ``<audio>`` clip; and that a server error is shown to the user. Without chromium the test
is skipped, except under CI (``CI`` set), where ``.ci/run`` installs it and a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.serve_util import ServerProcess

CHROMIUM = os.environ.get("MVJAX_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MVJAX_CHROMEDRIVER", "/usr/bin/chromedriver")
SPEAK_TIMEOUT = 180


def _browser_or_skip():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (Path(p).is_file() and os.access(p, os.X_OK))]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = (f"headless browser test needs {', '.join(missing)} "
               "(apt-get install chromium chromium-driver; pip install -e '.[test]')")
        if os.environ.get("CI"):
            pytest.fail(why + "; CI installs them, so this is an error there")
        pytest.skip(why)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _browser_or_skip()
    log = tmp_path_factory.mktemp("page") / "server.log"
    srv = ServerProcess(["--demo", "--decoder", "encodec", "--no-enhance"], log)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--autoplay-policy=no-user-gesture-required", "--mute-audio", "--window-size=1200,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()


def _wait(predicate, timeout: float, what: str, server=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    extra = f"\n--- server log ---\n{server.output()[-4000:]}" if server is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")


def _open_page(driver, server):
    from selenium.webdriver.common.by import By

    driver.get(server.url + "/")
    assert "mvjax" in driver.title
    voices = lambda: [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#voice option")]  # noqa: E731
    _wait(lambda: "demo" in voices(), 30, "the voice picker to list 'demo'")
    driver.execute_script("document.getElementById('voice').value = 'demo'")


def _state(driver) -> dict:
    return driver.execute_script("return Object.assign({}, window.mvjaxState)")


def test_page_speaks_and_plays_the_stream(server, browser):
    from selenium.webdriver.common.by import By

    _open_page(browser, server)
    text = browser.find_element(By.ID, "text")
    text.clear()
    text.send_keys("Hello from the browser. This is a streaming test.")
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()  # open the settings
    browser.find_element(By.ID, "seed").send_keys("7")
    browser.find_element(By.ID, "speak").click()
    state = _wait(lambda: (s := _state(browser))["done"] and s, SPEAK_TIMEOUT, "the speech to finish", server)

    assert state["error"] is None, state["error"]
    assert state["bytesReceived"] > 0
    assert state["samplesReceived"] > 0
    assert state["chunksPlayed"] >= 1
    assert state["audioContext"] == "running"  # scheduled on a live Web Audio graph, not a suspended one
    print("page state:", state)
    assert state["seed"] == "7"
    assert "first audio after" in browser.find_element(By.ID, "status").text
    readout = browser.find_element(By.ID, "ttfa")  # the time to first audio stays on show
    assert readout.is_displayed() and re.search(r"Time to first audio: \d+\.\d\d s \(server \d+\.\d\d s\)",
                                                readout.text), readout.text
    assert 0 < state["serverTtfa"] <= state["ttfa"]

    player = browser.find_element(By.ID, "player")
    src = player.get_attribute("src")
    assert src and src.startswith("blob:")
    duration = _wait(lambda: browser.execute_script(
        "const p = document.getElementById('player'); return p.readyState >= 1 && isFinite(p.duration) && p.duration"),
        20, "the <audio> element to load its clip")
    assert duration == pytest.approx(state["samplesReceived"] / 24000, abs=0.05)

    link = browser.find_element(By.ID, "download")
    assert link.is_displayed() and link.get_attribute("href") == src
    assert link.get_attribute("download") == "speech.wav"

    # the whole clip plays: play() resolves and the playhead moves
    result = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const p = document.getElementById('player');
        p.currentTime = 0;
        p.play().then(() => done('ok'), (e) => done('play failed: ' + e));
    """)
    assert result == "ok"
    _wait(lambda: browser.execute_script("return document.getElementById('player').currentTime") > 0.05,
          10, "the <audio> playhead to advance")
    assert not browser.execute_script("return document.getElementById('player').error")


def test_page_shows_the_servers_error(server, browser):
    from selenium.webdriver.common.by import By

    _open_page(browser, server)
    browser.find_element(By.ID, "text").clear()
    browser.find_element(By.ID, "speak").click()
    state = _wait(lambda: (s := _state(browser))["done"] and s, 30, "the request to fail", server)
    assert state["error"] == "input is empty"
    shown = browser.find_element(By.ID, "error")
    assert shown.is_displayed() and shown.text == "input is empty"
    assert state["bytesReceived"] == 0
    assert not browser.find_element(By.ID, "player").get_attribute("src")
    assert not browser.find_element(By.ID, "download").is_displayed()


def _own_resources_only(driver, server) -> list[str]:
    """Every resource the page loaded, asserted to come from the server itself."""
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(server.url + "/") for url in loaded), loaded
    return loaded


def test_docs_render_offline_from_the_servers_own_files(server, browser):
    """/docs (Swagger UI) loads its script, style and icon from the server, not a CDN: the machine
    running the tests has no network, so the operation list appearing proves it. ReDoc, which
    would still fetch from its CDN, is off."""
    import httpx
    from selenium.webdriver.common.by import By

    html = httpx.get(server.url + "/docs").text
    assert not re.findall(r"(?:https?:)?//[A-Za-z0-9]", html), html
    browser.get(server.url + "/docs")
    paths = lambda: [e.get_attribute("data-path") for e in browser.find_elements(  # noqa: E731
        By.CSS_SELECTOR, ".opblock .opblock-summary-path")]
    assert "/v1/audio/speech" in _wait(paths, 60, "Swagger UI's operation list", server)
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(url.endswith(".js") for url in loaded)
    assert all(url.startswith(server.url + "/") for url in loaded), loaded
    assert httpx.get(server.url + "/redoc").status_code == 404


def test_browser_skip_rule_is_strict_under_ci(monkeypatch):
    """Missing browser: skipped locally, a failure under CI."""
    monkeypatch.setattr(f"{__name__}.CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        _browser_or_skip()
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception):
        _browser_or_skip()


def test_ci_script_installs_the_browser():
    script = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "chromium-driver" in script and "apt-get" in script
    assert shutil.which("bash")
