"""Fine-tuning past one device: fsdp sharding, several jax.distributed processes, a killed process, resume.

Forced host devices need ``XLA_FLAGS`` before jax is imported, and ``jax.distributed`` needs one
process per task, so everything here runs in child processes on the demo model (2 blocks, width 64)
with rows of 64 tokens: each child costs an import and a compile, not training time.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mvjax.train.checkpoints import restore_for_export
from mvjax.train.loop import load_run_model
from mvjax.train.model import split_params
from mvjax.train.optim import make_optimizer
from mvjax.train.run import batch_rows, checkpoint_manager, read_run_file, restore_checkpoint, run_configs
from mvjax.train.sharding import MIN_SHARDED_ELEMENTS, shard_spec
from mvjax.train.trainer import new_state
from tests.conftest import REPO
from tests.serve_util import free_port
from tests.test_multidevice import _clean_env

# 8 training rows and 3 validation rows: a batch of 4 splits over 1, 2 x 2 and 4 devices alike.
DATA_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    from mvjax.sources.demo import demo_model_dir
    from mvjax.io.checkpoint import load_gpt_stage
    from mvjax.train.data import write_manifest, write_split
    _, _, tok = load_gpt_stage(demo_model_dir(), "first_stage")
    pad, ctx, out = tok.offset - 1, 64, Path(sys.argv[1])
    rng = np.random.default_rng(0)
    rows = np.full((8, 1, ctx + 1), pad, np.int32)
    for r in range(8):
        tokens = np.concatenate([tok.encode("hello there"), rng.integers(0, pad, 20 + 3 * r)])
        rows[r, 0, : len(tokens)] = tokens
    spk = rng.standard_normal((8, 256)).astype(np.float32)
    write_split(out / "train.npz", rows, spk, ["hello there"] * 8, ["a.wav"] * 8, [10] * 8)
    write_split(out / "val.npz", rows[5:], spk[5:], ["hello there"] * 3, ["a.wav"] * 3, [10] * 3)
    write_manifest(out, {"format": "mvjax-finetune-data", "version": 1, "model": "demo", "ctx_window": ctx,
                         "pad_token": pad, "codebook_size": pad // 2, "speaker_emb_dim": 256,
                         "splits": {"train": {"rows": 8, "skipped": {}}, "val": {"rows": 3, "skipped": {}}}})
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mvjax.sources.demo import demo_model_dir

    demo_model_dir()  # built once here, not raced by the processes below
    out = tmp_path_factory.mktemp("data")
    res = subprocess.run([sys.executable, "-c", DATA_SCRIPT, str(out)], capture_output=True, text=True, cwd=REPO,
                         env=_clean_env(PYTHONPATH=str(REPO)), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _devices(n: int) -> dict:
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "PYTHONPATH": str(REPO)}


def _launch(args, processes: int, devices: int, record=None):
    """``processes`` copies of ``python -m mvjax.finetune train ARGS`` forming one jax.distributed job (with
    ``record``: through :mod:`tests.fetch_probe`, which notes the training rows each process reads)."""
    probe = ["tests.fetch_probe", str(record)] if record is not None else ["mvjax.finetune"]
    cmd = [sys.executable, "-m", *probe, "train", *args]
    if processes > 1:
        cmd += ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", str(processes)]
    return [subprocess.Popen(cmd + (["--process-id", str(i)] if processes > 1 else []), cwd=REPO,
                             env=_clean_env(**_devices(devices)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(processes)]


def _finish(procs, timeout=300) -> list:
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def _train(args, processes: int, devices: int, record=None) -> None:
    for rc, out, err in _finish(_launch(args, processes, devices, record)):
        assert rc == 0, (out + err)[-3000:]


def _metrics(run) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run) -> list:
    return [(m["kind"], m["step"], m.get("loss", m.get("val_loss"))) for m in _metrics(run)]


def _trained(run, step=None) -> list:
    """The trained leaves (blocks and final norm) of a run's checkpoint, read back on this one device."""
    full = restore_for_export(run, step).params
    return [np.asarray(x) for x in jax.tree_util.tree_leaves({"blocks": full["blocks"], "ln_f": full["ln_f"]})]


