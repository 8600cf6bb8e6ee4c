"""Several devices and processes: forced host devices and simulated Slurm tasks.

Forced host devices need ``XLA_FLAGS`` before jax is imported, so those checks run in child
processes; the cluster detection itself is checked in this process with a patched environment.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mvjax.cli.finetune import main as finetune_main
from tests.conftest import REPO
from tests.serve_util import DEMO_ARGS, free_port
from tests.test_finetune_cli import _one_line, data, demo_model  # noqa: F401 - the small prepared-data fixtures

FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
# Variables by which JAX recognises a cluster (jax._src.clusters): none may leak in from the machine running tests.
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "JAX_", "TPU_", "MEGASCALE_", "KUBERNETES_")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_PREFIXES)}
    return {**env, **extra}


def _slurm(tasks: int, proc_id: int, port: int | None = None) -> dict:
    """The variables a Slurm task sees (one node, 127.0.0.1); ``port``: the coordinator's, through the
    variable JAX reads for it."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(tasks), "SLURM_PROCID": str(proc_id),
           "SLURM_LOCALID": str(proc_id), "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NODELIST": "127.0.0.1",
           "SLURM_STEP_NUM_NODES": "1"}
    if port is not None:
        env["JAX_COORDINATOR_PORT"] = str(port)
    return env


@pytest.fixture
def no_cluster(monkeypatch):
    for key in list(os.environ):
        if key.startswith(CLUSTER_PREFIXES):
            monkeypatch.delenv(key)
    return monkeypatch


def test_slurm_is_detected_as_jax_does_and_one_task_needs_no_coordinator(no_cluster):
    import jax

    from mvjax.core import parallel

    def refuse(**kwargs):
        raise AssertionError(f"jax.distributed.initialize called with {kwargs}")

    no_cluster.setattr(jax.distributed, "initialize", refuse)
    assert parallel.detected_cluster() is None and parallel.requested_processes() == (1, None)
    assert parallel.initialize_distributed() is False
    with pytest.raises(parallel.ClusterError, match="--coordinator"):
        parallel.initialize_distributed(num_processes=2)
    for key, value in _slurm(1, 0).items():
        no_cluster.setenv(key, value)
    assert parallel.detected_cluster() == ("slurm", 1)
    assert parallel.initialize_distributed() is False  # a one-task job: no coordinator, no initialize
    no_cluster.setenv("SLURM_NTASKS", "2")
    assert parallel.requested_processes() == (2, "slurm")
    calls = []
    no_cluster.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert parallel.initialize_distributed() is True and calls == [{}]  # no arguments: JAX reads Slurm itself


