"""The KV cache (mvjax/nn/kv_cache.py): int8 storage error, and a decode step's attention over
float32, bf16 and int8 caches through the CPU kernel and through plain XLA, against float64."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvjax.kernels import cache_attention as CA
from mvjax.kernels import cpu_int8
from mvjax.nn import kv_cache as KV
from mvjax.nn.config import GPTConfig

F32_EPS = float(np.finfo(np.float32).eps)
KERNEL_CALL = re.compile(r"custom_call\s*@mvjax_(?:f32|bf16|int8)_attention\b")


def test_cache_kind_names():
    assert KV.cache_kind("bfloat16") == "bf16" and KV.cache_kind(jnp.float32) == "float32"
    assert KV.cache_kind(None, default="int8") == "int8" and KV.cache_kind(jnp.bfloat16) == "bf16"
    with pytest.raises(ValueError, match="unknown KV cache kind 'fp8'"):
        KV.cache_kind("fp8")


def test_int8_storage_error_and_size():
    """Each stored vector keeps its largest entry exactly (up to float32 rounding of the scale) and
    every entry within half a step (max|x| / 254); an all-zero vector stays zero."""
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 40)).astype(np.float32) * np.geomspace(1e-3, 1e3, 40)
    x[0, 0, :, 5] = 0.0
    entry = KV.quantize(jnp.asarray(x))
    assert entry["q"].dtype == jnp.int8 and entry["scale"].shape == (2, 3, 40)
    back = np.asarray(KV.dequantize(entry, 40))
    amax = np.abs(x).max(axis=2, keepdims=True)
    assert np.all(np.abs(back - x) <= amax / 254 * (1 + 1e-5) + 1e-30)
    assert np.all(back[0, 0, :, 5] == 0.0)
    config = GPTConfig(block_size=64, vocab_sizes=(8,), target_vocab_sizes=None, n_layer=3, n_head=4, n_embd=32)
    assert KV.bytes_per_slot(config, "int8") == 2 * 3 * 4 * (8 + 4)
    assert KV.bytes_per_slot(config, "bf16") * 2 == KV.bytes_per_slot(config, "float32") == 2 * 3 * 32 * 4
    cache = KV.init_cache(config, 2, 16, "int8")
    assert KV.kind_of(cache) == "int8" and KV.length(cache) == 16 and len(cache) == 3
    assert KV.kind_of(KV.init_cache(config, 2, 16, "bf16")) == "bf16"
    assert KV.kind_of(KV.init_cache(config, 2, 16, jnp.float32)) == "float32"


@pytest.fixture(params=["kernel", "xla"])
def path(request, monkeypatch):
    """``kernel``: the C++ cache kernel (skipped, with the reason, where it cannot be built; the
    ``xla`` case still runs). ``xla``: the kernel reported unavailable, as off CPU."""
    if request.param == "kernel":
        if not CA.cache_kernel_used():
            pytest.skip(f"CPU kernels unavailable here ({cpu_int8._state.get('why') or jax.default_backend()})")
    else:
        monkeypatch.setattr(CA, "cache_kernel_used", lambda: False)
    return request.param


def _store(kind, x):
    if kind == "float32":
        return jnp.asarray(x)
    if kind == "int8":
        return KV.quantize(jnp.asarray(x))
    return KV._to_bits(jnp.asarray(x))  # bf16 is stored as its uint16 bit patterns


@pytest.mark.parametrize("kind", ["float32", "bf16", "int8"])
@pytest.mark.parametrize("heads,dim,length,window,positions", [
    (4, 32, 100, 100, (0, 50, 99)),  # odd lengths: the 64-, 8- and 1-slot loops all run
    (2, 128, 256, 128, (127, 64, 7)),  # a window shorter than the cache
    (16, 64, 2048, 2048, (2047, 1500)),
])
def test_decode_attention_matches_float64(path, kind, heads, dim, length, window, positions):
    """One query per row over the stored cache: the kernel (or XLA) against float64 attention over
    the dequantised values. Bound: float32 rounding of the D-term score sums and of the softmax
    and value sums (relative ~(D + S) * eps), the exp approximation (2e-7), times the value scale."""
    rows = len(positions)
    rng = np.random.default_rng(heads * length)
    q = rng.normal(size=(rows, heads, 1, dim)).astype(np.float32)
    keys = rng.normal(size=(rows, heads, dim, length)).astype(np.float32) * 0.5
    values = rng.normal(size=(rows, heads, dim, length)).astype(np.float32)
    k_entry, v_entry = _store(kind, keys), _store(kind, values)
    pos = np.array(positions, np.int32)[:, None]
    f = jax.jit(lambda q, k, v, p: KV.attend(q, k, v, p, window, jnp.float32))
    calls = KERNEL_CALL.findall(f.lower(q, k_entry, v_entry, pos).as_text())
    assert len(calls) == (1 if path == "kernel" else 0)
    got = np.asarray(f(q, k_entry, v_entry, pos))[:, :, 0]

    k64 = np.asarray(KV.dequantize(k_entry, window), np.float64)
    v64 = np.asarray(KV.dequantize(v_entry, window), np.float64)
    scores = np.einsum("rhd,rhds->rhs", q[:, :, 0].astype(np.float64), k64) / np.sqrt(dim)
    visible = np.arange(window)[None, None, :] <= pos[:, :, None]
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("rhs,rhds->rhd", probs, v64)
    score_err = dim * F32_EPS * np.einsum("rhd,rhds->rhs", np.abs(q[:, :, 0]), np.abs(k64)).max() / np.sqrt(dim)
    bound = (4 * score_err + 2 * (window + dim) * F32_EPS + 1e-6) * np.abs(v64).max()
    assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)


def test_write_quantises_per_position():
    """A decode write stores each row at its own position; a prefill write all rows from one start."""
    config = GPTConfig(block_size=16, vocab_sizes=(8,), target_vocab_sizes=None, n_layer=1, n_head=2, n_embd=8)
    entry = KV.init_cache(config, 2, 16, "int8")[0][0]
    rng = np.random.default_rng(1)
    one = rng.normal(size=(2, 2, 4, 1)).astype(np.float32)
    entry = KV.write(entry, jnp.asarray(one), jnp.array([[3], [9]]))
    back = np.asarray(KV.dequantize(entry, 16))
    np.testing.assert_allclose(back[0, :, :, 3], one[0, :, :, 0], atol=np.abs(one).max() / 254 * 1.001)
    np.testing.assert_allclose(back[1, :, :, 9], one[1, :, :, 0], atol=np.abs(one).max() / 254 * 1.001)
    assert np.count_nonzero(np.asarray(entry["scale"])) == 2 * 2  # rows x heads, one position each
    block = rng.normal(size=(2, 2, 4, 5)).astype(np.float32)
    entry = KV.write(entry, jnp.asarray(block), jnp.broadcast_to(jnp.arange(5), (2, 5)))
    np.testing.assert_allclose(np.asarray(KV.dequantize(entry, 5)), block, atol=np.abs(block).max() / 254 * 1.001)
