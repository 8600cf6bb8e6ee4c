"""python -m mvjax.batch: the dataset job on the demo model, embedded and on a local Ray cluster.

One listing (a row per kind of voice: the demo's built-in voice, an audio file beside the listing,
a name in a --voices directory; per-row seeds and sampling; one text the model cannot read) is run
three ways, and every way must give the same tokens per id, bit for bit (the tokens of a row are
keyed by its own seed and sampled on one device, so nothing may differ: no tolerance):

1. the embedded job in a child process (rows join the engine's two slots as they free up), killed
   (SIGKILL) once its first rows are written, then rerun here: the rerun does only the rows not yet ok;
2. on a local Ray cluster with two workers (tasks of two rows: other neighbours in the engine), one
   worker process killed (by the pid it reports) after its first task: every id still ends ok
   exactly once;
3. ``python -m mvjax.synthesize`` for one row (an audio-file voice with its own seed and temperature).

On the same Ray session, a stand-in worker (tests/ray_killer.py, no model) whose process dies on one row
every time: the job ends, that row an error, every other row ok.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from mvjax.cli.batch import main
from mvjax.cli.synthesize import main as synthesize_main
from tests.conftest import REPO

# Two engine slots everywhere: every run after the first finds its programs in the compilation cache.
DEMO_FLAGS = ["--demo", "--decoder", "encodec", "--max-new-tokens", "96", "--save-tokens", "--batch-size", "2"]
BAD_TEXT = "こんにちは"  # outside Latin-1: the tokenizer refuses it
ROWS = [
    {"id": "r0", "text": "The first row of the job.", "voice": "demo"},
    {"id": "r1", "text": "A second row, with its own voice file.", "voice": "ref.wav", "seed": 5, "temperature": 0.8},
    {"id": "r2", "text": "Third: a named voice.", "voice": "alice", "top_p": 0.9},
    {"id": "bad", "text": BAD_TEXT, "voice": "demo"},
    {"id": "r4", "text": "Fourth row here.", "voice": "demo", "seed": 11},
    {"id": "r5", "text": "The fifth one is a little longer than the rest.", "voice": "alice", "seed": 3},
    {"id": "r6", "text": "Six.", "voice": "ref.wav"},
    {"id": "r7", "text": "Seventh and last row of the listing.", "voice": "demo", "guidance_scale": 2.0},
]
OK_IDS = sorted(r["id"] for r in ROWS if r["id"] != "bad")


def _write_listing(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def _tokens(out, row_id):
    with np.load(out / f"{row_id}.npz") as z:
        return z["first_stage"], z["all_codebooks"]


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """A listing directory: the listing, a voice file beside it and a --voices directory with one voice."""
    from mvjax.sources.demo import demo_model_dir, demo_speaker_audio

    demo_model_dir()  # built once here, not raced by the child process
    d = tmp_path_factory.mktemp("job")
    sf.write(d / "ref.wav", *demo_speaker_audio(seed=1))
    (d / "voices").mkdir()
    sf.write(d / "voices" / "alice.wav", *demo_speaker_audio(seed=2))
    _write_listing(d / "listing.jsonl", ROWS)
    return d


def _args(job_dir, out, *extra):
    return [str(job_dir / "listing.jsonl"), "--out", str(out), "--voices", str(job_dir / "voices"), *DEMO_FLAGS,
            *extra]


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _ok_lines(out):
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}") and '"ok"' in line]


@pytest.fixture(scope="module")
def local_run(job_dir):
    """The embedded job in a child process, two rows at a time, killed (SIGKILL) once two rows are written,
    then rerun to the end: (output directory, the result lines at the kill, the mtimes of the files
    written by then, the rerun's exit status and stderr)."""
    out = job_dir / "local"
    with open(job_dir / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "mvjax.batch", *_args(job_dir, out)],
                                 cwd=REPO, stdout=log, stderr=log)
        try:
            _wait_for(lambda: len(_ok_lines(out)) >= 2 or child.poll() is not None, 300, "the first rows")
            assert child.poll() is None, (job_dir / "child.log").read_text()[-3000:]
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
    before = (out / "results.jsonl").read_text()
    done_before = [json.loads(line) for line in before.splitlines() if line.endswith("}")]
    ok_before = {r["id"] for r in done_before if r["status"] == "ok"}
    stamps = {i: (out / f"{i}.wav").stat().st_mtime_ns for i in ok_before}
    with contextlib.redirect_stderr(io.StringIO()) as err:  # the rerun, here
        rc = main(_args(job_dir, out))
    return out, done_before, stamps, rc, err.getvalue()


