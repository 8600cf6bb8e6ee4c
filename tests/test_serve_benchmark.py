"""The speech-server load benchmark runs both modes and reports in its documented format (no timing assertions)."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

LINE = re.compile(r"^serve mode=(batched|stream|single) concurrency=(\d+) utt_per_min=([0-9.]+) p50_s=([0-9.]+) "
                  r"p95_s=([0-9.]+) ttfa_p50_s=([0-9.]+) ttfa_p95_s=([0-9.]+) max_gap_s=([0-9.]+)$", re.M)
TARGET = re.compile(r"^serve-target concurrency=(\d+) speedup=([0-9.]+) p95_ratio=([0-9.]+) pass=(yes|no)", re.M)
STREAM_TARGET = re.compile(r"^serve-stream-target concurrency=2 ttfa_vs_whole_c1=([0-9.]+) ttfa_p95_vs_c1=([0-9.]+) "
                           r"throughput_vs_whole=([0-9.]+) pass=(yes|no)", re.M)


@pytest.mark.slow  # ~1 min (builds its own model, starts two servers); `pytest -m slow` runs it
def test_serve_benchmark_smoke(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.serve", "--config", "demo", "--requests", "4", "--rate", "4",
         "--concurrency", "1,2", "--modes", "batched,stream,single", "--max-batch", "2", "--time-limit", "120",
         "--max-new-tokens", "48", "--no-rehearse", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = LINE.findall(res.stdout)
    # the engine server runs both of its modes at each concurrency in turn, then the one-at-a-time server
    assert [(m[0], m[1]) for m in lines] == [("batched", "1"), ("stream", "1"), ("batched", "2"), ("stream", "2"),
                                             ("single", "1"), ("single", "2")]
    assert all(float(m[2]) > 0 for m in lines)
    assert TARGET.search(res.stdout) and STREAM_TARGET.search(res.stdout)
    assert (tmp_path / "logs" / "server-engine.log").is_file() and (tmp_path / "logs" / "server-single.log").is_file()


def test_serve_benchmark_refuses_existing_log_dir(tmp_path):
    res = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--config", "demo", "--log-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode != 0 and "refusing to overwrite" in res.stderr