def test_slurm_tasks_split_the_lines(tmp_path):
    """Two simulated Slurm tasks on one node, no mvjax flag: each synthesises its own two lines of four."""
    from mvjax.sources.demo import demo_model_dir

    demo_model_dir()  # built once here, not raced by the two tasks
    text_file = tmp_path / "texts.txt"
    text_file.write_text("First line.\nSecond line.\nThird line.\nFourth line.\n")
    out_dir = tmp_path / "out"
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "mvjax.synthesize", *DEMO_ARGS, "--max-new-tokens", "16",
                               "--text-file", str(text_file), "--out", str(out_dir)],
                              cwd=REPO, env=_clean_env(**_slurm(2, i, port)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    written = [[line.split()[1] for line in stdout.splitlines() if line.startswith("wrote ")] for stdout, _ in outputs]
    assert [len(w) for w in written] == [2, 2], written
    assert sorted(written[0] + written[1]) == [str(out_dir / f"{i:04d}.wav") for i in range(4)]  # each once
    assert "process 0 of 2: 2 of 4 texts" in outputs[0][1] and "process 1 of 2: 2 of 4 texts" in outputs[1][1]


def test_auto_batch_counts_host_memory_once_over_forced_cpu_devices():
    script = textwrap.dedent("""
        import json, jax
        assert jax.local_device_count() == 4, jax.devices()
        from mvjax.sources.demo import demo_model_dir
        from mvjax.core.parallel import device_count
        from mvjax.inference import throughput
        from mvjax.inference.pipeline import TTS
        tts = TTS.load(demo_model_dir())
        assert device_count(tts.mesh) == 4
        need = throughput.per_utterance_bytes(tts, tts.config2.block_size, "encodec")
        budget = 32 * max(need.values()) / 0.7  # the host fits 32 chunks of the hungriest stage in all
        throughput.free_bytes = lambda device=None: budget
        sizes = throughput.resolve_batch_sizes(tts, "auto", "encodec", None)
        print(json.dumps({"need": need, "budget": budget, "sizes": sizes}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                         env=_clean_env(**FOUR_DEVICES), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = json.loads(res.stdout.strip().splitlines()[-1])
    usable = 0.7 * plan["budget"]
    for stage, per_device in plan["sizes"].items():
        need = plan["need"][stage]
        assert per_device * 4 * need <= usable, (stage, plan)  # all four devices' rows fit the one host memory
        assert per_device == 64 or 2 * per_device * 4 * need > usable, (stage, plan)  # and no smaller than that


def test_diffusion_pieces_fit_one_host_memory_over_forced_cpu_devices():
    """A diffusion batch too big for the free memory is decoded in pieces: on CPU devices, pieces that fit
    the one host memory, not one such piece per device."""
    script = textwrap.dedent("""
        import json, jax, numpy as np
        assert jax.local_device_count() == 4, jax.devices()
        from mvjax.sources.demo import demo_model_dir
        from mvjax.inference import stages, throughput
        from mvjax.inference.pipeline import TTS
        tts = TTS.load(demo_model_dir())
        frames = stages.diffusion_frames_bucket(100)
        per_row = throughput.diffusion_bytes_per_row(tts.diffusion, frames * tts.codec.config.hop_length, frames)
        throughput.free_bytes = lambda device=None: 2.5 * per_row / 0.7  # two rows fit the host
        pieces = []
        decoder = stages.WaveDecoder(tts.codec, lambda: tts.diffusion)
        decoder._decode = lambda piece, *rest: pieces.append(len(piece)) or [np.zeros((1, 0), np.float32)] * len(piece)
        chunks = [stages.Chunk(None, (i,), "", np.zeros(2, np.uint32), [], [], all_codebooks=np.zeros((8, 100), np.int32))
                  for i in range(8)]
        decoder.run(chunks, "mbd", stages.Batcher(2, tts.mesh))
        print(json.dumps(pieces))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                         env=_clean_env(**FOUR_DEVICES), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [2, 2, 2, 2]  # 8 chunks, two at a time

def _train(args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "mvjax.finetune", "train", *args], capture_output=True, text=True,
                          cwd=REPO, env=_clean_env(**env), timeout=timeout)


def test_finetune_default_batch_splits_over_four_devices(demo_model, data, tmp_path):  # noqa: F811
    base = ["--model", str(demo_model), "--data", str(data), "--steps", "1", "--no-progress"]
    res = _train([*base, "--out", str(tmp_path / "run")], FOUR_DEVICES)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "batch size 4: the default 2 rounded up to split over 4 devices" in res.stdout
    assert json.loads((tmp_path / "run" / "run.json").read_text())["loop"]["batch_size"] == 4
    # An explicit batch that does not split: one line, nothing written.
    res = _train([*base, "--batch-size", "6", "--out", str(tmp_path / "bad")], FOUR_DEVICES)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0] == "error: --batch-size 6 does not split over 4 devices: use a multiple of 4"
    assert not (tmp_path / "bad").exists()


def test_finetune_train_refuses_an_fsdp_degree_that_does_not_divide_the_devices(demo_model, data, tmp_path, capsys,  # noqa: F811
                                                                                no_cluster):
    rc = finetune_main(["train", "--model", str(demo_model), "--data", str(data), "--out", str(tmp_path / "run"),
                        "--fsdp", "3"])
    _one_line(capsys, rc, "--fsdp 3 does not divide the 1 devices of this job")
    assert not (tmp_path / "run").exists()
