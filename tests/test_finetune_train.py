"""The fine-tuning core: what trains, LoRA, the loss, the optimiser, accumulation, devices, cost."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvjax.io.checkpoint import load_gpt_stage
from mvjax.nn.gpt import forward as gpt_forward
from mvjax.train.model import (
    TrainSpec,
    TrainSpecError,
    forward,
    loss_weights,
    merge_params,
    segments,
    split_params,
)
from mvjax.train.optim import OptimConfig, OptimError, decay_mask, learning_rate_schedule
from mvjax.train.trainer import Trainer
from tests.conftest import REPO


@pytest.fixture(scope="module")
def stage1(converted):
    return load_gpt_stage(converted, "first_stage")


@pytest.fixture(scope="module")
def cases(fixtures):
    with np.load(fixtures / "finetune" / "finetune_cases.npz") as data:
        return {k: data[k] for k in data.files}


def test_segments_split_the_stack_by_kind(stage1):
    cfg, _, _ = stage1
    segs = segments(cfg, TrainSpec(last_n_blocks=1))
    assert [(s.kind, s.start, s.end) for s in segs] == [("frozen", 0, cfg.n_layer - 1), ("full", cfg.n_layer - 1, cfg.n_layer)]
    segs = segments(cfg, TrainSpec(last_n_blocks=0, lora_rank=4))
    assert [(s.kind, s.start, s.end) for s in segs] == [("lora", 0, cfg.n_layer)]
    segs = segments(cfg, TrainSpec(last_n_blocks=1, lora_rank=4, lora_blocks=(0,)))
    assert [s.kind for s in segs] == ["lora", "full"]


@pytest.mark.parametrize("spec, message", [
    (TrainSpec(last_n_blocks=0), "nothing to train"),
    (TrainSpec(last_n_blocks=99), "last_n_blocks"),
    (TrainSpec(last_n_blocks=0, lora_rank=2, lora_targets=("ffn",)), "unknown LoRA target"),
    (TrainSpec(last_n_blocks=1, lora_rank=2, lora_blocks=(1,)), "both train in full"),
    (TrainSpec(loss_mask="text"), "loss_mask"),
])
def test_bad_specs_are_refused(stage1, spec, message):
    cfg, params, _ = stage1
    with pytest.raises(TrainSpecError, match=message):
        split_params(cfg, spec, params)


def test_split_then_merge_gives_the_model_back(stage1):
    cfg, params, _ = stage1
    spec = TrainSpec(last_n_blocks=1)
    frozen, trainable = split_params(cfg, spec, params)
    merged = merge_params(cfg, spec, frozen, trainable)
    flat_a = jax.tree_util.tree_leaves_with_path(params)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(merged))
    assert len(flat_a) == len(flat_b)
    for path, leaf in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_b[path]), np.asarray(leaf))


def test_training_forward_equals_the_inference_forward(stage1, cases):
    cfg, params, _ = stage1
    spec = TrainSpec(last_n_blocks=1, dropout=0.0)
    frozen, trainable = split_params(cfg, spec, params)
    rows = cases["tokens"][:2, :, :-1]
    ours = forward(cfg, spec, frozen, trainable, rows, cases["spk"][:2], jax.random.PRNGKey(0))[0]
    ref = gpt_forward(cfg, params, rows, cases["spk"][:2])[0]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-5)


def test_lora_merged_into_the_weights_equals_the_unmerged_forward(stage1, cases):
    cfg, params, _ = stage1
    spec = TrainSpec(last_n_blocks=0, lora_rank=4, lora_alpha=8.0, dropout=0.0)
    frozen, trainable = split_params(cfg, spec, params, jax.random.PRNGKey(3))
    # Adapters start as the identity (b = 0); give them real values so the merge is exercised.
    key = jax.random.PRNGKey(7)
    leaves, tree = jax.tree_util.tree_flatten(trainable["lora"])
    keys = jax.random.split(key, len(leaves))
    trainable["lora"] = jax.tree_util.tree_unflatten(
        tree, [0.05 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])
    rows, spk = cases["tokens"][:2, :, :-1], cases["spk"][:2]
    unmerged = np.asarray(forward(cfg, spec, frozen, trainable, rows, spk, jax.random.PRNGKey(0))[0])
    merged = np.asarray(gpt_forward(cfg, merge_params(cfg, spec, frozen, trainable), rows, spk)[0])
    base = np.asarray(gpt_forward(cfg, params, rows, spk)[0])
    assert np.abs(unmerged - base).max() > 1e-2  # the adapters change the function...
    # ...and folding them into the weights changes only float32 rounding (sums of ~64-256 terms).
    np.testing.assert_allclose(merged, unmerged, rtol=0, atol=2e-5 * max(1.0, np.abs(base).max()))


def test_lora_trains_only_the_adapters(stage1, cases):
    cfg, params, tok = stage1
    spec = TrainSpec(last_n_blocks=0, lora_rank=2, lora_targets=("attn",), dropout=0.0)
    trainer = Trainer(cfg, params, spec, OptimConfig(learning_rate=1e-2, total_steps=2), tok.offset - 1)
    state = trainer.init_state(0)
    assert set(state["trainable"]) == {"lora"}
    before = trainer.evaluate(state["trainable"], cases["tokens"][:2], cases["spk"][:2], 2)
    for _ in range(2):
        state, metrics = trainer.step(state, cases["tokens"][:2], cases["spk"][:2])
    after = trainer.evaluate(state["trainable"], cases["tokens"][:2], cases["spk"][:2], 2)
    assert after < before


def test_audio_loss_mask_counts_audio_and_the_first_end_of_audio():
    pad = 10
    targets = jnp.array([[[20, 21, 1, 2, 3, pad, pad, pad]]])  # text, text, audio x3, end of audio, padding
    w = np.asarray(loss_weights(targets, pad, "audio"))
    assert w.tolist() == [[[0, 0, 1, 1, 1, 1, 0, 0]]]
    assert np.asarray(loss_weights(targets, pad, "all")).sum() == 8


def test_schedule_is_finite_from_step_zero():
    cosine = learning_rate_schedule(OptimConfig(learning_rate=1e-3, min_lr=1e-4, schedule="cosine",
                                                warmup_steps=4, total_steps=20))
    lrs = np.array([float(cosine(s)) for s in range(25)])
    assert np.all(np.isfinite(lrs)) and lrs[0] > 0
    np.testing.assert_allclose(lrs[:4], 1e-3 * np.arange(1, 5) / 4, rtol=1e-6)
    np.testing.assert_allclose(lrs[19:], 1e-4, rtol=1e-5)
    assert np.all(np.diff(lrs[4:20]) <= 1e-12)
    # The reference's defaults (no warmup, no decay steps) divide by zero at step 0; ours do not.
    flat = learning_rate_schedule(OptimConfig(learning_rate=3e-5, schedule="cosine", min_lr=3e-6, total_steps=1))
    assert np.isfinite(float(flat(0)))
    with pytest.raises(OptimError):
        OptimConfig(learning_rate=0.0)


def test_weight_decay_only_on_matrices(stage1):
    cfg, params, _ = stage1
    _, trainable = split_params(cfg, TrainSpec(last_n_blocks=1), params)
    mask = decay_mask(trainable)
    assert mask["ln_f"]["scale"] is False
    assert mask["blocks"]["ln_1"]["scale"] is False  # (layers, width) stacked, 1-D per layer
    assert mask["blocks"]["attn"]["c_attn"]["kernel"] is True


def test_gradient_accumulation_equals_the_whole_batch(stage1, cases):
    cfg, params, tok = stage1
    spec = TrainSpec(last_n_blocks=1, dropout=0.0)
    optim = OptimConfig(learning_rate=1e-3, total_steps=1)
    rows, spk = cases["tokens"][:2], cases["spk"][:2]
    whole = Trainer(cfg, params, spec, optim, tok.offset - 1)
    s1, m1 = whole.step(whole.init_state(0), rows, spk)
    split = Trainer(cfg, params, spec, optim, tok.offset - 1)
    s2, m2 = split.step(split.init_state(0), rows.reshape(2, 1, *rows.shape[1:]), spk.reshape(2, 1, -1))
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-5 * float(m1["loss"])
    assert abs(float(m1["grad_norm"]) - float(m2["grad_norm"])) <= 1e-5 * float(m1["grad_norm"])
    # Adam normalises each element by its own gradient magnitude: where that gradient is near zero, a
    # rounding-level change in it moves the element by a visible part of the learning rate (as in parity).
    for a, b in zip(jax.tree_util.tree_leaves(s1["trainable"]), jax.tree_util.tree_leaves(s2["trainable"])):
        err = np.abs(np.asarray(a) - np.asarray(b))
        assert np.quantile(err, 0.999) <= 1e-6 and err.max() <= 1e-4


def test_dropout_draws_per_step_and_evaluation_is_deterministic(stage1, cases):
    cfg, params, tok = stage1
    trainer = Trainer(cfg, params, TrainSpec(last_n_blocks=1, dropout=0.1), OptimConfig(total_steps=2), tok.offset - 1)
    rows, spk = cases["tokens"][:2], cases["spk"][:2]
    state = trainer.init_state(0)
    e1 = trainer.evaluate(state["trainable"], rows, spk, 2)
    e2 = trainer.evaluate(state["trainable"], rows, spk, 2)
    assert e1 == e2
    nodrop = Trainer(cfg, params, TrainSpec(last_n_blocks=1, dropout=0.0), OptimConfig(total_steps=2), tok.offset - 1)
    _, m_drop = trainer.step(trainer.init_state(0), rows, spk)
    _, m_plain = nodrop.step(nodrop.init_state(0), rows, spk)
    assert float(m_drop["loss"]) != float(m_plain["loss"])


def test_bfloat16_compute_stays_close_to_float32(stage1, cases):
    cfg, params, tok = stage1
    rows, spk = cases["tokens"][:2], cases["spk"][:2]
    losses = {}
    for dtype in ("float32", "bfloat16"):
        trainer = Trainer(cfg, params, TrainSpec(last_n_blocks=1, dropout=0.0, compute_dtype=dtype),
                          OptimConfig(total_steps=1), tok.offset - 1)
        losses[dtype] = trainer.evaluate(trainer.init_state(0)["trainable"], rows, spk, 2)
    # bf16 keeps 8 mantissa bits: relative rounding 2^-8 per product, averaged over the sums.
    assert abs(losses["bfloat16"] - losses["float32"]) <= 2e-2 * losses["float32"]


def test_a_tiny_overfit_run_lowers_the_validation_loss(stage1, cases):
    cfg, params, tok = stage1
    rows, spk = cases["tokens"][:2], cases["spk"][:2]
    trainer = Trainer(cfg, params, TrainSpec(last_n_blocks=1, dropout=0.0),
                      OptimConfig(learning_rate=3e-3, total_steps=30), tok.offset - 1)
    state = trainer.init_state(0)
    before = trainer.evaluate(state["trainable"], rows, spk, 2)
    for _ in range(30):
        state, _ = trainer.step(state, rows, spk)
    after = trainer.evaluate(state["trainable"], rows, spk, 2)
    assert after < 0.6 * before, (before, after)


def _matmul_flops(jaxpr, times: int = 1) -> float:
    """2 * M * N * K of every dot_general in a jaxpr, loops counted as many times as they run."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            k = int(np.prod([lhs[d] for d in contract]))
            total += times * 2.0 * np.prod(eqn.outvars[0].aval.shape) * k
            del rhs
        for name, value in eqn.params.items():
            subs = value if isinstance(value, (list, tuple)) else [value]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    reps = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
                    total += _matmul_flops(inner, times * reps)
    return total


