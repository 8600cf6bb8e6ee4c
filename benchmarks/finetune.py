"""First-stage fine-tuning: step time, tokens/s and peak memory, ours against the reference's step.

    python -m benchmarks.finetune --config released --batch 1 2 [--ctx 2048] [--steps 3] \
        [--modes last-block,lora] [--sides ours,reference,reference-compiled] [--reference-src PATH]
    python -m benchmarks.finetune --quick          # medium model, 256-token window, a few minutes

Configs (random weights in the released first-stage layout, float32):
  tiny      the fixture's size: 2 layers x 64, 4 heads, block 256
  medium    12 layers x 1024, 16 heads, block 2048 (159M parameters)
  released  the released 1.2B shape: 24 layers x 2048, 16 heads, block 2048, vocab 2562,
            RMSNorm (eps 1e-5), SwiGLU (multiple of 256)

Modes: ``last-block`` trains the top transformer block and the final norm (the reference
recipe's default, ``last_n_blocks_to_finetune = 1``); ``lora`` trains rank ``--lora-rank``
adapters on every block's attention and MLP matrices (ours only: the reference has no LoRA, so
its lines say ``tokens_per_s=nan reason=no-lora-in-reference``).

Sides, each in its own fresh subprocess (so a side's memory is its own):
  ours                ``mvjax.train.trainer.Trainer``: dropout 0.1, AdamW (lr 3e-5, betas 0.9/0.95,
                      weight decay 0.1 on matrices), global-norm clip 1.0, one jitted step.
  reference           the reference recipe's step (``fam/llm/finetune.py``), eager, float32 on the
                      CPU as it runs there (no autocast): its ``GPT`` with dropout 0.1 in train mode,
                      ``configure_optimizers(0.1, 3e-5, (0.9, 0.95), "cpu")`` before freezing all but
                      ``transformer.h[-N:]`` and ``transformer.ln_f`` (the recipe's order), then per
                      step ``model(X, Y, speaker_embs=SE)``, ``loss.backward()``,
                      ``clip_grad_norm_(model.parameters(), 1.0)``, ``optimizer.step()``,
                      ``optimizer.zero_grad(set_to_none=True)``.
  reference-compiled  the same, with ``torch.compile(model)`` as the recipe sets it up (its default
                      ``compile = True``; einops ops allowed in the graph first).

Both sides build the same released-layout state dict from ``--seed``
(``convert_weights.random_checkpoints``), ours converted in memory with our converter, and
train on the same rows: a short random text prefix (first-stage tokenizer ids, end of text
last), then random interleaved audio codes (ids < 2048), then the pad / end-of-audio id 2048
up to ``ctx + 1`` tokens, with unit-norm random speaker embeddings.

Timing: one first step (jit / torch.compile compilation included; ``first_call_s``), then
``--steps`` timed steps; ``step_s`` is their median and ``tokens_per_s = batch * ctx / step_s``.
Compilation is cold on both sides: the compiled reference gets an empty inductor cache of its
own unless ``TORCHINDUCTOR_CACHE_DIR`` is set, ours no persistent XLA cache unless
``JAX_COMPILATION_CACHE_DIR`` is (``compile_cache=cold|env``; ``none``: the eager reference).
Memory: after setup (weights built, converted, loaded; the numpy checkpoint freed) the process's
peak resident set is reset (``/proc/self/clear_refs``); ``peak_gb`` is VmHWM over every training
step (the first included), ``steady_peak_gb`` over the timed steps only, ``setup_rss_gb`` the
resident set the steps started from. torch.compile's inductor builds its kernels in worker
processes, whose memory is not counted.

Every (batch, mode, side) ends with one machine-readable line on stdout (progress on stderr):

  finetune config=<c> mode=<last-block|lora> side=<ours|reference|reference-compiled>
           tokens_per_s=<x> peak_gb=<y> step_s=<s> batch=<b> ctx=<t> steps=<n> first_call_s=<f>
           steady_peak_gb=<p> setup_rss_gb=<r> setup_s=<s> trainable=<params> loss=<first loss>
           compile_cache=<cold|env|none> steps_s=<each timed step>

(a side that could not run prints ``tokens_per_s=nan peak_gb=nan ... reason=<why>``), and then,
per batch and mode, ``finetune-ratio config=<c> mode=<m> batch=<b> vs=<side> speed=<ours / side
tokens/s> memory=<ours / side peak>``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import FIRST_STAGE_SHAPES, FIRST_STAGE_VOCAB, proc_status

SPEAKER_DIM = 256
CODEBOOK = 1024
PAD = 2 * CODEBOOK  # end of audio, also the padding id
TEXT_OFFSET = PAD + 1  # 2049: the first-stage tokenizer's offset
VOCAB = FIRST_STAGE_VOCAB
END_OF_TEXT = VOCAB - 1  # offset + 512 merges: the released tokenizer's end-of-text id
SHAPES = FIRST_STAGE_SHAPES
MODES = ("last-block", "lora")
SIDES = ("ours", "reference", "reference-compiled")
# The reference recipe's defaults (fam/llm/config/finetune_params.py).
LEARNING_RATE, WEIGHT_DECAY, BETAS, GRAD_CLIP, DROPOUT, LAST_N_BLOCKS = 3e-5, 0.1, (0.9, 0.95), 1.0, 0.1, 1


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- Inputs, identical on both sides -------------------------------------------------------


def build_checkpoint(config: str, seed: int) -> dict:
    """A released-layout first-stage checkpoint (numpy arrays) with random weights."""
    from convert_weights import random_checkpoints as rc

    args = rc.model_args(vocab_sizes=[VOCAB], **SHAPES[config])
    ranks = rc.train_bpe(rc.TRAINING_TEXT)
    return rc.gpt_checkpoint(rc.component_rng(seed, 1), args, rc.FIRST_STAGE_TEXT_OFFSET, ranks, {"causal": True}, "")


def make_rows(batch: int, ctx: int, seed: int):
    """(rows (B, 1, ctx + 1) int32, speaker embeddings (B, 256) float32), shaped like real rows:
    text ids, end of text, interleaved codes of two codebooks filling 60-90% of the window, padding."""
    import numpy as np

    rng = np.random.default_rng([seed, 2])
    rows = np.full((batch, 1, ctx + 1), PAD, np.int32)
    text_len = max(2, min(32, ctx // 8))
    for b in range(batch):
        text = np.append(rng.integers(TEXT_OFFSET, END_OF_TEXT, text_len - 1), END_OF_TEXT)
        frames = max(1, int(rng.uniform(0.6, 0.9) * (ctx + 1 - text_len)) // 2)
        codes = np.stack([rng.integers(0, CODEBOOK, frames), CODEBOOK + rng.integers(0, CODEBOOK, frames)], axis=1)
        row = np.concatenate([text, codes.reshape(-1)])[: ctx + 1]
        rows[b, 0, : row.size] = row
    spk = rng.standard_normal((batch, SPEAKER_DIM)).astype(np.float32)
    spk /= np.linalg.norm(spk, axis=1, keepdims=True)
    return rows, spk


# --- The two training steps ----------------------------------------------------------------


def setup_ours(job: dict):
    """(step() -> loss, trainable parameter count) for our Trainer on the job's weights and rows."""
    import jax
    import numpy as np

    from convert_weights.gpt import convert_gpt_checkpoint
    from mvjax.train.model import TrainSpec
    from mvjax.train.optim import OptimConfig
    from mvjax.train.trainer import Trainer

    config, params, _ = convert_gpt_checkpoint(build_checkpoint(job["config"], job["seed"]))
    gc.collect()
    if job["mode"] == "last-block":
        spec = TrainSpec(last_n_blocks=LAST_N_BLOCKS, dropout=DROPOUT)
    else:
        spec = TrainSpec(last_n_blocks=0, lora_rank=job["lora_rank"], lora_targets=("attn", "mlp"), dropout=DROPOUT)
    optim = OptimConfig(learning_rate=LEARNING_RATE, betas=BETAS, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP,
                        total_steps=job["steps"] + 1)
    trainer = Trainer(config, params, spec, optim, PAD)
    del params
    gc.collect()
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(trainer.initial_trainable))
    rows, spk = make_rows(job["batch"], job["ctx"], job["seed"])
    holder = {"state": trainer.init_state(job["seed"])}

    def step() -> float:
        holder["state"], metrics = trainer.step(holder["state"], rows, spk)
        return float(metrics["loss"])  # waits for the step

    return step, trainable


