"""The Pallas kernels (mvjax/kernels/pallas_attention.py, pallas_int8.py) run in interpret mode on
CPU against the plain-XLA paths, both platform variants (Triton body for cuda, Mosaic body for tpu),
and the platform dispatch: programs lowered for cuda and tpu call the Pallas kernels (found by
name) and no CPU FFI kernel; MVJAX_PALLAS=0 turns them off; CPU lowerings are unchanged."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from mvjax.io.quantize import decoder_params
from mvjax.kernels import cache_attention as CA
from mvjax.kernels import cpu_int8, pallas_names
from mvjax.kernels import pallas_attention as PA
from mvjax.kernels import pallas_int8 as PI
from mvjax.kernels.int8 import int8_matmul, int8_matmul_xla
from mvjax.nn import gpt_decode
from mvjax.nn import kv_cache as KV
from mvjax.nn.config import GPTConfig
from mvjax.nn.gpt import abstract_params
from tests.kernel_util import put_nonfinite

EPS = float(np.finfo(np.float32).eps)
PLATFORMS = ("cuda", "tpu")
# Interpret mode per variant: the TPU body under the TPU interpreter (scalar prefetch, block fetches by
# index map, grid order as on a TensorCore); the Triton body under Pallas's generic interpreter.
INTERPRET = {"cuda": True, "tpu": pltpu.InterpretParams()}
CPU_FFI = re.compile(r"custom_call\s*@\"?(?:" + "|".join(map(re.escape, cpu_int8.TARGETS)) + r")\b")


def _store(kind, x):
    """A float array as a cache of ``kind``: (stored, scale or None)."""
    if kind == "float32":
        return jnp.asarray(x, jnp.float32), None
    if kind == "int8":
        entry = KV.quantize(jnp.asarray(x))
        return entry["q"], entry["scale"]
    return KV._to_bits(jnp.asarray(x)), None


def _poison(kind, stored, scale, hidden):
    """``stored``/``scale`` with every slot where ``hidden`` (broadcast over heads and head_dim) holds
    NaN: the float32 value, the bf16 NaN bit pattern, or (int8) a NaN scale."""
    if kind == "int8":
        return stored, jnp.where(hidden[:, None, :], jnp.nan, scale)
    nan = jnp.uint16(0x7FC0) if kind == "bf16" else jnp.float32(jnp.nan)
    return jnp.where(hidden[:, None, None, :], nan, stored), scale


def _attention_bound(q, k, v, window):
    """How far two float32 evaluations of the same attention (same dequantised keys and values) may
    lie apart, each within this of the exact result (so 2x). Per path: score sums of D products,
    then the 1/sqrt(D) multiply, err <= e_s = (D + 1) eps max_j sum_d |q_d k_dj| / sqrt(D); a score
    error moves each probability by <= 2 e_s relatively, so the output by <= 2 e_s max|v|; exp
    (<= 4 ulp here), the softmax sum and the value sum over <= S slots (each <= S eps relatively,
    the online rescaling one more rounding per block), the final division: <= (2 S + 12) eps max|v|.
    The kernels differ from XLA only in this reassociation (both dequantise the same stored values)."""
    q, k, v = (np.abs(np.asarray(a, np.float64)) for a in (q, k, v))
    dim = q.shape[-1]
    e_s = (dim + 1) * EPS * np.einsum("rhd,rhds->rhs", q, k[..., :window]).max() / np.sqrt(dim)
    return 2 * (2 * e_s + (2 * window + 12) * EPS) * v[..., :window].max()


def _xla_step(q, keys, values, positions, window, key_scale=None, value_scale=None):
    """The decoder's own XLA attention for one query per row (what the dispatch falls back to)."""
    if key_scale is not None:
        keys, values = {"q": keys, "scale": key_scale}, {"q": values, "scale": value_scale}
    return KV._attend_xla(q[:, :, None], keys, values, positions[:, None], window, jnp.float32)[:, :, 0]


# --- ragged attention over the contiguous cache --------------------------------------------------

