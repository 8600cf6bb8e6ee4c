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


def test_pipeline_benchmark_smoke():
    """Tiny shapes, our side only (the reference needs a metavoice-src checkout): every stage reported."""
    res = subprocess.run(
        [sys.executable, "benchmarks/pipeline.py", "--config", "tiny", "--seconds", "0.3", "--repeats", "1",
         "--throughput", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    stages = {}
    for m in re.finditer(r"^pipeline side=ours stage=(\w+) seconds=([0-9.]+) rtf=([0-9.]+)$", res.stdout, re.M):
        stages[m.group(1)] = float(m.group(3))
    assert {"speaker", "stage1", "stage2", "codec", "loudness", "enhance", "end_to_end"} <= set(stages)
    assert all(v > 0 for v in stages.values())
    assert re.search(r"utterances/min", res.stdout) and re.search(r"memory: resident \d+ MB, peak \d+ MB", res.stdout)