def test_killed_job_reruns_only_the_rows_not_yet_ok(local_run):
    out, done_before, stamps, rc, err = local_run
    ok_before = set(stamps)
    assert 2 <= len(ok_before) < len(OK_IDS), done_before  # killed mid-job
    assert rc == 1, err  # the row whose text cannot be spoken
    assert f"{len(ROWS)} rows: {len(ok_before)} done before (skipped), {len(ROWS) - len(ok_before)} to do" in err
    lines = _results(out)
    assert sorted(r["id"] for r in lines) == sorted(r["id"] for r in ROWS)  # every id exactly once
    assert [r for r in lines if r["id"] in ok_before] == [r for r in done_before if r["id"] in ok_before]
    assert {i: (out / f"{i}.wav").stat().st_mtime_ns for i in ok_before} == stamps  # not written again
    status = {r["id"]: r for r in lines}
    assert sorted(i for i, r in status.items() if r["status"] == "ok") == OK_IDS
    bad = status["bad"]
    assert bad["status"] == "error" and "unsupported character" in bad["error"] and bad["file"] is None
    for row_id in OK_IDS:
        record = status[row_id]
        audio, rate = sf.read(out / record["file"])
        assert rate == 24000 and abs(audio.size / rate - record["audio_seconds"]) < 1e-3
        assert record["digest"] and record["wall_seconds"] > 0
    job = json.loads((out / "job.json").read_text())
    assert job["model_digest"] and job["mvjax_version"] and job["options"]["max_new_tokens"] == 96
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.fixture(scope="module")
def ray_cluster():
    import ray  # the [scale] extra, part of [test]: a missing Ray fails these tests, it does not skip them

    # Ray's worker processes inherit the environment ray.init starts them with: this checkout (mvjax and the
    # tests' stand-in workers, imported by module name) goes first on their path.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([old] if old else []))
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, logging_level="ERROR")
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_workers_give_the_local_tokens_even_when_one_is_killed(ray_cluster, job_dir, local_run, capfd):
    out = job_dir / "ray"
    result = {}
    args = _args(job_dir, out, "--ray", "--workers", "2", "--rows-per-task", "2")
    worker = threading.Thread(target=lambda: result.setdefault("rc", main(args)))
    worker.start()
    try:
        first = _wait_for(lambda: _ok_lines(out) or not worker.is_alive(), 300, "the first row from a worker")
        assert worker.is_alive(), result
        pid = int(first[0]["worker"].rsplit(":", 1)[1])
        assert pid != os.getpid()
        rows_at_kill = len(_ok_lines(out))
        os.kill(pid, signal.SIGKILL)
    finally:
        worker.join(timeout=600)
    err = capfd.readouterr().err
    assert not worker.is_alive() and result["rc"] == 1, err  # 1: the row that cannot be spoken
    assert rows_at_kill < len(OK_IDS)  # the kill came mid-job
    lines = _results(out)
    assert sorted(r["id"] for r in lines) == sorted(r["id"] for r in ROWS), lines  # exactly once each
    assert sorted(r["id"] for r in lines if r["status"] == "ok") == OK_IDS
    assert len({r["worker"] for r in lines if r["status"] == "ok"}) >= 2  # both workers (or a restarted one) ran rows
    local = local_run[0]
    for row_id in OK_IDS:
        for ours, theirs in zip(_tokens(out, row_id), _tokens(local, row_id)):
            np.testing.assert_array_equal(ours, theirs, err_msg=row_id)
    assert {r["id"]: r["digest"] for r in lines} == {r["id"]: r["digest"] for r in _results(local)}

    # The directory Ray made, rerun embedded with one row changed: that row and the failed one are redone.
    _write_listing(job_dir / "changed.jsonl", [dict(r, seed=9) if r["id"] == "r6" else r for r in ROWS])
    rc = main([str(job_dir / "changed.jsonl"), *_args(job_dir, out)[1:]])
    err = capfd.readouterr().err
    assert rc == 1 and f"{len(ROWS)} rows: {len(OK_IDS) - 1} done before (skipped), 2 to do" in err, err
    lines = _results(out)
    assert sorted(r["id"] for r in lines) == sorted(r["id"] for r in ROWS)
    assert {r["id"]: r["seed"] for r in lines}["r6"] == 9