def test_frozen_layers_build_no_backward_pass(stage1, cases):
    """Counted from the step's own program: training the last block costs one forward pass plus the last
    block's and the head's backward, far below the ~3 forward passes of training every block."""
    cfg, params, tok = stage1
    rows, spk = jnp.asarray(cases["tokens"][:2], jnp.int32), jnp.asarray(cases["spk"][:2])

    def step_flops(spec):
        trainer = Trainer(cfg, params, spec, OptimConfig(total_steps=1), tok.offset - 1)
        state = trainer.init_state(0)
        return _matmul_flops(jax.make_jaxpr(trainer._step_impl)(state, trainer.frozen, rows[None], spk[None]).jaxpr)

    fwd = _matmul_flops(jax.make_jaxpr(lambda r, p: gpt_forward(cfg, params, r[..., :-1], p))(rows, spk).jaxpr)
    head = 2.0 * rows.shape[0] * (rows.shape[-1] - 1) * cfg.n_embd * cfg.vocab_sizes[0]
    block = (fwd - head) / cfg.n_layer
    last = step_flops(TrainSpec(last_n_blocks=1, dropout=0.0, remat=False))
    every = step_flops(TrainSpec(last_n_blocks=cfg.n_layer, dropout=0.0, remat=False))
    # Backward of a trained block: activation and weight gradients, 2x its forward. The tied head (frozen
    # table) needs only the activation gradient, 1x.
    assert last == pytest.approx(fwd + 2 * block + head, rel=0.02)
    assert every == pytest.approx(fwd + 2 * block * cfg.n_layer + head, rel=0.02)