def _state(run) -> dict:
    """The whole training state of a run's latest checkpoint (trainable weights, Adam's moments and count, step,
    key) read back on this one device, as {leaf path: array}."""
    settings = read_run_file(run)
    spec, optim, loop = run_configs(settings)
    cfg, params, _ = load_run_model(settings)
    _, trainable = split_params(cfg, spec, params)
    abstract = jax.eval_shape(lambda: new_state(make_optimizer(optim, trainable), trainable))
    manager = checkpoint_manager(run, loop.keep, read_only=True)
    try:
        state, _ = restore_checkpoint(manager, int(manager.latest_step()), abstract)
    finally:
        manager.close()
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_the_sharding_rule():
    k = 4
    assert shard_spec((2, 64, 192), k) == jax.sharding.PartitionSpec(None, None, "fsdp")  # largest divisible dim
    assert shard_spec((2562, 64), 2) == jax.sharding.PartitionSpec("fsdp", None)  # the token table, by rows...
    assert shard_spec((2562, 64), 4) == jax.sharding.PartitionSpec(None, "fsdp")  # ...unless K does not divide them
    assert shard_spec((2, 64), k) == jax.sharding.PartitionSpec()  # below MIN_SHARDED_ELEMENTS: replicated
    assert shard_spec((MIN_SHARDED_ELEMENTS + 1,), k) == jax.sharding.PartitionSpec()  # nothing K divides
    assert shard_spec((2, 64, 192), 1) == jax.sharding.PartitionSpec()


FSDP_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, jax
    from mvjax.io.checkpoint import load_gpt_stage
    from mvjax.sources.demo import demo_model_dir
    from mvjax.train.model import TrainSpec
    from mvjax.train.optim import OptimConfig
    from mvjax.train.sharding import MIN_SHARDED_ELEMENTS, device_bytes, training_mesh
    from mvjax.train.trainer import Trainer
    assert jax.device_count() == 4
    cfg, params, tok = load_gpt_stage(demo_model_dir(), "first_stage")
    with np.load(sys.argv[1]) as d:
        rows, spk = d["tokens"][:4], d["spk"][:4]
    specs = {"full": TrainSpec(last_n_blocks=cfg.n_layer, dropout=0.0),
             "lora+last": TrainSpec(last_n_blocks=1, lora_rank=4, lora_blocks=(0,), dropout=0.0)}
    out = {}
    for name, k in (("full", 1), ("full", 2), ("full", 4), ("lora+last", 1), ("lora+last", 4)):
        t = Trainer(cfg, params, specs[name], OptimConfig(learning_rate=1e-3), tok.offset - 1, mesh=training_mesh(k))
        state = t.init_state(0)
        losses = []
        for _ in range(2):
            state, m = t.step(state, rows, spk)
            losses.append(float(m["loss"]))
        leaves = {"state": jax.tree_util.tree_leaves(state), "frozen": jax.tree_util.tree_leaves(t.frozen)}
        out[f"{name}/{k}"] = {"losses": losses, "state": device_bytes(state), "frozen": device_bytes(t.frozen),
                              "whole": {p: sum(x.nbytes for x in v) for p, v in leaves.items()},
                              "small": {p: sum(x.nbytes for x in v if x.size < MIN_SHARDED_ELEMENTS)
                                        for p, v in leaves.items()},
                              "abstract": t.bytes_per_device()}
    print(json.dumps(out))
