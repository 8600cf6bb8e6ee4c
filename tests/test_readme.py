"""The README's new-user path stays true: the order of its set-up steps, the server limits it
documents (read from the code that enforces them), and its curl example run against a server."""

import json
import re
import shlex
import subprocess

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## `` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else None]


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_quick_start_makes_the_virtual_environment_before_any_install():
    quick = _section("Quick start")
    blocks = _code_blocks(quick, "bash")
    assert blocks, "Quick start has no shell commands"
    assert "python -m venv" in blocks[0] and "pip install" not in blocks[0], blocks[0]
    assert quick.index("python -m venv") < quick.index("pip install")


def test_server_limits_in_the_readme_are_the_ones_the_code_enforces():
    from mvjax.serve.settings import ServerSettings
    from mvjax.serve.speech import SpeechRequest
    from mvjax.serve.voices import VoiceLimits

    server = _section("Speech server")
    fields = SpeechRequest.model_json_schema()["properties"]

    def documented(pattern: str) -> list[float]:
        found = re.search(pattern, server)
        assert found, f"the server section does not state {pattern!r}"
        return [float(g) for g in found.groups()]

    number = r"(\d+(?:\.\d+)?)"
    for field in ("temperature", "guidance_scale"):
        default, most = documented(rf"`{field}` \({number}, at most {number}\)")
        assert (default, most) == (fields[field]["default"], fields[field]["le"]), field
        assert fields[field]["ge"] == 0, field
    default, most = documented(rf"`top_p` \({number}, in \(0, {number}\]\)")
    assert (default, most) == (fields["top_p"]["default"], fields["top_p"]["le"]) and fields["top_p"]["gt"] == 0
    settings = ServerSettings()
    assert documented(r"JSON body of at most (\d+) KB") == [settings.max_json_bytes / 1024]
    assert documented(r"`--max-input-chars`, (\d+)") == [settings.max_input_chars]
    assert documented(r"`--max-upload-mb`, (\d+) MB by default") == [VoiceLimits().max_upload_bytes / 1e6]


def test_the_openai_example_says_what_to_install_and_the_key_goes_in_the_environment():
    server = _section("Speech server")
    before_client = server[:server.index("from openai import OpenAI")]
    assert "pip install openai" in before_client.rsplit("```", 2)[-2], "the openai example must say how to install it"
    for block in _code_blocks(server, "bash"):
        assert "--api-key" not in block, "examples pass the API key through MVJAX_API_KEY, not argv"
    assert "MVJAX_API_KEY=" in "".join(_code_blocks(server, "bash"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.serve_util import ThreadServer, demo_server_app

    app, _ = demo_server_app(voices_dir=tmp_path_factory.mktemp("voices"))
    with ThreadServer(app) as srv:
        yield srv


def test_the_curl_example_gets_audio_in_the_documented_default_format(served, tmp_path):
    import soundfile as sf

    from mvjax.serve.settings import default_format

    curls = [b for b in _code_blocks(_section("Speech server"), "bash") if b.lstrip().startswith("curl ")]
    whole = [c for c in curls if " -o " in c]
    assert len(whole) == 1, curls
    argv = shlex.split(whole[0].replace("\\\n", " "))
    argv = [a.replace("http://127.0.0.1:8000", served.url) for a in argv]
    out = tmp_path / argv[argv.index("-o") + 1]
    res = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    data = out.read_bytes()
    if default_format() == "mp3":  # "the answer is mp3 unless response_format says otherwise"
        assert out.suffix == ".mp3"
        assert data[:3] == b"ID3" or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0), data[:16]
    info = sf.info(out)
    assert info.samplerate == 24000 and info.channels == 1 and info.frames > 0


def test_the_streaming_curl_example_streams_pcm(served):
    """The README's streaming curl example (its curl part; the player after the pipe is left out)
    gets 16-bit PCM."""
    curls = [b for b in _code_blocks(_section("Speech server"), "bash") if b.lstrip().startswith("curl ")]
    streamed = [c for c in curls if '"stream": true' in c]
    assert len(streamed) == 1, curls
    command = streamed[0].replace("\\\n", " ").split(" | ")[0]
    argv = [a.replace("http://127.0.0.1:8000", served.url) for a in shlex.split(command)]
    res = subprocess.run(argv, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr
    body = json.loads(argv[argv.index("-d") + 1])
    assert body["response_format"] == "pcm" and body["stream"] is True
    samples = len(res.stdout) // 2  # 16-bit samples, at least one frame's (320) per chunk of the text
    assert len(res.stdout) % 2 == 0 and samples >= 320
