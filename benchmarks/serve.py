"""Speech server under load: cross-request batching on and off, on loopback.

    python -m benchmarks.serve [--config medium|demo] [--concurrency 8] [--requests 32] [--rate R]
                               [--time-limit S] [--max-batch 8] [--quick] [--log-dir DIR]

For each mode the benchmark starts ``python -m mvjax.serve`` as a child process on a free
127.0.0.1 port (``batched``: ``--max-batch N``, the continuous-batching engine; ``static``:
``--max-batch N --batching static``, batches decoded to their longest chunk; ``single``:
``--max-batch 1``, one chunk at a time), always with ``--warmup`` (every engine shape compiled
before listening) and ``--decoder encodec --no-enhance`` (``--decoder``/``--enhance`` change that),
warms it up (requests one after another, concurrent bursts of 2, 4, ... up to the batch size, then
the whole workload once untimed, so the shapes the timed run meets are compiled: a compilation
inside the timed run would be charged to whichever mode met it), then runs the load: ``--requests``
requests whose arrivals are a Poisson process of ``--rate`` per second, at most
``--concurrency`` in flight (a client pool of that size: an arrival waits for a free client),
stopped at ``--time-limit`` seconds (requests not finished by then count as not completed).
Texts are one or two sentences drawn from a fixed list with a fixed seed, and each request has
its own fixed sampling seed, so both modes synthesise exactly the same work (the server's
tokens do not depend on what a chunk is batched with).

Per request: latency (request sent, after a client was free, to the last byte of a streamed
pcm response), time to first audio (first non-empty body chunk; the server's own
``X-Time-To-First-Audio`` header is kept too), success. Utterances/min = completed requests /
wall time of the load (first arrival to the last completion). The server is always stopped
(SIGTERM, then SIGKILL) on the way out, errors and Ctrl-C included.

Models (random weights, converted with our converter, built once into the cache
``<cache root>/bench/serve-<config>-v1-seed0`` and reused): ``medium`` is a first stage of 12
layers x 1024, 16 heads, block 2048 (the size benchmarks/decode.py calls medium) with the demo's
small second stage, codec and speaker encoder; ``demo`` is the demo model's sizes (``--demo``: a
2 x 64 first stage). A random first stage almost never samples end of audio (a 1 in 2562 chance
a step), so every chunk would run to the end of its block (minutes a request on a CPU); the
model is made to stop: a fixed direction is added to its learned position embeddings, growing
from position ``--stop``/2 to 2 x ``--stop`` (default 200), and its end-of-audio output row is
that direction, so end of audio takes over the sampling around there (utterances of a few hundred
first-stage tokens, varying with the text, voice and seed; a random direction in the output row
instead does not work: the hidden state barely moves within a chunk, so a chunk either stops at
once or runs to the end of its block).
The voice is the demo's synthetic reference audio, written into a temporary ``--voices`` dir.

Ends with one machine-readable line per mode:
  serve mode=<batched|static|single> concurrency=<n> utt_per_min=<x> p50_s=<y> p95_s=<z> ttfa_p50_s=<t>
and, at concurrency 8, the target verdict (batched >= 2x the utterances/min of single, p95
latency <= 1.5x single's):
  serve-target concurrency=8 speedup=<x> p95_ratio=<y> pass=<yes|no>
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import FIRST_STAGE_SHAPES, FIRST_STAGE_VOCAB

REPO = Path(__file__).resolve().parent.parent
MODEL_VERSION = "v1"
VOICE = "bench"

SENTENCES = [
    "The wind turned to the north during the night.",
    "Three fishing boats had already left before the sun came up.",
    "He counted the ships that passed the point.",
    "Every evening he read his notes aloud to the cat, who listened with great patience.",
    "The light can be seen from almost twenty miles away on a clear night.",
    "Children from the school climbed the narrow stairs.",
    "A small habit, done with care for many years, becomes a kind of company.",
    "Some of them only wanted to see the seals sleeping on the sand below.",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- The model directory ----------------------------------------------------------------------


def checkpoints(config: str, seed: int, stop: int) -> dict:
    """Released-layout checkpoints: the first stage at ``config``'s size, the demo's other components."""
    from convert_weights import random_checkpoints as rc

    ranks = rc.train_bpe(rc.TRAINING_TEXT)
    if config == "medium":
        args = rc.model_args(vocab_sizes=[FIRST_STAGE_VOCAB], **FIRST_STAGE_SHAPES["medium"])
    else:
        args = dict(rc.FIRST_STAGE_ARGS)
    first = rc.gpt_checkpoint(rc.component_rng(seed, 1), args, rc.FIRST_STAGE_TEXT_OFFSET, ranks,
                              {"causal": True, "batch_size": 8, "learning_rate": 3e-4,
                               "block_size": args["block_size"]}, prefix="_orig_mod.")
    # Make utterances end: a fixed direction u is added to the learned position embeddings,
    # ramping in from position ``stop`` / 2 to 2 * ``stop``, and the end-of-audio output row is u
    # (scaled): once u dominates the residual stream, end of audio wins the sampling.
    model = first["model"]
    d = args["n_embd"]
    u = rc.component_rng(seed, 9).standard_normal(d)
    u /= np.linalg.norm(u)
    pos = np.arange(args["block_size"], dtype=np.float64)
    ramp = np.clip((pos - stop / 2) / (1.5 * stop), 0.0, 1.0)
    model["_orig_mod.transformer.wpe.weight"] += (3.0 * ramp[:, None] * u[None, :]).astype(np.float32)
    model["_orig_mod.lm_heads.0.weight"][2 * rc.CODEBOOK] = (12.0 / np.sqrt(d) * u).astype(np.float32)
    return {
        "first_stage": first,
        "second_stage": rc.gpt_checkpoint(rc.component_rng(seed, 2), rc.SECOND_STAGE_ARGS, rc.SECOND_STAGE_TEXT_OFFSET,
                                          ranks, {"causal": False, "batch_size": 16, "learning_rate": 3e-4,
                                                  "block_size": rc.SECOND_STAGE_ARGS["block_size"]}, prefix=""),
        "speaker_encoder": rc.speaker_checkpoint(rc.component_rng(seed, 3)),
        "encodec": rc.encodec_state(rc.component_rng(seed, 4), **rc.ENCODEC_24KHZ),
        "mbd": rc.mbd_checkpoint(rc.component_rng(seed, 5)),
    }


def model_dir(config: str, stop: int, seed: int = 0) -> Path:
    """The converted model directory for ``config`` (built on first use, then reused)."""
    from convert_weights.random_checkpoints import RELEASED_FILES
    from convert_weights.torch_writer import save_checkpoint
    from mvjax.core.paths import cache_root
    from mvjax.sources.demo import build_model_dir

    def write(tmp: Path) -> None:
        for name, ckpt in checkpoints(config, seed, stop).items():
            save_checkpoint(tmp / RELEASED_FILES[name], ckpt)

    out = cache_root() / "bench" / f"serve-{config}-{MODEL_VERSION}-stop{stop}-seed{seed}"
    return build_model_dir(out, write, f"random {config} model", log=log)


def write_voice(directory: Path) -> None:
    import soundfile as sf

    from mvjax.sources.demo import demo_speaker_audio

    audio, rate = demo_speaker_audio()
    sf.write(directory / f"{VOICE}.wav", audio, rate)


# --- The server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m mvjax.serve`` in a child process; :meth:`stop` sends SIGTERM, then SIGKILL."""

    def __init__(self, args: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = log_path
        self.proc = None

    def start(self, timeout: float) -> "Server":
        import httpx

        self._fh = open(self.log_path, "xb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mvjax.serve", *self.args], cwd=REPO,
                                     stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy within {timeout} s; see {self.log_path}")

    def stop(self, grace: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if self.proc is not None:
            self._fh.close()

    def batch_lines(self) -> list[str]:
        return [line.split("INFO ", 1)[-1] for line in self.log_path.read_text(errors="replace").splitlines()
                if "INFO batch:" in line]


# --- The load ---------------------------------------------------------------------------------


def workload(n: int, rate: float, seed: int) -> list[dict]:
    """``n`` requests: Poisson arrival times (s), one or two sentences, a sampling seed each."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n)) if rate > 0 else np.zeros(n)
    arrivals -= arrivals[0]
    out = []
    for i in range(n):
        k = int(rng.integers(1, 3))
        text = " ".join(SENTENCES[j] for j in rng.choice(len(SENTENCES), k, replace=False))
        out.append({"at": float(arrivals[i]), "text": text, "seed": 1000 + i})
    return out


async def one_request(client, url: str, text: str, seed: int) -> dict:
    body = {"model": "tts-1", "input": text, "voice": VOICE, "response_format": "pcm", "stream": True, "seed": seed}
    sent = time.perf_counter()
    first, nbytes, header_ttfa = None, 0, None
    try:
        async with client.stream("POST", url + "/v1/audio/speech", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return {"ok": False, "status": resp.status_code, "latency": time.perf_counter() - sent}
            header_ttfa = float(resp.headers.get("X-Time-To-First-Audio", "nan"))
            async for data in resp.aiter_bytes():
                if data and first is None:
                    first = time.perf_counter() - sent
                nbytes += len(data)
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        return {"ok": False, "status": type(exc).__name__, "latency": time.perf_counter() - sent}
    latency = time.perf_counter() - sent
    return {"ok": nbytes > 0, "status": 200, "latency": latency, "ttfa": first if first is not None else latency,
            "header_ttfa": header_ttfa, "audio_s": nbytes / 2 / 24000, "end": time.perf_counter()}


async def run_load(url: str, jobs: list[dict], concurrency: int, time_limit: float, timeout: float) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    pool = asyncio.Semaphore(concurrency)
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30), limits=limits) as client:
        start = time.perf_counter()

        async def client_task(job):
            await asyncio.sleep(max(0.0, start + job["at"] - time.perf_counter()))
            async with pool:
                queued = time.perf_counter() - start - job["at"]
                r = await one_request(client, url, job["text"], job["seed"])
                results.append({**r, "client_wait": queued})

        tasks = [asyncio.create_task(client_task(j)) for j in jobs]
        done, pending = await asyncio.wait(tasks, timeout=time_limit)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        stopped = time.perf_counter()
    ok = [r for r in results if r["ok"]]
    wall = (max(r["end"] for r in ok) - start) if len(ok) == len(jobs) else stopped - start
    return {"results": results, "ok": ok, "wall": wall, "sent": len(jobs), "unfinished": len(pending)}


async def warmup(url: str, texts: list[str], max_batch: int, timeout: float) -> None:
    """One request at a time (both text lengths), then bursts of 2, 4, ... max_batch at once."""
    import httpx

    async with httpx.AsyncClient(timeout=timeout) as client:
        for i, text in enumerate(texts[:2]):
            r = await one_request(client, url, text, 90000 + i)
            log(f"  warmup: 1 request, {r['latency']:.1f} s (ok={r['ok']})")
        size = 2
        while size <= max_batch:
            t = time.perf_counter()
            rs = await asyncio.gather(*[one_request(client, url, texts[j % len(texts)], 91000 + 100 * size + j)
                                        for j in range(size)])
            log(f"  warmup: burst of {size}, {time.perf_counter() - t:.1f} s (ok={sum(r['ok'] for r in rs)}/{size})")
            size *= 2


def percentile(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarise(mode: str, concurrency: int, load: dict) -> dict:
    ok = load["ok"]
    lat = [r["latency"] for r in ok]
    ttfa = [r["ttfa"] for r in ok]
    return {
        "mode": mode, "concurrency": concurrency, "completed": len(ok), "sent": load["sent"],
        "failed": sum(not r["ok"] for r in load["results"]), "unfinished": load["unfinished"], "wall_s": load["wall"],
        "utt_per_min": 60.0 * len(ok) / load["wall"] if load["wall"] > 0 else 0.0,
        "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "ttfa_p50_s": percentile(ttfa, 50),
        "ttfa_p95_s": percentile(ttfa, 95),
        "header_ttfa_p50_s": percentile([r["header_ttfa"] for r in ok], 50),
        "client_wait_p50_s": percentile([r["client_wait"] for r in ok], 50),
        "audio_s": float(sum(r["audio_s"] for r in ok)),
        "statuses": sorted({str(r["status"]) for r in load["results"] if not r["ok"]}),
    }


def result_line(s: dict) -> str:
    return (f"serve mode={s['mode']} concurrency={s['concurrency']} utt_per_min={s['utt_per_min']:.2f} "
            f"p50_s={s['p50_s']:.3f} p95_s={s['p95_s']:.3f} ttfa_p50_s={s['ttfa_p50_s']:.3f}")


def run_mode(mode: str, max_batch: int, args, model: Path, voices: Path, logs: Path, jobs: list[dict]) -> dict:
    server_args = ["--model", str(model), "--voices", str(voices), "--max-batch", str(max_batch),
                   "--batching", "static" if mode == "static" else "engine", "--engine-steps", str(args.engine_steps),
                   "--decoder", args.decoder, "--max-new-tokens", str(args.max_new_tokens),
                   "--max-queue", str(max(64, 2 * args.requests)),
                   "--timeout", str(args.time_limit + 60), "--warmup"]
    if not args.enhance:
        server_args.append("--no-enhance")
    server = Server(server_args, logs / f"server-{mode}.log")
    log(f"[{mode}] starting the server (--max-batch {max_batch}) on {server.url}; log {server.log_path}")
    try:
        server.start(args.start_timeout)
        t = time.perf_counter()
        asyncio.run(warmup(server.url, [j["text"] for j in sorted(jobs, key=lambda j: len(j["text"]))][::-1],
                           max_batch, args.time_limit))
        rehearsal = asyncio.run(run_load(server.url, [{**j, "seed": j["seed"] + 50000} for j in jobs],
                                         args.concurrency, args.time_limit, args.time_limit + 30))
        log(f"[{mode}] untimed pass of the workload: {len(rehearsal['ok'])}/{len(jobs)} in {rehearsal['wall']:.1f} s")
        log(f"[{mode}] warmed up in {time.perf_counter() - t:.1f} s; load: {len(jobs)} requests at {args.rate}/s, "
            f"{args.concurrency} clients, limit {args.time_limit:.0f} s")
        skip = len(server.batch_lines())
        load = asyncio.run(run_load(server.url, jobs, args.concurrency, args.time_limit, args.time_limit + 30))
        batches = server.batch_lines()[skip:]
    finally:
        server.stop()
    summary = summarise(mode, args.concurrency, load)
    summary["batches"] = batches
    return summary


def batch_stats(lines: list[str]) -> str:
    import re

    rows = [tuple(float(x) for x in m.groups()) for m in
            (re.search(r"batch: (\d+) chunks of (\d+) requests \(\d+ started\), (\d+) tokens, ([0-9.]+) s "
                        r"\(stage 1 ([0-9.]+) s\)", line)
             for line in lines) if m]
    if not rows:
        return "no batch lines"
    a = np.array(rows)
    return (f"{len(a)} batches, mean {a[:, 0].mean():.2f} chunks, {a[:, 2].sum() / a[:, 3].sum():.1f} tokens/s "
            f"overall, {a[:, 3].mean():.2f} s per batch (stage 1 {a[:, 4].mean():.2f} s), stage 1 share "
            f"{a[:, 4].sum() / a[:, 3].sum():.0%}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["medium", "demo"], default="medium")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=None, help="default 32 (--quick: 16)")
    p.add_argument("--rate", type=float, default=None, help="arrivals per second (default 0.5; --quick: 1)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per mode's load (default 900; --quick 240)")
    p.add_argument("--max-batch", type=int, default=8, help="the batched mode's --max-batch")
    p.add_argument("--modes", default="batched,single",
                   help="comma-separated: batched (the engine), static (--batching static), single (--max-batch 1)")
    p.add_argument("--engine-steps", type=int, default=16, help="the server's --engine-steps")
    p.add_argument("--decoder", choices=["encodec", "mbd"], default="encodec")
    p.add_argument("--enhance", action="store_true", help="DeepFilterNet3 on (default: --no-enhance)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="the server's first-stage cap per chunk (default 128 with --quick, else 256)")
    p.add_argument("--stop", type=int, default=200, help="random model: first-stage position where end of audio takes over")
    p.add_argument("--seed", type=int, default=0, help="texts, arrivals and request seeds")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--log-dir", type=Path, default=None, help="server logs here (must not exist; default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="fewer requests and a shorter limit")
    args = p.parse_args(argv)
    args.requests = args.requests or (16 if args.quick else 32)
    args.max_new_tokens = args.max_new_tokens or (128 if args.quick else 256)
    args.rate = args.rate if args.rate is not None else (1.0 if args.quick else 0.5)
    args.time_limit = args.time_limit or (240.0 if args.quick else 900.0)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("batched", "static", "single") for m in modes) or not modes:
        p.error("--modes takes batched, static and/or single")
    if args.concurrency < 1 or args.requests < 1 or args.max_batch < 1 or args.rate < 0:
        p.error("--concurrency, --requests and --max-batch must be >= 1, --rate >= 0")
    if args.log_dir is not None and args.log_dir.exists():
        p.error(f"--log-dir {args.log_dir} exists; refusing to overwrite it")

    model = model_dir(args.config, args.stop)
    jobs = workload(args.requests, args.rate, args.seed)
    summaries = []
    with tempfile.TemporaryDirectory(prefix="mvjax-bench-serve-") as tmp:
        logs = Path(tmp) / "logs"
        if args.log_dir is not None:
            args.log_dir.mkdir(parents=True)
            logs = args.log_dir
        else:
            logs.mkdir()
        for mode in modes:
            voices = Path(tmp) / f"voices-{mode}"
            voices.mkdir()
            write_voice(voices)
            summaries.append(run_mode(mode, 1 if mode == "single" else args.max_batch, args, model, voices, logs, jobs))
            s = summaries[-1]
            log(f"[{mode}] {s['completed']}/{s['sent']} completed ({s['failed']} failed {s['statuses']}, "
                f"{s['unfinished']} unfinished at the limit) in {s['wall_s']:.1f} s: {s['utt_per_min']:.2f} utt/min, "
                f"latency p50 {s['p50_s']:.2f} s p95 {s['p95_s']:.2f} s, first audio p50 {s['ttfa_p50_s']:.2f} s "
                f"p95 {s['ttfa_p95_s']:.2f} s (server header p50 {s['header_ttfa_p50_s']:.2f} s), client wait p50 "
                f"{s['client_wait_p50_s']:.2f} s, {s['audio_s']:.1f} s of audio")
            log(f"[{mode}] server batches: {batch_stats(s['batches'])}")
    print(f"# machine: {os.cpu_count()} CPUs; config={args.config} requests={args.requests} rate={args.rate}/s "
          f"time_limit={args.time_limit:.0f}s max_batch={args.max_batch} decoder={args.decoder}")
    for s in summaries:
        print(result_line(s), flush=True)
    by = {s["mode"]: s for s in summaries}
    if "batched" in by and "single" in by and by["single"]["utt_per_min"] > 0:
        speedup = by["batched"]["utt_per_min"] / by["single"]["utt_per_min"]
        p95_ratio = by["batched"]["p95_s"] / by["single"]["p95_s"]
        verdict = speedup >= 2.0 and p95_ratio <= 1.5
        print(f"serve-target concurrency={args.concurrency} speedup={speedup:.2f} p95_ratio={p95_ratio:.2f} "
              f"pass={'yes' if verdict else 'no'}" + ("" if args.concurrency == 8 else " (the target is stated at 8)"))
    return 0 if all(s["completed"] for s in summaries) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
