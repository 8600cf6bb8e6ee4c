"""Speech server under load: whole answers and streamed answers, cross-request batching on and off, on loopback.

    python -m benchmarks.serve [--config medium|demo] [--concurrency 1,8] [--requests 16] [--rate R]
                               [--modes batched,stream,static,single] [--time-limit S] [--max-batch 8]
                               [--quick] [--log-dir DIR]

Modes and their servers (each ``python -m mvjax.serve`` as a child process on a free 127.0.0.1
port, always with ``--warmup`` and ``--decoder encodec --no-enhance`` unless ``--decoder``/
``--enhance`` say otherwise): ``batched`` asks for whole answers (``stream: false``) from a server
with ``--max-batch N`` (the continuous-batching engine); ``stream`` asks the same server, the same
warm process, for answers streamed as they are made (``stream: true`` with the server's default
frame pieces: audio within a chunk every few frames); ``static`` asks for whole answers from a
server with ``--batching static`` (batches decoded to their longest chunk); ``single`` from one
with ``--max-batch 1``. Each server is warmed up (requests one after another, concurrent bursts of
2, 4, ... up to the batch size, then the whole workload once untimed unless ``--no-rehearse``, so
the shapes the timed runs meet are compiled), then for each ``--concurrency`` in increasing order
every mode on it runs the load in turn: requests whose arrivals are a Poisson process of
``--rate`` per second, at most that many in flight (a client pool: an arrival waits for a free
client), stopped at ``--time-limit`` seconds (requests not finished by then count as not
completed). The highest concurrency runs ``--requests`` requests, a lower one the first
``requests x c / highest`` of them (at least 3): at concurrency 1 they run one after another.
Texts are one or two sentences drawn from a fixed list with a fixed seed, and each request has
its own fixed sampling seed, so every mode synthesises exactly the same work (the server's tokens
do not depend on what a chunk is batched with or on streaming).

Per request: latency (request sent, after a client was free, to the last byte of the pcm
response), time to first audio (first non-empty body piece; the server's own
``X-Time-To-First-Audio`` header is logged too), the largest gap between two body pieces, the
playback stall (how long a player that starts at the first piece would wait for audio in all),
success. Utterances/min = completed requests / wall time of the load (first arrival to the last
completion). The server is always stopped (SIGTERM, then SIGKILL) on the way out, errors and
Ctrl-C included.

Models (random weights, converted with our converter, built once into the cache
``<cache root>/bench/serve-<config>-v1-stop<stop>-seed0`` and reused): ``medium`` is a first
stage of 12 layers x 1024, 16 heads, block 2048 (the size benchmarks/decode.py calls medium) with
the demo's small second stage, codec and speaker encoder; ``demo`` is the demo model's sizes (a
2 x 64 first stage). A random first stage almost never samples end of audio (a 1 in 2562 chance
a step), so every chunk would run to the end of its block; the model is made to stop: a fixed
direction is added to its learned position embeddings, growing from position ``--stop``/2 to
2 x ``--stop``, and its end-of-audio output row is that direction, so end of audio takes over the
sampling around there (a random direction in the output row instead does not work: the hidden
state barely moves within a chunk, so a chunk either stops at once or runs to the end of its
block). The default ``--stop`` makes answers of several seconds of audio (the log prints the
shortest), so that streaming within a chunk shows. The voice is the demo's synthetic reference
audio, written into a temporary ``--voices`` dir.

Ends with one machine-readable line per mode and concurrency:
  serve mode=<mode> concurrency=<n> utt_per_min=<x> p50_s=<y> p95_s=<z> ttfa_p50_s=<t> ttfa_p95_s=<u> max_gap_s=<g>
and the targets the run has the numbers for. Batched against one at a time at the highest
concurrency (>= 2x the utterances/min, p95 latency <= 1.5x):
  serve-target concurrency=<n> speedup=<x> p95_ratio=<y> pass=<yes|no>
Streaming (needs concurrency 1 and a higher one, modes batched and stream): first audio at
concurrency 1 <= 0.15 x the whole answer's p50 latency, first audio p95 at the highest
concurrency <= 4 x concurrency 1's p50, and utterances/min streamed >= 0.9 x whole answers there:
  serve-stream-target concurrency=<n> ttfa_vs_whole_c1=<r> ttfa_p95_vs_c1=<c> throughput_vs_whole=<t> pass=<yes|no>
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
DEFAULT_STOP = 1000  # see --stop: medium model, answers of ~6.4 s (1200: 553-616 frames, 7.4-8.2 s)
SAMPLE_RATE = 24000  # the pcm the server streams: 16-bit mono

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


async def one_request(client, url: str, text: str, seed: int, stream: bool) -> dict:
    """One speech request for pcm. ``stream``: audio as it is made (``stream: true``, the server's
    default frame pieces); otherwise the whole answer in one response. Records the arrival time of
    every non-empty body piece, for the time to first audio and the gaps between pieces."""
    body = {"model": "tts-1", "input": text, "voice": VOICE, "response_format": "pcm", "stream": stream, "seed": seed}
    sent = time.perf_counter()
    arrivals, header_ttfa = [], None
    try:
        async with client.stream("POST", url + "/v1/audio/speech", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return {"ok": False, "status": resp.status_code, "latency": time.perf_counter() - sent}
            header_ttfa = float(resp.headers.get("X-Time-To-First-Audio", "nan"))
            async for data in resp.aiter_bytes():
                if data:
                    arrivals.append((time.perf_counter() - sent, len(data)))
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        return {"ok": False, "status": type(exc).__name__, "latency": time.perf_counter() - sent}
    latency = time.perf_counter() - sent
    nbytes = sum(n for _, n in arrivals)
    times = [t for t, _ in arrivals]
    return {"ok": nbytes > 0, "status": 200, "latency": latency, "ttfa": times[0] if times else latency,
            "header_ttfa": header_ttfa, "audio_s": nbytes / 2 / SAMPLE_RATE, "end": time.perf_counter(),
            "max_gap": max(np.diff(times), default=0.0), "stall": playback_stall(arrivals)}


def playback_stall(arrivals: list[tuple[float, int]]) -> float:
    """Seconds a player that starts at the first piece would wait for audio in all: each piece is
    due when the audio before it has played out (16-bit mono at 24 kHz)."""
    if not arrivals:
        return 0.0
    clock, played, stall = arrivals[0][0], 0.0, 0.0
    for at, nbytes in arrivals:
        due = clock + played + stall
        stall += max(0.0, at - due)
        played += nbytes / 2 / SAMPLE_RATE
    return stall


async def run_load(url: str, jobs: list[dict], concurrency: int, time_limit: float, timeout: float,
                   stream: bool) -> dict:
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
                r = await one_request(client, url, job["text"], job["seed"], stream)
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


async def warmup(url: str, texts: list[str], max_batch: int, timeout: float, stream: bool) -> None:
    """One request at a time (both text lengths), then bursts of 2, 4, ... max_batch at once."""
    import httpx

    async with httpx.AsyncClient(timeout=timeout) as client:
        for i, text in enumerate(texts[:2]):
            r = await one_request(client, url, text, 90000 + i, stream)
            log(f"  warmup: 1 request, {r['latency']:.1f} s (ok={r['ok']})")
        size = 2
        while size <= max_batch:
            t = time.perf_counter()
            rs = await asyncio.gather(*[one_request(client, url, texts[j % len(texts)], 91000 + 100 * size + j, stream)
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
        "ttfa_p95_s": percentile(ttfa, 95), "max_gap_s": max((r["max_gap"] for r in ok), default=float("nan")),
        "stall_p50_s": percentile([r["stall"] for r in ok], 50),
        "header_ttfa_p50_s": percentile([r["header_ttfa"] for r in ok], 50),
        "client_wait_p50_s": percentile([r["client_wait"] for r in ok], 50),
        "audio_s": float(sum(r["audio_s"] for r in ok)),
        "audio_min_s": min((r["audio_s"] for r in ok), default=float("nan")),
        "statuses": sorted({str(r["status"]) for r in load["results"] if not r["ok"]}),
    }


def result_line(s: dict) -> str:
    return (f"serve mode={s['mode']} concurrency={s['concurrency']} utt_per_min={s['utt_per_min']:.2f} "
            f"p50_s={s['p50_s']:.3f} p95_s={s['p95_s']:.3f} ttfa_p50_s={s['ttfa_p50_s']:.3f} "
            f"ttfa_p95_s={s['ttfa_p95_s']:.3f} max_gap_s={s['max_gap_s']:.3f}")


# Which server each mode runs on: modes that share a server take turns on it (the same warm
# process), so their numbers differ only by what the requests ask for.
SERVER_OF = {"batched": "engine", "stream": "engine", "static": "static", "single": "single"}
STREAMS = {"batched": False, "stream": True, "static": False, "single": False}


def jobs_at(jobs: list[dict], concurrency: int, top: int) -> list[dict]:
    """The workload at ``concurrency``: the first ``len(jobs) * concurrency / top`` requests (at
    least 3), so that lower concurrencies, which run one request after another, stay short."""
    return jobs[:max(3, min(len(jobs), round(len(jobs) * concurrency / top)))]


def run_server(kind: str, modes: list[str], args, model: Path, voices: Path, logs: Path,
               jobs: list[dict]) -> list[dict]:
    """Start one server, warm it up, then run each concurrency's load once per mode, modes
    alternating on the same process; the server is stopped on the way out."""
    max_batch = 1 if kind == "single" else args.max_batch
    server_args = ["--model", str(model), "--voices", str(voices), "--max-batch", str(max_batch),
                   "--batching", "static" if kind == "static" else "engine", "--engine-steps", str(args.engine_steps),
                   "--decoder", args.decoder, "--max-new-tokens", str(args.max_new_tokens),
                   "--max-queue", str(max(64, 2 * args.requests)),
                   "--timeout", str(args.time_limit + 60), "--warmup", "--log-rounds"]
    if not args.enhance:
        server_args.append("--no-enhance")
    server = Server(server_args, logs / f"server-{kind}.log")
    log(f"[{kind}] starting the server (--max-batch {max_batch}) on {server.url} for {', '.join(modes)}; "
        f"log {server.log_path}")
    streams = any(STREAMS[m] for m in modes)  # streaming meets every shape whole answers do, and more
    top = max(args.concurrency)
    out = []
    try:
        server.start(args.start_timeout)
        t = time.perf_counter()
        asyncio.run(warmup(server.url, [j["text"] for j in sorted(jobs, key=lambda j: len(j["text"]))][::-1],
                           max_batch, args.time_limit, streams))
        if args.rehearse:
            rehearsal = asyncio.run(run_load(server.url, [{**j, "seed": j["seed"] + 50000} for j in jobs],
                                             top, args.time_limit, args.time_limit + 30, streams))
            log(f"[{kind}] untimed pass of the workload: {len(rehearsal['ok'])}/{len(jobs)} in "
                f"{rehearsal['wall']:.1f} s")
        log(f"[{kind}] warmed up in {time.perf_counter() - t:.1f} s")
        for concurrency in sorted(args.concurrency):
            load_jobs = jobs_at(jobs, concurrency, top)
            for mode in modes:
                log(f"[{mode}] load: {len(load_jobs)} requests at {args.rate}/s, {concurrency} clients, "
                    f"limit {args.time_limit:.0f} s")
                skip = len(server.batch_lines())
                load = asyncio.run(run_load(server.url, load_jobs, concurrency, args.time_limit,
                                            args.time_limit + 30, STREAMS[mode]))
                summary = summarise(mode, concurrency, load)
                summary["batches"] = server.batch_lines()[skip:]
                report(summary)
                out.append(summary)
    finally:
        server.stop()
    return out


def report(s: dict) -> None:
    log(f"[{s['mode']} x{s['concurrency']}] {s['completed']}/{s['sent']} completed ({s['failed']} failed "
        f"{s['statuses']}, {s['unfinished']} unfinished at the limit) in {s['wall_s']:.1f} s: "
        f"{s['utt_per_min']:.2f} utt/min, latency p50 {s['p50_s']:.2f} s p95 {s['p95_s']:.2f} s, first audio p50 "
        f"{s['ttfa_p50_s']:.2f} s p95 {s['ttfa_p95_s']:.2f} s (server header p50 {s['header_ttfa_p50_s']:.2f} s), "
        f"largest gap {s['max_gap_s']:.2f} s, playback stall p50 {s['stall_p50_s']:.2f} s, client wait p50 "
        f"{s['client_wait_p50_s']:.2f} s, {s['audio_s']:.1f} s of audio (shortest answer {s['audio_min_s']:.2f} s)")
    log(f"[{s['mode']} x{s['concurrency']}] server batches: {batch_stats(s['batches'])}")


def batch_stats(lines: list[str]) -> str:
    """The server's rounds during a load (``--log-rounds`` lines): how full they were, tokens/s, and the
    shares of the first stage and of streaming within chunks."""
    import re

    rows = [tuple(float(x) for x in m.groups()) for m in
            (re.search(r"batch: (\d+) chunks of (\d+) requests \(\d+ started\), (\d+) tokens, ([0-9.]+) s "
                       r"\(stage 1 ([0-9.]+) s, streaming ([0-9.]+) s\)", line)
             for line in lines) if m]
    if not rows:
        return "no round lines"
    a = np.array(rows)
    total = a[:, 3].sum()
    return (f"{len(a)} rounds, mean {a[:, 0].mean():.2f} chunks, {a[:, 2].sum() / total:.1f} tokens/s overall, "
            f"{a[:, 3].mean():.2f} s per round; stage 1 {a[:, 4].sum() / total:.0%}, streaming "
            f"{a[:, 5].sum() / total:.0%} of the time")


def concurrencies(value: str) -> list[int]:
    try:
        out = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {value!r}") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError("concurrencies must be >= 1")
    return out


def verdicts(summaries: list[dict], top: int) -> list[str]:
    """The target lines: batched against single (issue 16) and streaming against whole answers
    (issue 29), each where the run has the modes and concurrencies it needs."""
    by = {(s["mode"], s["concurrency"]): s for s in summaries}
    lines = []
    b, one = by.get(("batched", top)), by.get(("single", top))
    if b and one and one["utt_per_min"] > 0:
        speedup = b["utt_per_min"] / one["utt_per_min"]
        p95_ratio = b["p95_s"] / one["p95_s"]
        verdict = speedup >= 2.0 and p95_ratio <= 1.5
        lines.append(f"serve-target concurrency={top} speedup={speedup:.2f} p95_ratio={p95_ratio:.2f} "
                     f"pass={'yes' if verdict else 'no'}" + ("" if top == 8 else " (the target is stated at 8)"))
    s1, w1 = by.get(("stream", 1)), by.get(("batched", 1))
    s_top, w_top = by.get(("stream", top)), by.get(("batched", top))
    if s1 and w1 and s_top and w_top and top > 1 and w_top["utt_per_min"] > 0:
        first = s1["ttfa_p50_s"] / w1["p50_s"]
        collapse = s_top["ttfa_p95_s"] / s1["ttfa_p50_s"]
        throughput = s_top["utt_per_min"] / w_top["utt_per_min"]
        verdict = first <= 0.15 and collapse <= 4.0 and throughput >= 0.9
        lines.append(f"serve-stream-target concurrency={top} ttfa_vs_whole_c1={first:.3f} "
                     f"ttfa_p95_vs_c1={collapse:.2f} throughput_vs_whole={throughput:.2f} "
                     f"pass={'yes' if verdict else 'no'}" + ("" if top == 8 else " (the target is stated at 8)"))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["medium", "demo"], default="medium")
    p.add_argument("--concurrency", type=concurrencies, default=[1, 8],
                   help="comma-separated client counts, each run in turn (default 1,8)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests at the highest concurrency (default 16; --quick: 8); lower ones run a share")
    p.add_argument("--rate", type=float, default=None, help="arrivals per second (default 0.5; --quick: 1)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per load (default 1800; --quick 900)")
    p.add_argument("--max-batch", type=int, default=8, help="the engine server's --max-batch")
    p.add_argument("--modes", default="batched,stream",
                   help="comma-separated: batched (whole answers from the engine), stream (the same server, "
                   "answers streamed as they are made), static (--batching static), single (--max-batch 1)")
    p.add_argument("--engine-steps", type=int, default=8,
                   help="the server's --engine-steps (default 8, the server's own: a request waits for the call "
                   "in progress before it is admitted, so shorter calls give streams their first audio sooner; "
                   "runs before 2026-12-07 used 16)")
    p.add_argument("--decoder", choices=["encodec", "mbd"], default="encodec")
    p.add_argument("--enhance", action="store_true", help="DeepFilterNet3 on (default: --no-enhance)")
    p.add_argument("--max-new-tokens", type=int, default=1600,
                   help="the server's first-stage cap per chunk (default 1600: 10.7 s of audio)")
    p.add_argument("--stop", type=int, default=DEFAULT_STOP,
                   help="random model: first-stage position around which end of audio takes over "
                   f"(default {DEFAULT_STOP}: answers of about 5-10 s)")
    p.add_argument("--no-rehearse", dest="rehearse", action="store_false",
                   help="skip the untimed pass of the workload after the warmup")
    p.add_argument("--seed", type=int, default=0, help="texts, arrivals and request seeds")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--log-dir", type=Path, default=None, help="server logs here (must not exist; default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="fewer requests and a shorter limit")
    args = p.parse_args(argv)
    args.requests = args.requests or (8 if args.quick else 16)
    args.rate = args.rate if args.rate is not None else (1.0 if args.quick else 0.5)
    args.time_limit = args.time_limit or (900.0 if args.quick else 1800.0)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in SERVER_OF for m in modes) or not modes:
        p.error(f"--modes takes {', '.join(SERVER_OF)}")
    if args.requests < 1 or args.max_batch < 1 or args.rate < 0:
        p.error("--requests and --max-batch must be >= 1, --rate >= 0")
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
        for kind in dict.fromkeys(SERVER_OF[m] for m in modes):
            voices = Path(tmp) / f"voices-{kind}"
            voices.mkdir()
            write_voice(voices)
            summaries += run_server(kind, [m for m in modes if SERVER_OF[m] == kind], args, model, voices, logs, jobs)
    print(f"# machine: {os.cpu_count()} CPUs; config={args.config} stop={args.stop} requests={args.requests} "
          f"rate={args.rate}/s time_limit={args.time_limit:.0f}s max_batch={args.max_batch} decoder={args.decoder}")
    for s in summaries:
        print(result_line(s), flush=True)
    for line in verdicts(summaries, max(args.concurrency)):
        print(line, flush=True)
    return 0 if all(s["completed"] for s in summaries) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