def test_data_parallel_step_equals_one_device(converted, cases, tmp_path):
    script = textwrap.dedent(f"""
        import json, sys, numpy as np, jax
        from mvjax.io.checkpoint import load_gpt_stage
        from mvjax.core.parallel import local_mesh
        from mvjax.train.model import TrainSpec
        from mvjax.train.optim import OptimConfig
        from mvjax.train.trainer import Trainer
        cfg, params, tok = load_gpt_stage({str(converted)!r}, "first_stage")
        data = np.load({str(tmp_path / "rows.npz")!r})
        mesh = local_mesh() if len(sys.argv) > 1 else None
        t = Trainer(cfg, params, TrainSpec(last_n_blocks=1, dropout=0.0), OptimConfig(learning_rate=1e-3), tok.offset - 1, mesh=mesh)
        s = t.init_state(0)
        out = []
        for _ in range(2):
            s, m = t.step(s, data["rows"], data["spk"])
            out.append([float(m["loss"]), float(m["grad_norm"])])
        leaf = np.asarray(jax.tree_util.tree_leaves(s["trainable"])[0]).ravel()[:64].tolist()
        print(json.dumps({{"devices": jax.device_count(), "metrics": out, "leaf": leaf}}))
    """)
    np.savez(tmp_path / "rows.npz", rows=cases["tokens"][:4], spk=cases["spk"][:4])
    (tmp_path / "dp.py").write_text(script)
    results = []
    for flags, extra in (("", []), ("--xla_force_host_platform_device_count=2", ["mesh"])):
        env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(REPO)}
        res = subprocess.run([sys.executable, str(tmp_path / "dp.py"), *extra], capture_output=True, text=True,
                             env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    one, two = results
    assert one["devices"] == 1 and two["devices"] == 2
    np.testing.assert_allclose(two["metrics"], one["metrics"], rtol=1e-5)
    np.testing.assert_allclose(two["leaf"], one["leaf"], rtol=0, atol=1e-6)


def test_frozen_weights_are_arguments_of_the_step_not_constants(stage1, cases):
    """Closed over, the frozen weights would be compiled into the executable as constants: a second
    copy of the model in memory and slow compiles."""
    import re

    cfg, params, tok = stage1
    trainer = Trainer(cfg, params, TrainSpec(last_n_blocks=1, dropout=0.0), OptimConfig(), tok.offset - 1)
    state = trainer.init_state(0)
    rows = np.asarray(cases["tokens"][:2], np.int32)[None]
    compiled = trainer._step.lower(state, trainer.frozen, rows, cases["spk"][:2][None]).compile()
    frozen_bytes = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(trainer.frozen))
    assert compiled.memory_analysis().argument_size_in_bytes >= frozen_bytes
    constants = [int(np.prod([int(d) for d in dims.split(",") if d]))
                 for dims in re.findall(r"f32\[([\d,]+)\]\{[^}]*\} constant", compiled.as_text())]
    assert max(constants, default=0) < 4096


