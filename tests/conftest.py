import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

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