def test_a_row_that_kills_its_worker_every_time_is_an_error_and_the_rest_end_ok(ray_cluster, job_dir, tmp_path,
                                                                                 monkeypatch, capfd):
    """A row whose task ends its worker process each time it runs (tests/ray_killer.py, no model): Ray retries the
    task once, then drops its block; the row and its task-mates go round again one per task, so the killer fails
    alone, twice the same way (an error), and its task-mates end ok. Ray Data's default (retry without limit)
    would never end."""
    import functools

    from mvjax.batchjob import job as J
    from mvjax.batchjob.runners import RayRunner
    from tests.ray_killer import KILLER, KillerWorker

    ids = ["k0", "k1", KILLER, "k3", "k4", "k5"]
    listing = _write_listing(tmp_path / "listing.jsonl", [{"id": i, "text": f"Row {i}.", "voice": "demo"} for i in ids])
    monkeypatch.setattr("mvjax.cli.batch.RayRunner", functools.partial(RayRunner, worker=KillerWorker))
    out, result = tmp_path / "out", {}
    # Tasks of 3 rows: the killer shares its first task with k0 and k1.
    args = [str(listing), "--out", str(out), *DEMO_FLAGS, "--ray", "--workers", "2", "--rows-per-task", "3"]
    worker = threading.Thread(target=lambda: result.setdefault("rc", main(args)))
    worker.start()
    worker.join(timeout=300)  # a hang guard: unbounded retries would never return
    err = capfd.readouterr().err
    assert not worker.is_alive() and result["rc"] == 1, err
    assert "1 of 6 rows failed" in err, err
    lines = _results(out)
    assert sorted(r["id"] for r in lines) == sorted(ids), lines  # every id exactly once
    status = {r["id"]: r for r in lines}
    assert status[KILLER]["status"] == "error" and status[KILLER]["error"] == J.WORKER_DIED
    assert sorted(i for i, r in status.items() if r["status"] == "ok") == sorted(set(ids) - {KILLER})
    for i in set(ids) - {KILLER}:
        assert (out / f"{i}.wav").read_bytes() == b"RIFF" + i.encode()  # the stand-in's placeholder


def test_a_row_equals_synthesize_for_its_text_voice_and_seed(job_dir, local_run, tmp_path):
    row = ROWS[1]
    saved = tmp_path / "one.npz"
    rc = synthesize_main(["--demo", "--text", row["text"], "--speaker", str(job_dir / row["voice"]), "--seed",
                          str(row["seed"]), "--temperature", str(row["temperature"]), "--decoder", "encodec",
                          "--max-new-tokens", "96", "--batch-size", "2", "--out", str(tmp_path / "one.wav"),
                          "--save-tokens", str(saved),
                          "--quiet"])
    assert rc == 0
    out = local_run[0]
    with np.load(saved) as z:
        first_stage, all_codebooks = z["first_stage"], z["all_codebooks"]
    ours = _tokens(out, row["id"])
    np.testing.assert_array_equal(ours[0], first_stage)
    np.testing.assert_array_equal(ours[1], all_codebooks)


