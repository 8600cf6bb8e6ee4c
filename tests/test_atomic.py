"""staged_dir: a directory output appears complete or not at all, with the permissions mkdir would give."""

import os
import signal
import stat
import time

import pytest

from mvjax.core.atomic import interrupts_deferred, staged_dir
from mvjax.core.scratch import owner_token


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_success_replaces_the_target(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_dir(out) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".model.partial-")
        (staging / "new.txt").write_text("new")
        assert _tree(out) == {"old.txt": "old"}  # nothing visible until the block ends
    assert _tree(out) == {"new.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or set-aside directory left


def test_failure_leaves_the_old_target_and_nothing_else(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_dir(out) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert _tree(out) == {"old.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failure_removes_the_parents_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "model"
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out):
            raise KeyboardInterrupt
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with staged_dir(tmp_path / "model") as staging:
            (staging / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~umask


def test_owned_staging_names_its_process(tmp_path):
    with staged_dir(tmp_path / "data", prefix=".data.tmp-", owned=True) as staging:
        assert staging.name.startswith(f".data.tmp-{owner_token()}-")
    assert (tmp_path / "data").is_dir()


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test (a test runner's worker may have installed another)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupts_deferred_holds_ctrl_c_until_the_block_ends(python_sigint):
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # a signal handler runs at the next bytecode boundary: give it several
            steps.append("after the signal")
        steps.append("after the block")  # not reached: the held interrupt surfaces as the block ends
    assert steps == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the old handler is back


def test_interrupts_deferred_without_a_signal_changes_nothing(python_sigint):
    with interrupts_deferred():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
