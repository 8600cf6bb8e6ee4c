"""The speech server as a process: its command line, its start, and what it says about itself."""

import os
import re

import httpx
import pytest

from tests.serve_util import DEMO_ARGS, ServerProcess


def test_several_devices_serve_through_the_engine(tmp_path):
    """On two (forced host) devices the server runs one engine per device: /health says so, and a
    request is answered."""
    flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=2"]))
    with ServerProcess(DEMO_ARGS, tmp_path / "log", env={"XLA_FLAGS": flags}) as srv:
        health = httpx.get(srv.url + "/health", timeout=30).json()
        answer = httpx.post(srv.url + "/v1/audio/speech", timeout=300,
                            json={"input": "Two devices.", "voice": "demo", "response_format": "pcm", "seed": 1})
    assert health["batching"] == "engine" and health["devices"] == 2
    assert answer.status_code == 200 and len(answer.content) > 0
    assert "Traceback" not in srv.output() and " WARNING " not in srv.output(), srv.output()[-3000:]


def test_the_demo_voice_does_not_warn_a_short_upload_does(tmp_path):
    """``--demo`` builds its voice without a ShortReferenceWarning about it; a user's short
    recording still gets one."""
    import io
    import warnings

    import soundfile as sf

    from mvjax.cli.serve import _parser, build
    from mvjax.inference.speaker import ShortReferenceWarning
    from mvjax.sources.demo import demo_speaker_audio
    from tests.serve_util import demo_tts

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, registry, _ = build(_parser().parse_args([*DEMO_ARGS, "--voices", str(tmp_path)]), tts=demo_tts())
    assert "demo" in [v.name for v in registry.list()]
    assert not [w for w in caught if issubclass(w.category, ShortReferenceWarning)]
    audio, rate = demo_speaker_audio(seed=27, seconds=3.0)
    upload = io.BytesIO()
    sf.write(upload, audio, rate, format="WAV")
    with pytest.warns(ShortReferenceWarning):
        registry.embed_upload(upload.getvalue(), "short.wav")


def _option_help(argv: list[str], capsys) -> dict[str, str]:
    """``python -m <cli> <argv> --help``, run in-process: each option's invocation -> its help text
    (wrapped lines joined)."""
    import importlib

    module, *rest = argv
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main([*rest, "--help"])
    assert done.value.code == 0
    blocks = re.findall(r"^  -.*(?:\n {3,}\S.*)*", capsys.readouterr().out, re.M)
    assert blocks
    options = {}
    for block in blocks:
        invocation, *text = re.split(r"\s{2,}", block.strip(), maxsplit=1)
        options[invocation] = " ".join(" ".join(text).split())
    return options


@pytest.mark.parametrize("argv", [["mvjax.cli.serve"], ["mvjax.cli.synthesize"], ["mvjax.cli.finetune", "prepare"],
                                  ["mvjax.cli.finetune", "train"], ["mvjax.cli.finetune", "export"]])
def test_help_states_each_default_once(argv, capsys):
    """No option's ``--help`` says its default twice; every server option has help text."""
    options = _option_help(argv, capsys)
    for invocation, text in options.items():
        assert len(re.findall(r"\(default\b", text)) <= 1, (invocation, text)
        if argv == ["mvjax.cli.serve"]:
            assert text, f"{invocation} has no help text"
    if argv == ["mvjax.cli.serve"]:
        assert {"--quiet", "--port PORT", "--batching {engine,static}"} <= set(options)
        assert options["--batching {engine,static}"].endswith("(default: engine)")