@pytest.mark.parametrize("rows, message", [
    ([{"id": "a", "text": "x", "voice": "demo"}, {"id": "a", "text": "y", "voice": "demo"}],
     "listing.jsonl line 2: id 'a' is a duplicate of listing.jsonl line 1"),
    ([{"id": "A", "text": "x", "voice": "demo"}, {"id": "a", "text": "y", "voice": "demo"}],
     "ignoring case"),
    ([{"id": "a", "text": "x", "voice": "demo"}, {"id": "b", "text": "y", "voice": "nobody"}],
     "listing.jsonl line 2: voice 'nobody' is neither a voice of --voices nor an audio file"),
    ([{"id": "a", "text": "x", "voice": "demo", "temprature": 1}], "unknown field(s) 'temprature'"),
    ([{"id": "a", "text": "x", "voice": "demo", "temperature": 9}], "temperature must be a finite number in [0, 5]"),
    ([{"id": "../a", "text": "x", "voice": "demo"}], "id '../a' must be 1-128 characters"),
    ([{"id": "a", "text": "x", "voice": "demo", "seed": 1.5}], "seed must be an integer"),
])
def test_bad_listings_are_refused_before_any_work(tmp_path, capsys, rows, message):
    listing = _write_listing(tmp_path / "listing.jsonl", rows)
    out = tmp_path / "out"
    rc = main([str(listing), "--out", str(out), "--demo"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()  # nothing was started


def test_csv_listing_and_its_refusals(tmp_path, capsys):
    from mvjax.batchjob.listing import ListingError, ListingLimits, read_listing
    from mvjax.inference.options import SynthesisOptions

    path = tmp_path / "l.csv"
    path.write_text('id,text,voice,seed,top_p\nx1,"Hello, there.",demo,7,\nx2,Bye.,demo,,none\n')
    rows = read_listing(path, SynthesisOptions(seed=3))
    assert [(r.id, r.seed, r.sampling.top_p) for r in rows] == [("x1", 7, 0.95), ("x2", 3, None)]
    with pytest.raises(ListingError, match="more than 1 rows"):
        read_listing(path, SynthesisOptions(), ListingLimits(max_rows=1))
    with pytest.raises(ListingError, match="the limit is 10"):
        read_listing(path, SynthesisOptions(), ListingLimits(max_bytes=10))
    path.write_text("id,text\nx,y\n")
    with pytest.raises(ListingError, match="missing: voice"):
        read_listing(path, SynthesisOptions())


def test_failures_are_retried_and_recorded_once_they_repeat(tmp_path):
    """The driver's rounds with a stand-in runner: a row that fails the same way twice is an error with
    that reason; one that fails once is retried (and ends ok); one failing differently each time gets
    MAX_ATTEMPTS tries; a runner that dies mid-round sends the rows it had not answered round again; a row
    never answered in a round that ends (its Ray task's worker died every time) failed with WORKER_DIED.
    Later rounds ask the runner for one row per task (retry=True)."""
    from mvjax.batchjob import job as J
    from mvjax.batchjob.worker import JobSettings, Outcome, Task
    from mvjax.inference.options import SamplingConfig, SynthesisOptions

    ids = ["same", "once", "varies", "lost", "input", "dies"]
    rows = [J.Row(i, "text", "demo", 0, SamplingConfig(), f"line {n}") for n, i in enumerate(ids)]
    plan = J.Plan(tmp_path, JobSettings(SynthesisOptions()), "m", rows,
                  {i: Task(i, "text", np.zeros(4, np.float32), 0, SamplingConfig()) for i in ids},
                  {i: f"digest-{i}" for i in ids}, set())
    calls = []

    def runner(tasks, retry=False):
        calls.append(([t.id for t in tasks], retry))
        attempt = len(calls)
        for t in tasks:
            if t.id == "dies":
                continue  # no outcome, ever
            if t.id == "lost" and attempt == 1:
                raise RuntimeError("a worker died")  # the dataset fails: "lost" has no answer in round 1
            if t.id == "same" or (t.id == "once" and attempt == 1):
                yield Outcome(t.id, "boom")
            elif t.id == "varies":
                yield Outcome(t.id, f"boom {attempt}")
            elif t.id == "input":
                yield Outcome(t.id, "unsupported character(s) in text", final=True)
            else:
                yield Outcome(t.id, None, b"RIFF", audio_seconds=1.5)

    summary = J.run(plan, runner)
    # "input" and "dies" had no answer before the failure: they go round too; "dies" then fails twice as
    # WORKER_DIED (once as the failed round's "worker failed" first).
    assert calls == [(ids, False), (ids, True), (["varies", "dies"], True)]
    status = {r["id"]: r for r in _results(tmp_path)}
    assert len(_results(tmp_path)) == len(ids)  # one line per id
    assert status["same"]["status"] == "error" and status["same"]["error"] == "boom"
    assert status["once"]["status"] == "ok" and (tmp_path / "once.wav").read_bytes() == b"RIFF"
    assert status["varies"]["status"] == "error" and status["varies"]["error"] == "boom 3"
    assert status["lost"]["status"] == "ok"
    assert status["input"]["status"] == "error" and status["input"]["error"].startswith("unsupported")
    assert status["dies"]["status"] == "error" and status["dies"]["error"] == J.WORKER_DIED
    assert (summary.ok, summary.errors, summary.audio_seconds) == (2, 4, 3.0)


def test_an_output_that_would_overwrite_an_input_is_refused(tmp_path, capsys):
    (tmp_path / "ref.wav").write_bytes(b"not read before the refusal")
    listing = _write_listing(tmp_path / "listing.jsonl", [{"id": "ref", "text": "x", "voice": "ref.wav"}])
    rc = main([str(listing), "--out", str(tmp_path), "--demo"])
    err = capsys.readouterr().err
    assert rc == 1 and "ref.wav is an input of the job" in err and "refusing to overwrite it" in err, err
    assert (tmp_path / "ref.wav").read_bytes() == b"not read before the refusal"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["listing.jsonl", "ref.wav"]
