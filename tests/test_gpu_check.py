"""benchmarks/gpu_check.sh, the prepared GPU run: it stops with one line where JAX sees no GPU, checks that
its Python imports this checkout, and its --dry-run runs the same steps on the CPU with the tiny shapes."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = str(REPO / "benchmarks" / "gpu_check.sh")


def _run(args, tmp_path, python=sys.executable, timeout=600):
    env = {**os.environ, "MVJAX_PYTHON": python, "OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=timeout)


def test_no_gpu_stops_at_once_with_one_line(tmp_path):
    res = _run([], tmp_path)
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stdout.strip().splitlines() == ["gpu_check: JAX sees no GPU (default backend: cpu); stopping"]


def test_a_python_without_the_projects_packages_is_refused(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    res = _run(["--dry-run"], tmp_path, python=str(bare / "bin" / "python"))
    assert res.returncode == 1
    assert re.fullmatch(r"gpu_check: \S+: it lacks the project's packages \(No module named '\w+'\)\n", res.stderr), res.stderr


def test_bad_arguments_are_refused(tmp_path):
    res = _run(["--bogus"], tmp_path)
    assert res.returncode == 2 and "unknown argument --bogus" in res.stderr


def _lines(stdout: str, prefix: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(prefix + " ")]


@pytest.mark.slow  # ~60 s of CPU decode; the script's checks and exit paths stay in the default suite
def test_dry_run_decode_step(tmp_path):
    res = _run(["--dry-run", "decode"], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    decode = _lines(res.stdout, "decode")
    assert [re.search(r"batch=(\d+) dtype=(\S+)( weights=int8)?", line).groups() for line in decode] == [
        ("1", "bfloat16", None), ("4", "bfloat16", None), ("1", "bfloat16", " weights=int8"),
        ("4", "bfloat16", " weights=int8")]
    assert (tmp_path / "out" / "decode_bf16.txt").is_file() and (tmp_path / "out" / "decode_int8.txt").is_file()


@pytest.mark.slow  # ~2.5 min: every step compiles its programs
def test_dry_run_runs_every_step(tmp_path):
    res = _run(["--dry-run"], tmp_path, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert len(_lines(res.stdout, "decode")) == 4
    assert len(_lines(res.stdout, "engine")) == 1 and "concurrency=4" in _lines(res.stdout, "engine")[0]
    stages = {re.search(r"stage=(\w+)", line).group(1) for line in _lines(res.stdout, "pipeline")}
    assert {"stage1", "stage2", "end_to_end"} <= stages
