"""The decode benchmark runs and reports in its documented format (no timing assertions here)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

# A metavoice-src checkout (its fam/ package) for the reference side; those tests skip without one.
REFERENCE_SRC = os.environ.get("MVJAX_REFERENCE_SRC", "")
needs_reference = pytest.mark.skipif(
    not (REFERENCE_SRC and (Path(REFERENCE_SRC) / "fam" / "llm" / "fast_inference_utils.py").is_file()),
    reason="set MVJAX_REFERENCE_SRC to a metavoice-src checkout",
)
TIMING = re.compile(
    r"^timing side=(ours|reference) batch=1 new_tokens=(\d+) repeats=(\d+) first_call_s=([0-9.]+) "
    r"compile_s=([0-9.]+) first_call_n_s=[0-9.]+ median_s=([0-9.]+) prefill_s=([0-9.]+) runs_s=([0-9.,]+)$", re.M
)

LINE = re.compile(
    r"^decode config=tiny batch=(\d+) dtype=float32 tokens_per_s=(-?[0-9.]+) GB_per_s=(-?[0-9.]+) roofline_frac=(-?[0-9.]+)$"
)


def test_decode_benchmark_smoke():
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.decode", "--config", "tiny", "--batch", "1", "2", "--tokens", "6", "--repeats", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [m for m in (LINE.match(l) for l in res.stdout.splitlines()) if m]
    # Format only: a steady rate is median(N) - median(2) of a few milliseconds at this size, which
    # load on a shared machine can make negative.
    assert [m.group(1) for m in lines] == ["1", "2"]
    timings = TIMING.findall(res.stdout)
    assert [t[0] for t in timings] == ["ours"]  # batch 1 only; the batch-2 line has batch=2
    assert timings[0][1:3] == ("6", "1") and len(timings[0][7].split(",")) == 1


ENGINE_LINE = re.compile(r"^engine config=tiny mode=(one|static|engine) concurrency=2 utt_per_min=([0-9.]+) "
                         r"p50_s=([0-9.]+) p95_s=([0-9.]+) tokens_per_s=([0-9.]+) kv_cache=int8 row_use=([0-9.]+)$")
KV_LINE = re.compile(r"^decode config=tiny kv_cache=(float32|bf16|int8) tokens=(\d+) tokens_per_s=([0-9.]+)$")


@pytest.mark.slow  # a whole benchmark run (~45 s); the engine it times is tested in tests/test_engine*.py
def test_engine_benchmark_smoke():
    """The engine benchmark's three modes and its long utterance with every KV cache kind, on the
    tiny model: one line each, every request served (the rates are the machine's, not checked)."""
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine", "--configs", "tiny", "--concurrency", "2", "--steps", "4",
         "--requests", "3", "--rate", "20", "--min-tokens", "4", "--max-tokens", "8", "--long-tokens", "40",
         "--kv-cache", "int8"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    modes = [m for m in (ENGINE_LINE.match(line) for line in res.stdout.splitlines()) if m]
    assert [m.group(1) for m in modes] == ["one", "static", "engine"]
    assert all(float(m.group(2)) > 0 and float(m.group(4)) >= float(m.group(3)) > 0 for m in modes)
    assert float(modes[0].group(6)) == 1.0 and all(0 < float(m.group(6)) <= 1 for m in modes)
    kinds = [m for m in (KV_LINE.match(line) for line in res.stdout.splitlines()) if m]
    assert [(m.group(1), m.group(2)) for m in kinds] == [("float32", "40"), ("bf16", "40"), ("int8", "40")]


@pytest.mark.slow  # ~40 s; tests/test_engine_devices.py checks four devices' tokens in the default suite
def test_engine_benchmark_over_four_devices_checks_tokens_against_one():
    """With four (forced host) devices the engine mode runs one engine per device, and the benchmark
    checks every request's tokens against one device's."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine", "--configs", "tiny", "--concurrency", "4", "--steps", "4",
         "--requests", "6", "--rate", "20", "--min-tokens", "4", "--max-tokens", "12", "--kv-caches", "",
         "--modes", "engine"],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "engine over 4 devices, 1 slots each" in res.stderr
    assert re.search(r"^engine-devices config=tiny devices=4 requests=6 tokens_equal=yes$", res.stdout, re.M), res.stdout


REPEAT_LINE = re.compile(r"^engine config=tiny mode=(static|engine) concurrency=2 utt_per_min=([0-9.]+) "
                         r"p50_s=([0-9.]+) p95_s=([0-9.]+) tokens_per_s=([0-9.]+) kv_cache=float32 "
                         r"row_use=([0-9.]+) run=(\d+|median)$")


def test_engine_benchmark_repeats_interleave_modes_and_report_medians():
    """--repeats 3: static and engine alternate run by run, each run has its own line, and the
    median lines hold each metric's median over the runs."""
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine", "--configs", "tiny", "--concurrency", "2", "--steps", "4",
         "--requests", "3", "--rate", "20", "--min-tokens", "4", "--max-tokens", "8", "--kv-caches", "",
         "--modes", "static,engine", "--repeats", "3"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [m for m in (REPEAT_LINE.match(line) for line in res.stdout.splitlines()) if m]
    assert [(m.group(1), m.group(7)) for m in lines] == [
        ("static", "1"), ("engine", "1"), ("static", "2"), ("engine", "2"), ("static", "3"), ("engine", "3"),
        ("static", "median"), ("engine", "median")]
    for median in lines[6:]:
        runs = [m for m in lines[:6] if m.group(1) == median.group(1)]
        for group in range(2, 7):
            values = sorted(float(m.group(group)) for m in runs)
            assert float(median.group(group)) == pytest.approx(values[1], abs=0.011)
    assert all(0 < float(m.group(6)) <= 1 for m in lines)
    assert "engine vs static" in res.stderr


def test_engine_benchmark_row_use_is_per_run():
    """The repeats share one engine: each run's row_use counts that run's slot-steps only, so a
    run after another one reports what a fresh engine reports for the same arrivals."""
    import jax.numpy as jnp

    from benchmarks.decode import make_config, random_params
    from benchmarks.engine import serve_engine, workload
    from mvjax.inference.decode import FirstStageDecoder
    from mvjax.inference.engine import FirstStageEngine

    config = make_config("tiny")
    decoder = FirstStageDecoder(config, random_params(config), end_of_audio=config.vocab_sizes[0] + 5,
                                dtype=jnp.float32)
    short = workload(2, 0.0, 3, 3, config.vocab_sizes[0], seed=1)  # all at t=0: the same rounds every time
    mixed = workload(3, 0.0, 2, 11, config.vocab_sizes[0], seed=2)
    engine = FirstStageEngine(decoder, slots=2, steps=4)
    serve_engine(decoder, short, 2, 4, time.perf_counter(), engine=engine)
    _, reused = serve_engine(decoder, mixed, 2, 4, time.perf_counter(), engine=engine)
    _, fresh = serve_engine(decoder, mixed, 2, 4, time.perf_counter(), engine=FirstStageEngine(decoder, 2, 4))
    assert reused == fresh < 1.0 and engine.row_use != fresh


def test_decode_benchmark_rejects_too_few_tokens():
    res = subprocess.run([sys.executable, "-m", "benchmarks.decode", "--tokens", "2"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode != 0 and "--tokens must be >= 3" in res.stderr


@needs_reference
def test_decode_benchmark_compiled_reference_same_rule():
    """--reference-compile at the tiny size: inductor compiles the reference on the CPU and both
    sides report the same timing rule (first call apart, median of the same number of runs)."""
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.decode", "--config", "tiny", "--tokens", "8", "--repeats", "2",
         "--reference-src", REFERENCE_SRC, "--reference-compile", "--reference-compile-mode", "default"],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    timings = {t[0]: t for t in TIMING.findall(res.stdout)}
    assert set(timings) == {"ours", "reference"}
    for side, new_tokens, repeats, first, compile_s, median, prefill, runs in timings.values():
        assert (new_tokens, repeats) == ("8", "2") and len(runs.split(",")) == 2
        assert float(first) >= float(compile_s) and float(median) > 0
    assert re.search(r"^decode-reference config=tiny batch=1 dtype=float32 device=cpu compiled=1 ", res.stdout, re.M)
    assert "torch.compile default" in res.stdout


@pytest.mark.slow
def test_decode_benchmark_full_shape_runs():
    """The released 1.2B shape (random weights): minutes on two CPU cores; run with -m slow."""
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.decode", "--config", "full", "--batch", "1", "--tokens", "9", "--repeats", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=3000,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"^decode config=full batch=1 ", res.stdout, re.M)


@pytest.mark.slow  # a whole benchmark run (30-70 s); the code it times is tested in the default suite
def test_pipeline_benchmark_smoke():
    """Tiny shapes, our side only (the reference needs a metavoice-src checkout): every stage reported."""
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.pipeline", "--config", "tiny", "--seconds", "0.3", "--repeats", "1",
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
    assert re.search(r"^pipeline side=ours stage=first_call seconds=[0-9.]+$", res.stdout, re.M)


@needs_reference
def test_pipeline_benchmark_compiled_reference():
    """--tokens and --reference-compile at the tiny size: both sides' stages, first calls and ratios."""
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.pipeline", "--config", "tiny", "--tokens", "12", "--repeats", "1",
         "--reference-src", REFERENCE_SRC, "--reference-compile"],
        capture_output=True, text=True, cwd=REPO, timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "12 first-stage tokens" in res.stdout
    for side in ("ours", "reference"):
        for stage in ("stage1", "stage2", "codec", "end_to_end", "first_call"):
            assert re.search(rf"^pipeline side={side} stage={stage} seconds=[0-9.]+", res.stdout, re.M), (side, stage)
    assert re.search(r"speedup stage1\+stage2\+codec \(float32 vs reference torch.compile", res.stdout)


@pytest.mark.slow  # a whole benchmark run (30-70 s); the code it times is tested in the default suite
def test_quantize_benchmark_head_entropy():
    """benchmarks/quantize.py --head-entropy at the tiny size: the scaled model reaches the asked
    float32 entropy and its int8 KL / agreement are reported next to it."""
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.quantize", "--quick", "--skip-speed", "--modes", "float32", "int8",
         "--head-entropy", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"^quantize-fidelity inputs=random-head2 mode=int8 mean_kl=(\S+) max_kl=\S+ greedy_agree=(\S+) "
                  r"entropy=(\S+) factor=(\S+)$", res.stdout, re.M)
    assert m, res.stdout[-2000:]
    assert abs(float(m.group(3)) - 2.0) < 0.05 and float(m.group(4)) > 0
    assert 0.0 <= float(m.group(2)) <= 1.0 and float(m.group(1)) >= 0.0


