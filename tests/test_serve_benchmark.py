"""The speech-server load benchmark runs both modes and reports in its documented format (no timing assertions)."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

LINE = re.compile(r"^serve mode=(batched|single) concurrency=(\d+) utt_per_min=([0-9.]+) p50_s=([0-9.]+) "
                  r"p95_s=([0-9.]+) ttfa_p50_s=([0-9.]+)$", re.M)
TARGET = re.compile(r"^serve-target concurrency=(\d+) speedup=([0-9.]+) p95_ratio=([0-9.]+) pass=(yes|no)", re.M)


@pytest.mark.slow  # ~1.5 min (builds its own model, starts two servers); `pytest -m slow` runs it
def test_serve_benchmark_smoke(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.serve", "--config", "demo", "--requests", "4", "--rate", "4",
         "--concurrency", "4", "--max-batch", "2", "--time-limit", "90", "--max-new-tokens", "48", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = LINE.findall(res.stdout)
    assert [(m[0], m[1]) for m in lines] == [("batched", "4"), ("single", "4")]
    assert all(float(m[2]) > 0 for m in lines)
    assert TARGET.search(res.stdout)
    assert (tmp_path / "logs" / "server-batched.log").is_file() and (tmp_path / "logs" / "server-single.log").is_file()


def test_serve_benchmark_refuses_existing_log_dir(tmp_path):
    res = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--config", "demo", "--log-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode != 0 and "refusing to overwrite" in res.stderr
