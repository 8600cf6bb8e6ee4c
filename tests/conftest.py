import os
from pathlib import Path

import pytest

from mvjax.core.precision import apply as apply_precision  # noqa: E402

# The tests run the runtime's own policy (the one the parity tool certifies), not a stricter one.
apply_precision()

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MVJAX_FIXTURES", REPO.parent / "shared" / "fixtures" / "metavoice_ref"))


@pytest.fixture(scope="session")
def fixtures() -> Path:
    # A missing fixture directory is an error, never a skip: these are the reference numbers.
    assert (FIXTURES / "README.md").is_file(), f"reference fixtures not found at {FIXTURES} (set MVJAX_FIXTURES)"
    return FIXTURES


@pytest.fixture(scope="session")
def converted(fixtures, tmp_path_factory) -> Path:
    """Both GPT stages of the shared fixtures, converted by our converter into one model directory."""
    import shutil

    from convert_weights.convert import convert_directory

    src = tmp_path_factory.mktemp("released")
    for sub, name in (("stage1", "first_stage.pt"), ("stage2", "second_stage.pt")):
        shutil.copy(fixtures / sub / name, src / name)
    out = tmp_path_factory.mktemp("converted") / "model"
    convert_directory(src, out)
    return out


@pytest.fixture(scope="session")
def released_model(fixtures, tmp_path_factory) -> Path:
    """Every fixture checkpoint plus the recipe's random codec, side by side as in a released model directory."""
    import subprocess
    import sys

    src = tmp_path_factory.mktemp("released_full")
    for sub, name in (("stage1", "first_stage.pt"), ("stage2", "second_stage.pt"),
                      ("speaker", "speaker_encoder.pt"), ("mbd", "mbd_comp_8.pt")):
        (src / name).symlink_to(fixtures / sub / name)
    res = subprocess.run([sys.executable, str(fixtures / "make_random_encodec.py"), str(src / "encodec_24khz-d7cc33bc.th")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return src


@pytest.fixture(scope="session")
def full_model(released_model, tmp_path_factory) -> Path:
    """The fixtures assembled into one converted model directory (speaker, both stages, codec, diffusion)."""
    from convert_weights.convert import convert_directory

    out = tmp_path_factory.mktemp("full") / "model"
    convert_directory(released_model, out)
    return out


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Conversions, speaker embeddings and compiled programs go to a per-session cache, never ~/.cache."""
    path = tmp_path_factory.mktemp("mvjax_cache")
    old = os.environ.get("MVJAX_CACHE")
    os.environ["MVJAX_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MVJAX_CACHE", None)
    else:
        os.environ["MVJAX_CACHE"] = old


@pytest.fixture(scope="module")
def tts(full_model):
    """The fixture model loaded on one device (a test module's own ``tts`` fixture overrides it)."""
    from mvjax.inference.pipeline import TTS

    model = TTS.load(full_model, mesh=None, speaker_cache_dir=None)
    yield model
    model.close()


@pytest.fixture(scope="module")
def voice(tts, fixtures):
    """The fixtures' reference speaker embedded by ``tts``."""
    return tts.speaker_embedding(fixtures / "speaker" / "reference_speaker.wav")
