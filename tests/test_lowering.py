"""python -m benchmarks.lowering: every jitted entry point lowers for cuda and tpu, reported in its format;
its checks of a lowered module; and the abstract-weights Trainer it lowers the fine-tuning step with."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from benchmarks.lowering import KERNEL_NAMES, Entry, Variant, lower_entry, pallas_kernel_names, unrunnable_calls
from tests.conftest import REPO

KINDS = ("float32", "bf16", "int8")
W_X_KV = tuple(f"w-{w}.kv-{k}" for w in KINDS for k in KINDS)
KV = tuple(f"kv-{k}" for k in KINDS)
# Every entry the tool documents, with its variants (written out here, not read from the tool, so an
# entry or variant the tool stops lowering fails this test).
DOCUMENTED = {
    "decode": W_X_KV, "engine_admit": W_X_KV, "engine_generate": W_X_KV, "engine_generate_window": W_X_KV,
    "engine_prefill_piece": W_X_KV, "engine_generate_paged": W_X_KV, "engine_move": KV, "engine_reserve": KV, "engine_free": KV,
    "quantize_rows": ("int8",), "int4_matmul": ("int4",), "second_stage": ("float32",), "encodec_decode": ("float32",),
    "encodec_encode": ("float32",), "encodec_stream_first": ("float32",), "encodec_stream_step": ("float32",),
    "encodec_stream_flush": ("float32",), "mbd": ("float32",), "speaker_encoder": ("float32",),
    "finetune_last_block": ("float32", "bf16"), "finetune_lora": ("float32", "bf16"),
    "finetune_eval": ("float32", "bf16"),
}
PLATFORMS = ("cuda", "tpu")
LINE = re.compile(r"^lower entry=(?P<entry>[a-z0-9_]+) platform=(?P<platform>[a-z]+) variant=(?P<variant>[a-z0-9.-]+) "
                  r"ok=(?P<ok>yes|no) pallas=(?P<pallas>none|mvjax_[a-z0-9_]+(?:,mvjax_[a-z0-9_]+)*)$")
DECODE_STEPS = ("decode", "engine_generate", "engine_generate_window", "engine_prefill_piece")


def test_every_entry_lowers_for_cuda_and_tpu():
    res = subprocess.run([sys.executable, "-m", "benchmarks.lowering", "--config", "tiny"],
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    lines = res.stdout.splitlines()
    results, reasons = {}, {}
    for i, line in enumerate(lines):
        if line.startswith("# "):
            assert i > 0 and " ok=no " in lines[i - 1], f"a reason line must follow an ok=no line: {line!r}"
            continue
        m = LINE.match(line)
        assert m, f"line not in the documented format: {line!r}"
        key = (m["entry"], m["platform"], m["variant"])
        assert key not in results, f"reported twice: {key}"
        results[key] = m
        assert m["pallas"] == "none" or set(m["pallas"].split(",")) <= set(KERNEL_NAMES), line
        if m["ok"] == "no":
            assert i + 1 < len(lines) and lines[i + 1].startswith("# ") and len(lines[i + 1]) > 2, \
                f"ok=no without its reason line: {line!r}"
            reasons[key] = lines[i + 1]
    expected_keys = {(e, p, v) for e, variants in DOCUMENTED.items() for v in variants for p in PLATFORMS}
    assert set(results) == expected_keys, (f"missing {sorted(expected_keys - set(results))}; "
                                           f"unexpected {sorted(set(results) - expected_keys)}")

    for (entry, platform, variant), m in sorted(results.items()):
        assert m["ok"] == "yes", f"{entry} {variant} does not lower for {platform}: {reasons.get((entry, platform, variant))}"
        kernels = set() if m["pallas"] == "none" else set(m["pallas"].split(","))
        # The accelerator path runs the Pallas kernels: every decode step attends through the ragged one, and
        # int8 weights multiply through the int8 one (the engine's admission prefills whole prompts: XLA
        # attention, int8 products only).
        weights = variant.split(".")[0] if variant.startswith("w-") else None
        want = set()
        if entry in DECODE_STEPS:
            want.add("mvjax_ragged_attention")
        if entry == "engine_generate_paged":
            want.add("mvjax_paged_attention")
        if weights == "w-int8" and entry in DECODE_STEPS + ("engine_admit", "engine_generate_paged"):
            want.add("mvjax_int8_matmul")
        if entry == "int4_matmul":
            want.add("mvjax_int4_matmul")
        assert kernels == want, f"{entry} {variant} on {platform}: Pallas kernels {sorted(kernels)}, want {sorted(want)}"
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"lowering config=tiny: 158 of 158 lowered ok in [0-9.]+ s", res.stderr), res.stderr[-2000:]


def test_int4_matmul_entry_lowers_to_the_int4_kernel():
    """The int4_matmul entry alone (the full run above takes minutes): at the tiny shapes it lowers for
    cuda and tpu to the Pallas int4 kernel and nothing unrunnable; selected by ``--entries`` and by
    ``--variants int4`` (a variant of kinds not listed is left out)."""
    from benchmarks.lowering import ENTRIES, Builder, build_models

    entry = next(e for e in ENTRIES if e.name == "int4_matmul")
    assert [v.name for v in entry.variants] == ["int4"]
    results = lower_entry(Builder(build_models("tiny")), entry, entry.variants[0], PLATFORMS)
    assert [(r.platform, r.ok, r.pallas, r.reason) for r in results] == [
        (p, True, ["mvjax_int4_matmul"], "") for p in PLATFORMS]
    res = subprocess.run([sys.executable, "-m", "benchmarks.lowering", "--entries", "int4_matmul,quantize_rows",
                          "--variants", "int4"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines() == [f"lower entry=int4_matmul platform={p} variant=int4 ok=yes "
                                       f"pallas=mvjax_int4_matmul" for p in PLATFORMS]


# --- The checks on a lowered module, against real lowerings of small programs ---------------------------


def _double(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2


def _lowered(fn, platform: str) -> str:
    return jax.jit(fn).trace(jax.ShapeDtypeStruct((16, 128), jnp.float32)).lower(
        lowering_platforms=(platform,)).as_text()


def _pallas(compiler_params=None):
    return lambda x: pl.pallas_call(_double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    name="mvjax_paged_attention", compiler_params=compiler_params)(x)


def _cpu_ffi(x):
    # Lowering does not look the target up: a CPU-only FFI call lowers for any platform, which is why
    # the tool must look for it in the lowered text.
    return jax.ffi.ffi_call("mvjax_int8_matmul", jax.ShapeDtypeStruct(x.shape, x.dtype))(x)


# pallas_call for Mosaic GPU is deprecated in favour of plgpu.kernel, but still how it lowers today.
MOSAIC_GPU_DEPRECATED = pytest.mark.filterwarnings("ignore:Using ``pl.pallas_call`` for Mosaic GPU:DeprecationWarning")


@pytest.mark.parametrize("platform,compiler_params", [
    pytest.param("tpu", None, id="tpu-mosaic"),
    pytest.param("cuda", None, id="cuda-mosaic-gpu", marks=MOSAIC_GPU_DEPRECATED),
    pytest.param("cuda", pallas_triton.CompilerParams(), id="cuda-triton"),
])
def test_pallas_kernels_are_named_and_runnable(platform, compiler_params):
    text = _lowered(_pallas(compiler_params), platform)
    assert pallas_kernel_names(text, platform) == ["mvjax_paged_attention"]
    assert unrunnable_calls(text, platform) == []


@pytest.mark.parametrize("platform", PLATFORMS)
@MOSAIC_GPU_DEPRECATED
def test_cpu_ffi_kernel_is_a_failure_not_a_pallas_kernel(platform):
    text = _lowered(lambda x: _cpu_ffi(x) + _pallas()(x), platform)
    assert pallas_kernel_names(text, platform) == ["mvjax_paged_attention"]
    reasons = unrunnable_calls(text, platform)
    assert len(reasons) == 1 and "@mvjax_int8_matmul is a CPU FFI kernel" in reasons[0]


def test_unknown_custom_call_is_a_failure():
    text = _lowered(lambda x: jax.ffi.ffi_call("some_cpu_library_call", jax.ShapeDtypeStruct(x.shape, x.dtype))(x),
                    "cuda")
    assert unrunnable_calls(text, "cuda") == ["custom call @some_cpu_library_call has no known cuda implementation"]


def test_host_callback_is_a_failure():
    """JAX refuses to lower a callback into this process for another platform; the tool says why."""
    fn = jax.jit(lambda x: jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1)
    entry = Entry("callback", (Variant(dtype="float32"),), lambda b, v: (fn, (np.zeros(4, np.float32),), {}))
    results = lower_entry(None, entry, entry.variants[0], PLATFORMS)
    assert [(r.platform, r.ok) for r in results] == [("cuda", False), ("tpu", False)]
    assert all("host callback" in r.reason for r in results), [r.reason for r in results]
    assert results[0].line().splitlines()[1].startswith("# lowering failed: a host callback")


# --- Trainer with abstract weights: the step the tool lowers is the one a concrete Trainer runs -----------


def test_abstract_trainer_lowers_the_concrete_step():
    """A Trainer built from ``jax.ShapeDtypeStruct`` leaves holds the shapes a concrete one holds, and its
    step lowers to the very program the concrete Trainer's step runs (the same module text), so what the
    tool lowers for the released shape is what fine-tuning runs. One spec covers every path of the split:
    a block trained in full, a LoRA segment, bf16 frozen weights."""
    from benchmarks.decode import make_config
    from mvjax.nn.gpt import abstract_params
    from mvjax.train.model import TrainSpec
    from mvjax.train.optim import OptimConfig
    from mvjax.train.trainer import Trainer, new_state

    config = make_config("tiny")
    spec = TrainSpec(last_n_blocks=1, lora_rank=4, lora_blocks=(0,), compute_dtype="bfloat16")
    shapes = abstract_params(config)
    concrete = Trainer(config, jax.tree_util.tree_map(lambda a: np.ones(a.shape, a.dtype), shapes), spec,
                       OptimConfig(), 2048)
    abstract = Trainer(config, shapes, spec, OptimConfig(), 2048)
    described = lambda tree: jax.tree_util.tree_map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)
    assert described(abstract.frozen) == described(concrete.frozen)
    assert described(abstract.initial_trainable) == described(concrete.initial_trainable)
    assert jnp.dtype(concrete.frozen["segments"]["0-0"]["attn"]["c_attn"]["kernel"].dtype) == jnp.bfloat16
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree_util.tree_leaves(abstract.frozen))

    rows = np.zeros((1, 2, 1, 33), np.int32)
    spk = np.zeros((1, 2, config.speaker_emb_dim), np.float32)
    state_shape = jax.eval_shape(lambda t: new_state(abstract.tx, t), abstract.initial_trainable)
    lowered = abstract._step.trace(state_shape, abstract.frozen, rows, spk).lower().as_text()
    runs = concrete._step.trace(concrete.init_state(0), concrete.frozen, jnp.asarray(rows), jnp.asarray(spk))
    assert lowered == runs.lower().as_text()
