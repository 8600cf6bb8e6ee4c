"""Scratch directories left by killed processes are removed; those of live processes are not."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mvjax.core import scratch
from mvjax.serve.voices import UPLOAD_PREFIX, VoiceRegistry

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc (Linux)")

PREFIX = "mvjax-test-"


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _dead_token() -> str:
    """The owner token of a process that ran and is gone."""
    proc = _sleeper()
    token = scratch.owner_token(proc.pid)
    proc.kill()
    proc.wait()
    return token


def _stamped(root: Path, token: str, files=("upload.wav",)) -> Path:
    path = root / f"{PREFIX}{token}-abc123"
    path.mkdir()
    for name in files:
        (path / name).write_bytes(b"RIFF")
    return path


def test_owner_token_names_this_process_and_its_start():
    pid, start = scratch.owner_token().split(".")
    assert int(pid) == os.getpid() and int(start) > 0
    assert scratch.owner_token() == scratch.owner_token()  # stable while the process lives
    made = Path(scratch.make_owned_dir(PREFIX))
    try:
        assert made.name.startswith(f"{PREFIX}{scratch.owner_token()}-") and (made.stat().st_mode & 0o777) == 0o700
    finally:
        made.rmdir()


def test_sweep_removes_only_directories_of_gone_owners(tmp_path):
    mine = Path(scratch.make_owned_dir(PREFIX, tmp_path))
    (mine / "upload.wav").write_bytes(b"RIFF")
    live = _sleeper()
    try:
        alive = _stamped(tmp_path, scratch.owner_token(live.pid))
        dead = _stamped(tmp_path, _dead_token())
        # A live pid whose start time differs: the directory's owner was an earlier process with that pid.
        reused = _stamped(tmp_path, f"{live.pid}.1")
        other = tmp_path / "mvjax-other-1.1-abc"  # another prefix
        other.mkdir()
        nested = _stamped(tmp_path, _dead_token().replace(".", ".9"), files=())
        (nested / "sub").mkdir()  # not what the owners make: left alone
        target = tmp_path / "elsewhere"
        target.mkdir()
        (target / "keep").write_bytes(b"x")
        link = tmp_path / f"{PREFIX}{_dead_token()}-link00"
        link.symlink_to(target, target_is_directory=True)

        assert scratch.sweep_orphans(PREFIX, tmp_path) == 2
        assert not dead.exists() and not reused.exists()
        assert mine.exists() and alive.exists() and other.exists() and nested.exists()
        assert link.is_symlink() and (target / "keep").exists()
        assert scratch.sweep_orphans(PREFIX, tmp_path) == 0  # nothing more to do
    finally:
        live.kill()
        live.wait()
    assert scratch.sweep_orphans(PREFIX, tmp_path) == 1  # the sleeper's directory, now it is gone
    assert not alive.exists() and mine.exists()


def test_sweep_of_a_missing_temp_directory_is_quiet(tmp_path):
    assert scratch.sweep_orphans(PREFIX, tmp_path / "absent") == 0


def test_a_voice_registry_sweeps_uploads_of_killed_servers(tmp_path):
    """What a server killed mid-upload left in the temp directory goes when the next registry
    starts; a live server's upload in the same directory stays."""
    dead = tmp_path / f"{UPLOAD_PREFIX}{_dead_token()}-q1w2e3"
    dead.mkdir()
    (dead / "upload.wav").write_bytes(b"RIFF" * 1000)
    live = Path(scratch.make_owned_dir(UPLOAD_PREFIX, tmp_path))

    def no_embed(path):
        raise AssertionError("nothing to embed")

    VoiceRegistry(None, no_embed, temp_dir=tmp_path)
    assert not dead.exists() and live.exists()