""")


def test_fsdp_shards_weights_gradients_and_optimiser_state_and_keeps_the_losses(data):
    res = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(data / "train.npz")], capture_output=True,
                         text=True, cwd=REPO, env=_clean_env(**_devices(4)), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name, ks in (("full", (2, 4)), ("lora+last", (4,))):
        ref = out[f"{name}/1"]
        for k in ks:
            got = out[f"{name}/{k}"]
            # Same program, other reduction orders across devices: float32 rounding of sums of ~256 losses and
            # of the gradient all-reduce, a few ulp of a loss near 8 after two steps.
            np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-6)
            for part in ("state", "frozen"):
                per_device = set(got[part].values())
                assert len(got[part]) == 4 and len(per_device) == 1, got[part]  # every device holds the same
                whole, small = got["whole"][part], got["small"][part]
                assert set(ref[part].values()) == {whole}  # K = 1: every device holds everything
                # 1/K of every array the rule splits (each dimension of 64, 192, 256 or 2048 that K divides),
                # whole copies of the small replicated ones (norm gains, LoRA adapters, Adam's count, step, key).
                assert per_device.pop() == (whole - small) // k + small, (name, k, part, got[part], whole, small)
                assert small < (0.02 if name == "full" else 0.15) * whole  # so the saving is nearly K-fold
            # What benchmarks.fsdp_memory reports for the released shape, from shapes alone, is what devices hold
            # (the state's extra 12 bytes: the step counter and the two-word key).
            abstract = got["abstract"]
            assert abstract["frozen"] == set(got["frozen"].values()).pop()
            assert abstract["trainable"] + abstract["opt_state"] + 12 == set(got["state"].values()).pop()


def test_two_processes_train_as_one_process_and_as_one_device(data, tmp_path):
    base = ["--demo", "--data", str(data), "--steps", "3", "--batch-size", "4", "--dropout", "0",
            "--learning-rate", "1e-3", "--last-n-blocks", "2", "--eval-every", "2", "--save-every", "1",
            "--no-progress"]
    runs = {"2x2": (2, 2, ["--fsdp", "2"]), "1x4": (1, 4, ["--fsdp", "4"]), "1x1": (1, 1, [])}
    for name, (processes, devices, extra) in runs.items():
        _train([*base, *extra, "--out", str(tmp_path / name)], processes, devices, record=tmp_path / f"{name}-reads")
    # Each process read exactly the training rows its own devices hold: the mesh lays the batch over the devices in
    # JAX's order (process 0's first), so of each step's 4 rows process 0 reads the first two and process 1 the
    # last two, one read per device; a single process reads them all. No row is read twice or by another process.
    seed = json.loads((tmp_path / "1x1" / "run.json").read_text())["loop"]["seed"]
    steps = [batch_rows(8, 4 * s, 4, seed) for s in range(3)]
    for name, (processes, devices, _) in runs.items():
        for p in range(processes):
            reads = json.loads((tmp_path / f"{name}-reads.{p}.json").read_text())
            assert reads["spk"] == reads["tokens"], name
            share = 4 // processes
            want = sorted(int(i) for idx in steps for i in idx[p * share:(p + 1) * share])
            assert sorted(i for read in reads["tokens"] for i in read) == want, (name, p, reads["tokens"], steps)
            assert {len(read) for read in reads["tokens"]} == {4 // (processes * devices)}, (name, reads)
    ref = _losses(tmp_path / "1x1")
    assert [k for k, _, _ in ref] == ["eval", "train", "train", "eval", "train", "eval"]
    ref_params = _trained(tmp_path / "1x1")
    for name in ("2x2", "1x4"):
        got = _losses(tmp_path / name)
        assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in ref]  # written once, by process 0
        np.testing.assert_allclose([v for *_, v in got], [v for *_, v in ref], rtol=1e-6)
        for a, b in zip(_trained(tmp_path / name), ref_params):
            # Relative in the norm of each array: Adam divides every gradient element by its own running
            # magnitude, so an element whose gradient is at rounding level (other reduction orders over
            # devices) moves by a different part of the learning rate, ~1e-7 here; the arrays as a whole
            # agree to float32 rounding.
            assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b), (name, a.shape, np.abs(a - b).max())


def _children(pid: int) -> list:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def test_a_killed_process_stops_the_job_in_one_line_and_resume_continues_the_run(data, tmp_path):
    """2 processes x 2 devices; the training child of process 1 is SIGKILLed after its first checkpoint. Each
    process says so in one line. --resume with the same 2 processes x 2 devices takes the uninterrupted run's
    steps bit for bit (every loss, and the final weights and optimiser state); with 1 process of 4 devices it
    ends where that run does to float32 rounding (another reduction topology, see below)."""
    import shutil
    import signal
    import time

    base = ["--demo", "--data", str(data), "--batch-size", "4", "--dropout", "0", "--learning-rate", "1e-3",
            "--last-n-blocks", "2", "--eval-every", "1000", "--save-every", "2", "--keep", "100", "--fsdp", "2",
            "--no-progress"]
    _train([*base, "--steps", "30", "--out", str(tmp_path / "ref")], 2, 2)
    killed = tmp_path / "killed"
    procs = _launch([*base, "--steps", "100000", "--out", str(killed)], 2, 2)  # constant schedule: --steps may change
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoints" / "2").is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        children = _children(procs[1].pid)  # the supervisor's training child (mvjax.train.job.supervise)
        assert len(children) == 1, children
        os.kill(children[0], signal.SIGKILL)
    finally:
        results = _finish(procs, timeout=120)
    for rc, out, err in results:
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 1 and lines and lines[-1].startswith("error: a process of this job stopped"), err[-3000:]
        assert "continue from checkpoint" in lines[-1] and "--resume" in lines[-1], lines[-1]
        assert sum(line.startswith("error:") for line in lines) == 1, err[-3000:]
        for native in ("Traceback", "Fatal Python", "Check failure", "Terminating process", "Aborted", "core dumped"):
            assert native not in err, err[-3000:]
    saved = max(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert 2 <= saved < 30, saved
    other = tmp_path / "killed_then_one_process"
    shutil.copytree(killed, other)
    _train([*base, "--steps", "30", "--resume", "--out", str(killed)], 2, 2)
    _train([*base, "--steps", "30", "--resume", "--out", str(other)], 1, 4)
    ref = _losses(tmp_path / "ref")
    ref_params = _trained(tmp_path / "ref")
    # Same processes, devices and mesh: a resumed step is the uninterrupted run's step, bit for bit. The restored
    # state is the saved one, the step compiles to the same program (explicit in/out shardings), batches and
    # dropout keys are functions of the step, and the collectives sum over the same devices in the same order.
    got = _losses(killed)
    assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in ref]  # the kill's tail was dropped, then redone
    assert got == ref
    for a, b in zip(_trained(killed), ref_params):
        assert np.array_equal(a, b), (a.shape, np.abs(a - b).max())
    state, ref_state = _state(killed), _state(tmp_path / "ref")
    assert list(state) == list(ref_state)
    for path in ref_state:
        assert np.array_equal(state[path], ref_state[path]), path
    # 1 process x 4 devices: the steps before the kill are the 2 x 2 run's own, bit for bit; after the resume the
    # loss is summed over the 4 devices in another order (in-process collectives, not gloo across 2 processes),
    # which moves a loss near 7.5 by an ulp (6e-8 relative) at some steps: the losses an uninterrupted 1 x 4 run
    # writes, not an effect of resuming. The small replicated arrays' Adam moments (norm gains) pick up such
    # ulps too, so the weights are held to float32 rounding in each array's norm, as 1 x 4 against 2 x 2 above.
    got = _losses(other)
    assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in ref]
    assert got[:saved + 1] == ref[:saved + 1]
    np.testing.assert_allclose([v for *_, v in got], [v for *_, v in ref], rtol=1e-6)
    for a, b in zip(_trained(other), ref_params):
        assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b), (other.name, a.shape, np.abs(a - b).max())