@pytest.mark.slow  # a whole benchmark run (30-70 s); the code it times is tested in the default suite
def test_finetune_benchmark_smoke():
    """benchmarks/finetune.py at the tiny size, one timed step per side: one line per mode and side
    with finite rates and peaks; with the reference source at hand, its eager training step trains
    the same parameters from the same loss, and its LoRA lines say there is no reference LoRA."""
    import importlib.util
    import math

    src = Path(REFERENCE_SRC or "/tmp/mvsrc")
    with_reference = (src / "fam" / "llm" / "model.py").is_file() and importlib.util.find_spec("torch") is not None
    cmd = [sys.executable, "-m", "benchmarks.finetune", "--config", "tiny", "--steps", "1",
           "--sides", "ours,reference" if with_reference else "ours"]
    if with_reference:
        cmd += ["--reference-src", str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = {}
    for m in re.finditer(r"^finetune config=tiny mode=(\S+) side=(\S+) tokens_per_s=(\S+) peak_gb=(\S+)((?: \w+=\S+)*)$",
                         res.stdout, re.M):
        fields = dict(kv.split("=", 1) for kv in m.group(5).split())
        lines[(m.group(1), m.group(2))] = (float(m.group(3)), float(m.group(4)), fields)
    expected = {("last-block", "ours"), ("lora", "ours")}
    if with_reference:
        expected |= {("last-block", "reference"), ("lora", "reference")}
    assert set(lines) == expected, res.stdout
    for (mode, side), (tps, peak, fields) in lines.items():
        assert fields["batch"] == "1" and fields["ctx"] == "256" and fields["steps"] == "1"
        if (mode, side) == ("lora", "reference"):
            assert math.isnan(tps) and math.isnan(peak) and fields["reason"] == "no-lora-in-reference"
            continue
        assert tps > 0 and peak > 0 and float(fields["step_s"]) > 0 and float(fields["first_call_s"]) > 0
        assert len(fields["steps_s"].split(",")) == 1 and int(fields["trainable"]) > 0
        assert abs(float(fields["loss"]) - math.log(2562)) < 0.3  # random weights: near-uniform predictions
    if with_reference:
        assert lines[("last-block", "ours")][2]["trainable"] == lines[("last-block", "reference")][2]["trainable"]
        assert re.search(r"^finetune-ratio config=tiny mode=last-block batch=1 vs=reference speed=[0-9.]+ "
                         r"memory=[0-9.]+$", res.stdout, re.M)


ADMISSION_LINE = re.compile(r"^admission config=tiny prefill_chunk=(none|8) slots=2 steps=1 prompt=20 "
                            r"median_step_s=([0-9.]+) worst_gap_s=([0-9.]+) ratio=([0-9.]+) busy_ratio=([0-9.]+) "
                            r"ttft_s=([0-9.]+) run=(1|median)$")


def test_admission_benchmark_smoke():
    """The admission benchmark on the tiny model, whole prefill and pieces of 8: one line per run and a
    median line per setting (the gaps are the machine's, not checked)."""
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.admission", "--config", "tiny", "--chunks", "none,8", "--slots", "2",
         "--running", "1", "--arrivals", "1", "--prompt", "20", "--spacing", "4", "--repeats", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [m for m in (ADMISSION_LINE.match(line) for line in res.stdout.splitlines()) if m]
    assert [(m.group(1), m.group(7)) for m in lines] == [("none", "1"), ("8", "1"), ("none", "median"),
                                                          ("8", "median")]


BATCH_LINE = re.compile(r"^batch mode=(local|ray) workers=(\d+) rows_per_min=([0-9.]+) audio_s_per_s=([0-9.]+)$")


@pytest.mark.slow
def test_batch_benchmark_smoke():
    """The dataset-job benchmark on the demo-size model, embedded and on a local Ray cluster with two
    workers: one line per mode, every row done, the same tokens in both (the rates are not checked)."""
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.batch", "--config", "demo", "--rows", "3", "--stop", "60",
         "--max-new-tokens", "160", "--batch-size", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tokens equal across modes: yes" in res.stdout
    lines = [m for m in (BATCH_LINE.match(line) for line in res.stdout.splitlines()) if m]
    assert [(m.group(1), m.group(2)) for m in lines] == [("local", "1"), ("ray", "2")]
    assert all(float(m.group(3)) > 0 and float(m.group(4)) > 0 for m in lines)