RAGGED_CASES = [
    # kind, rows, heads, head_dim, length, window, blocks (cuda, tpu). Many rows: 0, 1, 37, window - 1 and
    # one past the window among random positions, every kind, an odd window with Triton's last block
    # clamped inside the cache (300 = 9 x 32 + 12); an odd window over three Mosaic blocks of 128;
    # batch 1 at the released head_dim with the default blocks.
    *[(kind, 33, 2, 16, 300, 300, (32, None)) for kind in KV.KV_CACHE_KINDS],
    ("int8", 33, 2, 16, 384, 277, (32, 128)),
    ("float32", 1, 2, 128, 256, 200, (None, None)),
    ("bf16", 1, 2, 128, 256, 200, (None, None)),
]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("kind,rows,heads,dim,length,window,blocks", RAGGED_CASES)
def test_ragged_attention_matches_xla(platform, kind, rows, heads, dim, length, window, blocks):
    """The kernel on a cache whose slots past each row's position hold NaN equals the XLA path on
    the clean cache: every row reads only what it has reached, through the online softmax."""
    rng = np.random.default_rng(rows * dim + length)
    if rows == 1:
        positions = np.array([window - 1], np.int32)
    else:
        positions = rng.integers(0, window, rows).astype(np.int32)
        positions[:5] = [0, 1, 37, window - 1, length + 5]
    q = rng.normal(size=(rows, heads, dim)).astype(np.float32)
    k, k_scale = _store(kind, rng.normal(size=(rows, heads, dim, length)).astype(np.float32) * 0.5)
    v, v_scale = _store(kind, rng.normal(size=(rows, heads, dim, length)).astype(np.float32))
    want = np.asarray(jax.jit(_xla_step, static_argnums=4)(q, k, v, positions, window, k_scale, v_scale))
    hidden = jnp.arange(length)[None, :] > np.minimum(positions, window - 1)[:, None]
    k_bad, ks_bad = _poison(kind, k, k_scale, hidden)
    v_bad, vs_bad = _poison(kind, v, v_scale, hidden)
    block = blocks[PLATFORMS.index(platform)]
    got = np.asarray(PA.ragged_attention(q, k_bad, v_bad, positions, window, ks_bad, vs_bad, platform=platform,
                                         block=block, interpret=INTERPRET[platform]))
    assert got.shape == (rows, heads, dim) and np.isfinite(got).all()
    bound = _attention_bound(q, KV.dequantize(_entry(k, k_scale), length), KV.dequantize(_entry(v, v_scale), length),
                             window)
    err = np.abs(got - want).max()
    assert err <= bound, (err, bound)


def _entry(stored, scale):
    return stored if scale is None else {"q": stored, "scale": scale}