def test_causal_attention_in_blocks_equals_the_masked_attention():
    from mvjax.nn.gpt import attention, causal_attention_blocks

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 600, 4, 16)), jnp.float32) for _ in range(3))
    mask = jnp.tril(jnp.ones((600, 600), bool))[None, None]
    full = np.asarray(attention(q, k, v, mask))
    blocked = np.asarray(causal_attention_blocks(q, k, v, 256))  # 256 + 256 + 88 rows
    np.testing.assert_allclose(blocked, full, rtol=0, atol=1e-6)


def test_training_forward_at_long_windows_equals_the_inference_forward():
    from mvjax.nn.config import GPTConfig
    from mvjax.nn.gpt import init_params

    cfg = GPTConfig(block_size=1024, vocab_sizes=(300,), target_vocab_sizes=None, n_layer=2, n_head=2, n_embd=32,
                    norm_type="rmsnorm", rmsnorm_eps=1e-5, nonlinearity_type="swiglu", swiglu_multiple_of=32,
                    speaker_emb_dim=8)
    params = jax.tree_util.tree_map(np.asarray, init_params(cfg, jax.random.PRNGKey(1)))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 300, (1, 1, 1024)).astype(np.int32)
    spk = rng.standard_normal((1, 8)).astype(np.float32)
    spec = TrainSpec(last_n_blocks=1, dropout=0.0)
    frozen, trainable = split_params(cfg, spec, params)
    ours = np.asarray(forward(cfg, spec, frozen, trainable, tokens, spk, jax.random.PRNGKey(0))[0])
    ref = np.asarray(gpt_forward(cfg, params, tokens, spk)[0])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_dropout_masks_are_bernoulli_and_fresh_per_key():
    from mvjax.nn.gpt import dropout

    x = jnp.ones((1000, 1000), jnp.float32)
    a = np.asarray(dropout(x, 0.1, jax.random.PRNGKey(0)))
    b = np.asarray(dropout(x, 0.1, jax.random.PRNGKey(1)))
    kept = a != 0
    # 1e6 Bernoulli(0.9) draws: standard deviation of the kept fraction 3e-4; allow 5 of them.
    assert abs(kept.mean() - 0.9) < 1.5e-3
    np.testing.assert_allclose(a[kept], 1 / 0.9, rtol=1e-6)  # inverted dropout keeps the expectation
    assert abs(a.mean() - 1.0) < 2e-3
    assert 0.80 < np.mean(kept == (b != 0)) < 0.84  # independent masks agree on 0.9^2 + 0.1^2 = 0.82
    # Neighbours (the hash's consecutive counters) are uncorrelated.
    k = kept.astype(np.float64).ravel()
    assert abs(np.corrcoef(k[:-1], k[1:])[0, 1]) < 5e-3
    assert np.array_equal(a, np.asarray(dropout(x, 0.1, jax.random.PRNGKey(0))))