def import_reference_gpt(src: Path):
    """The reference's ``GPT`` and ``GPTConfig`` from a metavoice-src checkout (its ``fam`` package)."""
    sys.path.insert(0, str(src))
    from fam.llm.model import GPT, GPTConfig

    return GPT, GPTConfig


def setup_reference(job: dict):
    """(step() -> loss, trainable parameter count): the reference recipe's training step, in the
    order its ``main`` sets it up (load, optimiser, compile, freeze)."""
    import contextlib
    import itertools

    import numpy as np
    import torch

    GPT, GPTConfig = import_reference_gpt(Path(job["reference_src"]))
    torch.manual_seed(1337)  # the recipe's seed
    with contextlib.redirect_stdout(sys.stderr):  # the reference prints while it builds
        ckpt = build_checkpoint(job["config"], job["seed"])
        args = dict(ckpt["model_args"], dropout=DROPOUT)
        fields = GPTConfig.__dataclass_fields__
        model = GPT(GPTConfig(**{k: v for k, v in args.items() if k in fields}), speaker_emb_dim=SPEAKER_DIM)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in ckpt["model"].items()})
        del ckpt
        gc.collect()
        model.to("cpu")
        optimizer = model.configure_optimizers(WEIGHT_DECAY, LEARNING_RATE, BETAS, "cpu")
        if job["side"] == "reference-compiled":
            try:
                from einops._torch_specific import allow_ops_in_compiled_graph

                allow_ops_in_compiled_graph()
            except ImportError:
                pass
            model = torch.compile(model)
        for p in model.parameters():
            p.requires_grad = False
        for p in itertools.chain(model.transformer.ln_f.parameters(),
                                 model.transformer.h[-LAST_N_BLOCKS:].parameters()):
            p.requires_grad = True
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows, spk = make_rows(job["batch"], job["ctx"], job["seed"])
    tokens = torch.from_numpy(rows.astype(np.int64))
    X, Y, SE = tokens[:, :, :-1], tokens[:, :, 1:], torch.from_numpy(spk)
    held = {}  # the recipe keeps the last step's logits and loss until the next forward returns

    def step() -> float:
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE  # constant: the recipe's decay_lr = False
        logits, loss = model(X, Y, speaker_embs=SE, speaker_emb_mask=None)
        held["out"] = (logits, loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.item())

    return step, trainable