# --- paged attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("kind", KV.KV_CACHE_KINDS)
def test_paged_attention_matches_xla(platform, kind):
    """A shuffled page table over a pool of 40 pages of 16 slots, 6 pages per row: the kernel, given
    NaN in every slot past a row's position, in every page no row owns, and out-of-range table entries
    past each row's last page, equals the plain-XLA gather-then-attend on the clean pool and table."""
    rows, heads, dim, page, per_row, pool = 5, 2, 16, 16, 6, 40
    rng = np.random.default_rng(7)
    table = rng.permutation(pool)[:rows * per_row].reshape(rows, per_row).astype(np.int32)
    positions = np.array([0, 1, 37, per_row * page - 1, 50], np.int32)
    q = rng.normal(size=(rows, heads, dim)).astype(np.float32)
    k, k_scale = _store(kind, rng.normal(size=(pool, heads, dim, page)).astype(np.float32) * 0.5)
    v, v_scale = _store(kind, rng.normal(size=(pool, heads, dim, page)).astype(np.float32))
    want = np.asarray(jax.jit(PA.paged_attention_xla)(q, k, v, table, positions, k_scale, v_scale))

    # Each pool page's slots that no row may read: past the owner's position, or all of an unowned page.
    hidden = np.ones((pool, page), bool)
    for r in range(rows):
        for j in range(per_row):
            hidden[table[r, j]] = j * page + np.arange(page) > positions[r]
    k_bad, ks_bad = _poison(kind, k, k_scale, jnp.asarray(hidden))
    v_bad, vs_bad = _poison(kind, v, v_scale, jnp.asarray(hidden))
    bad_table = table.copy()
    for r in range(rows):
        bad_table[r, positions[r] // page + 1:] = 10 ** 6
    got = np.asarray(PA.paged_attention(q, k_bad, v_bad, bad_table, positions, ks_bad, vs_bad, platform=platform,
                                        interpret=INTERPRET[platform]))
    assert got.shape == (rows, heads, dim) and np.isfinite(got).all()
    gathered = lambda a, s: KV.dequantize(_entry(PA.gather_pages(a, table), None if s is None else  # noqa: E731
                                                 PA.gather_pages(s, table)), per_row * page)
    bound = _attention_bound(q, gathered(k, k_scale), gathered(v, v_scale), per_row * page)
    err = np.abs(got - want).max()
    assert err <= bound, (err, bound)


def test_paged_reference_is_the_contiguous_attention():
    """The paged XLA reference over pages laid out in order is the decoder's XLA attention over the
    same cache, contiguous (same operations on the same values: equal to float32 rounding of the
    differently fused products, ~1e-7)."""
    rows, heads, dim, page, per_row = 3, 2, 16, 8, 4
    rng = np.random.default_rng(3)
    keys = rng.normal(size=(rows, heads, dim, per_row * page)).astype(np.float32)
    values = rng.normal(size=(rows, heads, dim, per_row * page)).astype(np.float32)
    to_pages = lambda a: a.reshape(rows, heads, dim, per_row, page).transpose(0, 3, 1, 2, 4).reshape(  # noqa: E731
        rows * per_row, heads, dim, page)
    table = np.arange(rows * per_row, dtype=np.int32).reshape(rows, per_row)
    np.testing.assert_array_equal(np.asarray(PA.gather_pages(to_pages(keys), table)), keys)
    q = rng.normal(size=(rows, heads, dim)).astype(np.float32)
    positions = np.array([0, 13, 31], np.int32)
    got = np.asarray(PA.paged_attention_xla(q, to_pages(keys), to_pages(values), table, positions))
    want = np.asarray(_xla_step(q, keys, values, positions, per_row * page))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


# --- int8 matmul ------------------------------------------------------------------------------------


def test_bf16_split_is_exact():
    """hi + mid + lo is the float32 value exactly (each part a bf16, so each code * part is exact in
    float32); a non-finite value goes whole into hi."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=2000) * 10.0 ** rng.integers(-30, 30, 2000), [0.0, -0.0, 3.4e38, -1e-30,
                                                                                        1.0 + 2 ** -23]])
    x = x.astype(np.float32)
    hi, mid, lo = (np.asarray(p) for p in PI.split_bf16(jnp.asarray(x)))
    assert hi.dtype == mid.dtype == lo.dtype == jnp.bfloat16
    total = hi.astype(np.float64) + mid.astype(np.float64) + lo.astype(np.float64)
    np.testing.assert_array_equal(total, x.astype(np.float64))
    special = np.array([np.nan, np.inf, -np.inf], np.float32)
    hi, mid, lo = (np.asarray(p).astype(np.float32) for p in PI.split_bf16(jnp.asarray(special)))
    assert np.isnan(hi[0]) and hi[1] == np.inf and hi[2] == -np.inf and not mid.any() and not lo.any()


def _nonfinite_x(k, n, rng):
    """Activations (k, n): column 0 NaN once, 1 +inf once, 2 -inf and +inf, 3 NaN and inf, 4 all zero, the
    rest finite with an outlier feature (n == 1: the -inf/+inf column alone)."""
    x = rng.standard_normal((k, n)).astype(np.float32)
    x[0] *= 50
    touched = put_nonfinite(x)
    if n > 4:
        x[:, 4] = 0.0
    return x, touched


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("out,k,n,caps", [
    (37, 70, 1, None),  # default tiles: a 32-row tile plus 5 rows through XLA; cuda 64 + 6 columns
    (37, 70, 5, (16, 16, 16)),  # small tiles: several K steps, leftover rows and columns
    (37, 70, 130, (16, 16, 16)),  # N padded to whole column tiles (cuda 144; tpu 256)
    (37, 300, 5, (32, 128, 128)),  # tpu: two 128-column K steps and 44 leftover columns
])
def test_int8_matmul_matches_xla(platform, out, k, n, caps):
    """The kernel against int8_matmul_xla, NaN/inf columns included: the same outcome (NaN, +inf or
    -inf) at every non-finite output, and finite outputs within float32 reassociation: each path sums
    the K exact-or-rounded products (kernel: exact, XLA: rounded once) and multiplies by the scale,
    within (K + 2) eps scale * (|q| @ |x|) of the exact sum, so the two within twice that."""
    rng = np.random.default_rng(out + k + n)
    q = rng.integers(-127, 128, size=(out, k)).astype(np.int8)
    q[::4, 2] = 0  # 0 * inf = NaN in these rows
    q[1::4, 9] = 0
    q[:10, 9], q[:10, 2] = np.abs(q[:10, 9]) + 1, np.abs(q[:10, 2]) + 1  # +inf at 9 and -inf at 2 meet: NaN
    q[10:20, 2], q[10:20, 9] = -np.abs(q[10:20, 2]) - 1, np.abs(q[10:20, 9]) + 1  # both give +inf
    scale = rng.uniform(1e-3, 1e-2, out).astype(np.float32)
    x, n_bad = _nonfinite_x(k, n, rng)
    want = np.asarray(jax.jit(int8_matmul_xla)(q, scale, x))
    got = np.asarray(PI.int8_matmul(q, scale, x, platform=platform, caps=caps, interpret=INTERPRET[platform]))
    assert got.shape == (out, n) and got.dtype == np.float32
    # The case has all three non-finite outcomes, and only in its non-finite columns.
    assert np.isnan(want).any() and np.isposinf(want).any() and np.isneginf(want).any()
    assert np.isfinite(want[:, n_bad:]).all() and not np.isfinite(want[:, :n_bad]).any()
    for test in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(test(got), test(want))
    fin = np.s_[:, n_bad:]
    bound = 2 * (k + 2) * EPS * (np.abs(q.astype(np.float64)) * scale[:, None]) @ np.abs(x[fin].astype(np.float64))
    assert np.all(np.abs(got[fin] - want[fin]) <= bound)
    if n > 4:
        assert not got[:, 4].any()


# --- lowering for each platform ----------------------------------------------------------------


def _lowered(fn, args, platform):
    """``fn`` lowered for ``platform``, traced afresh (a new function object: jit reuses the trace of a
    function it has seen, and the dispatch reads MVJAX_PALLAS and the kernels' state when tracing)."""
    return jax.jit(lambda *a: fn(*a)).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _kernel_entries(kind):
    """(name, function, args) of each kernel entry point on small shapes."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 2, 16)).astype(np.float32)
    k, ks = _store(kind, rng.normal(size=(3, 2, 16, 256)).astype(np.float32))
    pages, ps = _store(kind, rng.normal(size=(8, 2, 16, 32)).astype(np.float32))
    table = np.arange(6, dtype=np.int32).reshape(3, 2)
    positions = np.array([0, 40, 255], np.int32)
    w = rng.integers(-127, 128, size=(70, 300)).astype(np.int8)
    return [
        ("mvjax_ragged_attention", lambda platform: lambda *a: PA.ragged_attention(*a[:4], 200, *a[4:],
                                                                                    platform=platform),
         (q, k, k, positions, ks, ks)),
        ("mvjax_paged_attention", lambda platform: lambda *a: PA.paged_attention(*a, platform=platform),
         (q, pages, pages, table, np.array([0, 40, 63], np.int32), ps, ps)),
        ("mvjax_int8_matmul", lambda platform: lambda *a: PI.int8_matmul(*a, platform=platform),
         (w, np.ones(70, np.float32), np.ones((300, 3), np.float32))),
    ]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("kind", KV.KV_CACHE_KINDS)
def test_each_kernel_lowers_for_the_platform(platform, kind):
    """Every entry point lowers for cuda (Triton) and tpu (Mosaic) on this CPU machine; the lowered
    text names the kernel (found by pallas_names) and calls no CPU FFI kernel."""
    for name, make, args in _kernel_entries(kind):
        if name == "mvjax_int8_matmul" and kind != "float32":
            continue  # one dtype: the kinds are the caches'
        text = _lowered(make(platform), args, platform)
        assert pallas_names(text) == [name], (name, pallas_names(text))
        assert not CPU_FFI.search(text)


def test_pallas_names():
    """pallas_names finds named Pallas calls of both kinds in order, and nothing in plain HLO."""
    triton = ('%0 = stablehlo.custom_call @__gpu$xla.gpu.triton(%arg0) {backend_config = "", mhlo.backend_config = '
              '{debug = false, grid_x = 1 : i32, ir = "ML\\EFR", name = "mvjax_a", num_stages = 3 : i32}}')
    tpu = ('%1 = stablehlo.custom_call @tpu_custom_call(%0) {backend_config = "{\\22custom_call_config\\22: {}}", '
           'kernel_name = "mvjax_b", mhlo.frontend_attributes = {kernel_metadata = "{}"}}')
    assert pallas_names(triton + "\n" + tpu + "\n" + triton) == ["mvjax_a", "mvjax_b", "mvjax_a"]
    assert pallas_names('%2 = stablehlo.custom_call @mvjax_int8_matmul(%1) {name = "x"}') == []


# --- the dispatch in the decoder -----------------------------------------------------------------

CONFIG = GPTConfig(block_size=64, vocab_sizes=(40,), target_vocab_sizes=None, n_layer=2, n_head=2, n_embd=32,
                   norm_type="rmsnorm", rmsnorm_eps=1e-5, nonlinearity_type="swiglu", swiglu_multiple_of=32,
                   speaker_emb_dim=8)


@pytest.fixture(scope="module")
def int8_decoder():
    """Random int8 decode parameters for CONFIG (head_dim 16)."""
    abstract = abstract_params(CONFIG)
    leaves, tree = jax.tree_util.tree_flatten(abstract)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_unflatten(tree, [rng.normal(size=a.shape).astype(np.float32) * 0.1 for a in leaves])
    return decoder_params(CONFIG, params, quantize="int8")


def _decode_step_text(params, kind, platform):
    rows = 3
    cache = KV.init_cache(CONFIG, rows, CONFIG.block_size, kind)
    tokens = np.ones((rows, 1), np.int32)
    positions = np.array([[0], [9], [63]], np.int32)
    speaker = np.zeros((rows, 8), np.float32)
    step = lambda p, t, pos, s, c: gpt_decode.apply_tokens(CONFIG, p, t, pos, s, c)  # noqa: E731
    return _lowered(step, (params, tokens, positions, speaker, cache), platform)


@pytest.fixture
def cpu_kernels(monkeypatch):
    """``cpu_kernels(built)``: the C++ kernels reported built or not, without building them (lowering
    an FFI call needs no registered target; the kernels' own tests run them)."""
    monkeypatch.setattr(cpu_int8, "cpu_kernels_ready", lambda: built[0])
    built = [False]

    def set_built(value: bool):
        built[0] = value

    return set_built


@pytest.mark.parametrize("kind", KV.KV_CACHE_KINDS)
def test_decode_step_lowers_to_pallas_on_accelerators(int8_decoder, kind, monkeypatch, cpu_kernels):
    """One decode step (int8 weights) lowered for cuda and for tpu calls the Pallas int8 matmul and
    ragged attention and no CPU FFI kernel (even with the C++ kernels built); with MVJAX_PALLAS=0 it
    is plain XLA there. Lowered for CPU it calls the C++ kernels (matmul and the kind's attention)
    when they are built, else no kernel at all, and never a Pallas one."""
    monkeypatch.delenv("MVJAX_PALLAS", raising=False)
    cpu_kernels(True)
    for platform in PLATFORMS:
        text = _decode_step_text(int8_decoder, kind, platform)
        assert set(pallas_names(text)) == {"mvjax_int8_matmul", "mvjax_ragged_attention"}, platform
        assert not CPU_FFI.search(text)
    text = _decode_step_text(int8_decoder, kind, "cpu")
    attention = {"float32": "mvjax_f32_attention", "bf16": "mvjax_bf16_attention", "int8": "mvjax_int8_attention"}
    assert pallas_names(text) == []
    assert set(m.split("@")[1].strip('"') for m in CPU_FFI.findall(text)) == {"mvjax_int8_matmul", attention[kind]}
    cpu_kernels(False)
    text = _decode_step_text(int8_decoder, kind, "cpu")
    assert pallas_names(text) == [] and not CPU_FFI.search(text)
    monkeypatch.setenv("MVJAX_PALLAS", "0")
    for platform in PLATFORMS:
        text = _decode_step_text(int8_decoder, kind, platform)
        assert pallas_names(text) == [] and not CPU_FFI.search(text)


def test_matmul_and_paged_dispatch(monkeypatch, cpu_kernels):
    """int8_matmul and paged_step_attention pick the Pallas kernel for cuda and tpu, plain XLA for
    CPU (paged) and for a platform without kernels (rocm); a non-power-of-two head_dim keeps the
    attention off Triton but on Mosaic."""
    monkeypatch.delenv("MVJAX_PALLAS", raising=False)
    entry = {"q": np.ones((64, 32), np.int8), "scale": np.ones(64, np.float32)}
    for platform in PLATFORMS:
        text = _lowered(int8_matmul, (entry, np.ones((32, 2), np.float32)), platform)
        assert pallas_names(text) == ["mvjax_int8_matmul"] and not CPU_FFI.search(text)
    text = _lowered(int8_matmul, (entry, np.ones((32, 2), np.float32)), "rocm")
    assert pallas_names(text) == [] and not CPU_FFI.search(text)

    def paged(dim):
        pages = np.zeros((4, 2, dim, 16), np.float32)
        return (np.zeros((2, 2, dim), np.float32), pages, pages, np.zeros((2, 2), np.int32), np.zeros(2, np.int32))

    for platform, dim, named in [("cuda", 16, True), ("tpu", 16, True), ("cpu", 16, False), ("cuda", 24, False),
                                 ("tpu", 24, True)]:
        text = _lowered(CA.paged_step_attention, paged(dim), platform)
        assert pallas_names(text) == (["mvjax_paged_attention"] if named else []), (platform, dim)


def test_step_kernel_used_by_backend(monkeypatch, cpu_kernels):
    """The engine's question "does a step's attention read only what each row reached": on CPU the
    C++ kernel's answer; on a CUDA GPU the Pallas kernel's (power-of-two head_dim, MVJAX_PALLAS not 0);
    on a TPU the Pallas kernel's; never for bf16 activations."""
    for built in (True, False):
        cpu_kernels(built)
        assert KV.step_kernel_used(jnp.float32, 16) == built and not KV.step_kernel_used(jnp.bfloat16, 16)
    monkeypatch.delenv("MVJAX_PALLAS", raising=False)
    monkeypatch.setattr(CA, "backend_platform", lambda: "cuda")
    assert KV.step_kernel_used(jnp.float32, 128) and KV.step_kernel_used(jnp.float32)
    assert not KV.step_kernel_used(jnp.float32, 48) and not KV.step_kernel_used(jnp.bfloat16, 128)
    monkeypatch.setattr(CA, "backend_platform", lambda: "tpu")
    assert KV.step_kernel_used(jnp.float32, 48)
    monkeypatch.setattr(CA, "backend_platform", lambda: "rocm")
    assert not KV.step_kernel_used(jnp.float32, 128)
    monkeypatch.setattr(CA, "backend_platform", lambda: "cuda")
    monkeypatch.setenv("MVJAX_PALLAS", "0")
    assert not KV.step_kernel_used(jnp.float32, 128)


def test_dispatch_inside_shard_map(cpu_kernels):
    """Inside shard_map (check_vma, as the decoder's mesh runs it) every branch of the dispatch types
    its result as varying like its operands, so a step's int8 product (replicated weights, varying
    activations) and attention trace, and lower to the C++ kernels for CPU and the Pallas ones for
    cuda and tpu. (Before, the C++ int8 product's result was typed invariant, and its NaN/inf cond
    failed to trace over a mesh.)"""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    cpu_kernels(True)
    mesh = jax.make_mesh((1,), ("data",))
    put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))  # noqa: E731
    entry = {"q": np.ones((64, 32), np.int8), "scale": np.ones(64, np.float32)}
    product = jax.shard_map(lambda e, x: int8_matmul(e, x), mesh=mesh, in_specs=(P(), P(None, "data")),
                            out_specs=P(None, "data"))
    cache = put(np.zeros((2, 2, 16, 64), np.float32), "data")
    attention = jax.shard_map(lambda q, k, v, p: KV.attend(q, k, v, p, 64, jnp.float32), mesh=mesh,
                              in_specs=P("data"), out_specs=P("data"))
    for fn, args, name, ffi in [
        (product, (put(entry), put(np.ones((32, 2), np.float32), None, "data")), "mvjax_int8_matmul", "int8_matmul"),
        (attention, (put(np.zeros((2, 2, 1, 16), np.float32), "data"), cache, cache,
                     put(np.zeros((2, 1), np.int32), "data")), "mvjax_ragged_attention", "f32_attention"),
    ]:
        assert re.search(r"custom_call\s*@mvjax_" + ffi, _lowered(fn, args, "cpu"))
        for platform in PLATFORMS:
            text = _lowered(fn, args, platform)
            assert pallas_names(text) == [name] and not CPU_FFI.search(text), (name, platform)
