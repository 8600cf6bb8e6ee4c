"""The decode benchmark runs and reports in its documented format (no timing assertions here)."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

LINE = re.compile(
    r"^decode config=tiny batch=(\d+) dtype=float32 tokens_per_s=([0-9.]+) GB_per_s=([0-9.]+) roofline_frac=([0-9.]+)$"
)


def test_decode_benchmark_smoke():
    res = subprocess.run(
        [sys.executable, "benchmarks/decode.py", "--config", "tiny", "--batch", "1", "2", "--tokens", "6", "--repeats", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [m for m in (LINE.match(l) for l in res.stdout.splitlines()) if m]
    assert [m.group(1) for m in lines] == ["1", "2"]
    assert all(float(m.group(2)) > 0 for m in lines)


@pytest.mark.slow
def test_decode_benchmark_full_shape_runs():
    """The released 1.2B shape (random weights): minutes on two CPU cores; run with -m slow."""
    res = subprocess.run(
        [sys.executable, "benchmarks/decode.py", "--config", "full", "--batch", "1", "--tokens", "9", "--repeats", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=3000,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"^decode config=full batch=1 ", res.stdout, re.M)
