"""Dataset job throughput: ``python -m mvjax.batch`` embedded against Ray Data with N workers, one run.

    python -m benchmarks.batch [--config medium|demo] [--rows 16] [--workers 2] [--stop 1000]
                               [--batch-size 8] [--modes local,ray]

Each mode runs the whole command in a child process, as a user would (model loading, compilation
and, on Ray, starting the local cluster and its actors included: that is what a job costs), on the
same listing into its own output directory: ``--rows`` rows of one or two sentences from the
serve benchmark's list, each with its own seed, in the serve benchmark's voice, ``--decoder
encodec --no-enhance``. The model is the serve benchmark's random model
(:func:`benchmarks.serve.model_dir`: ``medium`` is a 12 x 1024 first stage made to stop around
position ``--stop``), built once into the cache and shared with it. ``--modes ray`` starts a local
Ray cluster of this machine's CPUs (or uses ``$RAY_ADDRESS``); its workers hold one CPU each here
(``--devices-per-worker`` GPUs on a cluster with GPUs).

Rows per minute and audio seconds made per second are over the child's wall time; the tokens of
every row are compared between the modes (they must be equal: a row's tokens depend only on it).
One line per mode:
  batch mode=<local|ray> workers=<n> rows_per_min=<x> audio_s_per_s=<y>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.serve import DEFAULT_STOP, SENTENCES, VOICE, log, model_dir, write_voice

REPO = Path(__file__).resolve().parent.parent


def listing_rows(n: int) -> list[dict]:
    """``n`` rows: one sentence, or two for every third row (a mix of lengths, fixed)."""
    rows = []
    for i in range(n):
        text = SENTENCES[i % len(SENTENCES)]
        if i % 3 == 2:
            text += " " + SENTENCES[(i + 3) % len(SENTENCES)]
        rows.append({"id": f"u{i:04d}", "text": text, "voice": VOICE, "seed": i})
    return rows


def run_mode(mode: str, args, model: Path, listing: Path, voices: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "mvjax.batch", str(listing), "--out", str(out), "--model", str(model), "--voices",
           str(voices), "--decoder", "encodec", "--no-enhance", "--max-new-tokens", str(args.max_new_tokens),
           "--batch-size", str(args.batch_size), "--save-tokens", "--quiet"]
    workers = 1
    if mode == "ray":
        workers = args.workers
        cmd += ["--ray", "--workers", str(workers), "--devices-per-worker", str(args.devices_per_worker)]
    log(f"{mode}: {' '.join(cmd[1:])}")
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        log(res.stderr[-3000:])
        raise SystemExit(f"{mode}: the job failed (exit status {res.returncode})")
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ok = [r for r in results if r["status"] == "ok"]
    audio = sum(r["audio_seconds"] for r in ok)
    return {"mode": mode, "workers": workers, "rows": len(ok), "wall": wall, "audio": audio,
            "row_seconds": sorted(r["wall_seconds"] for r in ok)}


def same_tokens(a: Path, b: Path, ids: list[str]) -> bool:
    for row_id in ids:
        with np.load(a / f"{row_id}.npz") as x, np.load(b / f"{row_id}.npz") as y:
            if not np.array_equal(x["all_codebooks"], y["all_codebooks"]):
                return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["medium", "demo"], default="medium")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="Ray mode's workers")
    p.add_argument("--devices-per-worker", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="engine slots per device (each mode)")
    p.add_argument("--max-new-tokens", type=int, default=1600, help="first-stage cap per chunk")
    p.add_argument("--stop", type=int, default=DEFAULT_STOP,
                   help="random model: first-stage position around which end of audio takes over")
    p.add_argument("--modes", default="local,ray")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per mode")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("local", "ray") for m in modes) or args.rows < 1 or args.workers < 1:
        p.error("--modes takes local and/or ray; --rows and --workers must be >= 1")

    model = model_dir(args.config, args.stop)
    rows = listing_rows(args.rows)
    runs = []
    with tempfile.TemporaryDirectory(prefix="mvjax-bench-batch-") as tmp:
        tmp = Path(tmp)
        voices = tmp / "voices"
        voices.mkdir()
        write_voice(voices)
        listing = tmp / "listing.jsonl"
        listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for mode in modes:
            runs.append(run_mode(mode, args, model, listing, voices, tmp / f"out-{mode}"))
        equal = len(runs) < 2 or same_tokens(tmp / "out-local", tmp / "out-ray", [r["id"] for r in rows])
    print(f"# machine: {os.cpu_count()} CPUs; config={args.config} stop={args.stop} rows={args.rows} "
          f"batch_size={args.batch_size}; tokens equal across modes: {'yes' if equal else 'NO'}")
    for r in runs:
        print(f"# {r['mode']}: {r['rows']} rows, {r['audio']:.1f} s of audio in {r['wall']:.1f} s (whole command); "
              f"row wall p50 {r['row_seconds'][len(r['row_seconds']) // 2]:.1f} s")
        print(f"batch mode={r['mode']} workers={r['workers']} rows_per_min={60 * r['rows'] / r['wall']:.2f} "
              f"audio_s_per_s={r['audio'] / r['wall']:.3f}", flush=True)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