# --- One side in one process ---------------------------------------------------------------


def _gb(n_bytes: float) -> float:
    return n_bytes / 2**30


def reset_peak_rss() -> None:
    """Make VmHWM restart from the current resident set (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_worker(job: dict) -> dict:
    name = f"[{job['side']} {job['mode']} batch={job['batch']}]"
    start = time.perf_counter()
    step, trainable = (setup_ours if job["side"] == "ours" else setup_reference)(job)
    gc.collect()
    setup_s = time.perf_counter() - start
    setup_rss = proc_status()["VmRSS"]
    log(f"  {name} setup {setup_s:.1f} s, {trainable:,} trainable parameters, resident {_gb(setup_rss):.2f} GB")
    reset_peak_rss()
    t = time.perf_counter()
    loss = step()
    first_s = time.perf_counter() - t
    first_peak = proc_status()["VmHWM"]
    log(f"  {name} first step (compilation included) {first_s:.2f} s, loss {loss:.4f}, peak {_gb(first_peak):.2f} GB")
    reset_peak_rss()
    times = []
    for i in range(job["steps"]):
        t = time.perf_counter()
        last = step()
        times.append(time.perf_counter() - t)
        log(f"  {name} step {i + 1}/{job['steps']}: {times[-1]:.2f} s, loss {last:.4f}")
    steady_peak = proc_status()["VmHWM"]
    step_s = statistics.median(times)
    return {
        "tokens_per_s": job["batch"] * job["ctx"] / step_s, "peak_gb": _gb(max(first_peak, steady_peak)),
        "step_s": step_s, "first_call_s": first_s, "steady_peak_gb": _gb(steady_peak),
        "setup_rss_gb": _gb(setup_rss), "setup_s": setup_s, "trainable": trainable, "loss": loss,
        "steps_s": ",".join(f"{x:.3f}" for x in times),
    }


def result_line(job: dict, result: dict) -> str:
    head = (f"finetune config={job['config']} mode={job['mode']} side={job['side']} "
            f"tokens_per_s={result['tokens_per_s']:.3f} peak_gb={result['peak_gb']:.3f}")
    fields = {"batch": job["batch"], "ctx": job["ctx"], "steps": job["steps"]}
    if "reason" in result:
        fields["reason"] = result["reason"]
    else:
        fields = {"step_s": f"{result['step_s']:.3f}", **fields, "first_call_s": f"{result['first_call_s']:.3f}",
                  "steady_peak_gb": f"{result['steady_peak_gb']:.3f}", "setup_rss_gb": f"{result['setup_rss_gb']:.3f}",
                  "setup_s": f"{result['setup_s']:.1f}", "trainable": result["trainable"],
                  "loss": f"{result['loss']:.4f}", "compile_cache": result["compile_cache"],
                  "steps_s": result["steps_s"]}
    return head + "".join(f" {k}={v}" for k, v in fields.items())


def unavailable(job: dict, reason: str) -> dict:
    return {"tokens_per_s": math.nan, "peak_gb": math.nan, "reason": reason}


CACHE_VARS = {"ours": "JAX_COMPILATION_CACHE_DIR", "reference-compiled": "TORCHINDUCTOR_CACHE_DIR"}


def run_side(job: dict) -> dict:
    """Run one side in a fresh interpreter; its result, or a nan result saying why it has none.
    Compilation starts cold: the compiled reference gets an empty inductor cache of its own unless
    TORCHINDUCTOR_CACHE_DIR is set (ours keeps no persistent cache unless JAX_COMPILATION_CACHE_DIR is)."""
    env, scratch = dict(os.environ), None
    var = CACHE_VARS.get(job["side"])
    if job["side"] == "reference-compiled" and var not in env:
        scratch = tempfile.mkdtemp(prefix="mvjax-inductor-")
        env[var] = scratch
    cache = "none" if var is None else ("env" if var in os.environ else "cold")
    cmd = [sys.executable, "-m", "benchmarks.finetune", "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env,
                              cwd=Path(__file__).resolve().parents[1])
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    results = [line for line in proc.stdout.splitlines() if line.startswith("finetune-worker ")]
    if proc.returncode != 0 or not results:
        log(f"  [{job['side']} {job['mode']}] failed (exit status {proc.returncode})")
        return unavailable(job, f"worker-failed-rc{proc.returncode}")
    return {**json.loads(results[-1].removeprefix("finetune-worker ")), "compile_cache": cache}


# --- Command line ----------------------------------------------------------------------------


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma separated), got {text!r}")
        return items

    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=list(SHAPES), default=None, help="model shape (default released)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="rows per step (default 1)")
    parser.add_argument("--ctx", type=int, default=None, help="training window in tokens (default: the block size)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the first (default 3)")
    parser.add_argument("--modes", type=_csv(MODES), default=list(MODES))
    parser.add_argument("--sides", type=_csv(SIDES), default=list(SIDES))
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-src", type=Path, default=Path(os.environ.get("MVJAX_REFERENCE_SRC", "/tmp/mvsrc")),
                        help="metavoice-src checkout (its fam/ package) for the reference sides "
                             "(default $MVJAX_REFERENCE_SRC or /tmp/mvsrc)")
    parser.add_argument("--quick", action="store_true",
                        help="medium model, 256-token window, 2 timed steps (defaults only; flags still win)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        job = json.loads(args.worker)
        result = run_worker(job)
        print("finetune-worker " + json.dumps(result), flush=True)
        return 0

    config = args.config or ("medium" if args.quick else "released")
    ctx = args.ctx or (256 if args.quick else SHAPES[config]["block_size"])
    steps = args.steps if args.steps is not None else (2 if args.quick else 3)
    batches = args.batch or [1]
    if not 1 <= ctx <= SHAPES[config]["block_size"]:
        parser.error(f"--ctx must be in [1, {SHAPES[config]['block_size']}] for --config {config}")
    if steps < 1 or min(batches) < 1 or args.lora_rank < 1:
        parser.error("--steps, --batch and --lora-rank must be >= 1")
    wants_reference = any(s != "ours" for s in args.sides)
    if wants_reference and not (args.reference_src / "fam" / "llm" / "model.py").is_file():
        parser.error(f"no reference source at {args.reference_src} (its fam/llm/model.py); pass --reference-src "
                     "or leave the reference out of --sides")

    log(f"fine-tuning benchmark: config={config} ctx={ctx} batches={batches} steps={steps} (after 1 first step) "
        f"modes={','.join(args.modes)} sides={','.join(args.sides)}; each side in its own process")
    for batch in batches:
        for mode in args.modes:
            results = {}
            for side in args.sides:
                job = dict(config=config, mode=mode, side=side, batch=batch, ctx=ctx, steps=steps, seed=args.seed,
                           lora_rank=args.lora_rank, reference_src=str(args.reference_src))
                if side != "ours" and mode == "lora":
                    results[side] = unavailable(job, "no-lora-in-reference")
                else:
                    log(f"[{side}] mode={mode} batch={batch}")
                    results[side] = run_side(job)
                print(result_line(job, results[side]), flush=True)
            if "ours" in results:
                ours = results["ours"]
                for side, r in results.items():
                    if side != "ours" and not math.isnan(r["tokens_per_s"]):
                        print(f"finetune-ratio config={config} mode={mode} batch={batch} vs={side} "
                              f"speed={ours['tokens_per_s'] / r['tokens_per_s']:.3f} "
                              f"memory={ours['peak_gb'] / r['peak_gb']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
