"""The Pallas int4 kernel (mvjax/kernels/pallas_int4.py) in interpret mode on CPU against the oracle
int4_matmul_xla, both platform variants (Triton body for cuda, Mosaic body for tpu): odd sizes, group
sizes 16/32/64/128, N = 1 and 33, NaN/inf in x; and its lowering for cuda and tpu (found by name, no
CPU FFI kernel), inside shard_map too."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from mvjax.kernels import cpu_int8, pallas_names
from mvjax.kernels import pallas_int4 as PI4
from mvjax.kernels.int4 import int4_matmul_xla, pack_codes
from tests.kernel_util import put_nonfinite

EPS = float(np.finfo(np.float32).eps)
PLATFORMS = ("cuda", "tpu")
# Interpret mode per variant: the TPU body under the TPU interpreter (scalar prefetch, block fetches by
# index map, grid order as on a TensorCore); the Triton body under Pallas's generic interpreter.
INTERPRET = {"cuda": True, "tpu": pltpu.InterpretParams()}
CPU_FFI = re.compile(r"custom_call\s*@\"?(?:" + "|".join(map(re.escape, cpu_int8.TARGETS)) + r")\b")


def _matrix(out, k, group, rng):
    """A random int4 matrix (codes, scale, min) as a min/max quantiser makes them: scales ~1e-3 in
    float16, minimums near -8 scales (weights around zero) with rows where the minimum is exactly
    -8 scales, so code 8 is a weight of exactly 0."""
    codes = rng.integers(0, 16, size=(out, k)).astype(np.uint8)
    scale = rng.uniform(0.5e-3, 2e-3, size=(out, k // group)).astype(np.float16)
    mins = (-scale.astype(np.float32) * rng.uniform(4, 12, size=scale.shape)).astype(np.float16)
    mins[::3] = -8 * scale[::3]  # exact in float16 (a power-of-two multiple)
    return codes, scale, mins


def _entry(codes, scale, mins):
    return {"q4": pack_codes(jnp.asarray(codes)), "scale": jnp.asarray(scale), "min": jnp.asarray(mins)}


def _bound(codes, scale, mins, x):
    """How far kernel and oracle may lie apart on finite columns: each within its rounding of the exact
    product of the stored weights, measured by A = sum_i (|scale q_i| + |min|) |x_i| (>= sum |w_i| |x_i|).
    Oracle: one rounding per weight and per product, K - 1 in the sum: <= (K + 1) u A (u = eps / 2).
    Kernel, per group: 3 G exact partial products (|hi| + |mid| + |lo| <= 1.02 |x|) summed in float32
    (<= 3.1 G u), times the scale (u); the group's x sum (<= G u) times the minimum (u), their sum (u);
    K / G groups accumulated: <= (4.1 G + K / G + 3) u A. Together < (K + 4.1 G + K / G + 4) u A; the
    bound takes eps for u (2x margin for second-order terms)."""
    k = codes.shape[1]
    group = k // scale.shape[1]
    s = np.repeat(scale.astype(np.float64), group, axis=1)
    m = np.repeat(mins.astype(np.float64), group, axis=1)
    a = (np.abs(s * codes) + np.abs(m)) @ np.abs(x.astype(np.float64))
    return (k + 4.1 * group + k / group + 8) * EPS * a


CASES = [
    # out, k, n, group, caps (rows, reduction, columns). Default tiles at N = 1, G = 32: a 32-row tile and
    # 5 rows through XLA, one loop step of 8 groups on cuda; N = 33, G = 64 on small tiles: 16-row tiles,
    # 2 groups a step plus one leftover group, N padded to 48; G = 128 with the default tiles, 6 leftover
    # rows; three groups of 32 in 16-row tiles with no leftover rows; G = 16: cuda leaves it to XLA
    # (8-byte groups), the Mosaic body takes it.
    (37, 256, 1, 32, None),
    (37, 192, 33, 64, (16, 128, 16)),
    (70, 384, 33, 128, None),
    (48, 96, 5, 32, (16, 64, 16)),
    (20, 64, 2, 16, None),
]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("out,k,n,group,caps", CASES)
def test_int4_matmul_matches_xla(platform, out, k, n, group, caps):
    """The kernel against the oracle on finite activations with an outlier feature, within the bound."""
    rng = np.random.default_rng(out * k + n + group)
    codes, scale, mins = _matrix(out, k, group, rng)
    x = rng.standard_normal((k, n)).astype(np.float32)
    x[3] *= 50
    entry = _entry(codes, scale, mins)
    want = np.asarray(jax.jit(int4_matmul_xla)(entry, x))
    got = np.asarray(PI4.int4_matmul(entry["q4"], entry["scale"], entry["min"], x, platform=platform, caps=caps,
                                     interpret=INTERPRET[platform]))
    assert got.shape == (out, n) and got.dtype == np.float32
    # The bound is ~1e-4 of A; a wrong scale, minimum, nibble or group, or a dropped bf16 part of x
    # (2^-8 of it), would be off by far more.
    err, bound = np.abs(got - want), _bound(codes, scale, mins, x)
    assert np.all(err <= bound), (err.max(), bound.min())


@pytest.mark.parametrize("platform", PLATFORMS)
def test_int4_products_are_exact(platform):
    """Where the oracle's result is exact the kernel's is too, bit for bit: each column of x has one
    nonzero input with a full 24-bit significand, codes are 0 or powers of two, scales powers of two,
    minimums 0, so every ``w * x`` is a float32. The kernel forms ``q * x`` from x's three bf16 parts
    exactly (a dropped part loses x's last 8 or 16 bits), takes the right nibble and group, and scales
    once; the bound above cannot see the last part (2^-16 of a product)."""
    out, k, group, n = 48, 192, 64, 40
    rng = np.random.default_rng(5)
    codes = rng.choice(np.array([0, 1, 2, 4, 8], np.uint8), size=(out, k))
    scale = (2.0 ** rng.integers(-10, 1, size=(out, k // group))).astype(np.float16)
    mins = np.zeros_like(scale)
    x = np.zeros((k, n), np.float32)
    significand = 1 + rng.integers(0, 2 ** 23, size=n) * 2.0 ** -23
    x[rng.permutation(k)[:n], np.arange(n)] = (rng.choice([-1, 1], n) * significand * 2.0 ** rng.integers(-20, 20, n))
    entry = _entry(codes, scale, mins)
    want = np.asarray(jax.jit(int4_matmul_xla)(entry, x))
    got = np.asarray(PI4.int4_matmul(entry["q4"], entry["scale"], entry["min"], x, platform=platform,
                                     caps=(16, 128, 16), interpret=INTERPRET[platform]))
    assert np.count_nonzero(want) > out * n // 2
    np.testing.assert_array_equal(got, want)


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
@pytest.mark.parametrize("out,k,n,group,caps", [(37, 128, 33, 32, None), (37, 192, 1, 64, (16, 128, 16))])
def test_int4_matmul_nonfinite_like_xla(platform, out, k, n, group, caps):
    """NaN/inf in x: the same outcome (NaN, +inf or -inf) as the oracle at every output, finite columns
    within the bound, an all-zero column exactly 0. The weights make every outcome: rows 0::4 have a
    weight of exactly 0 at input 2 and rows 1::4 at input 9 (0 * inf = NaN); -inf and +inf meet weights
    of one sign (rows 2, 6: NaN) or of opposite signs (rows 3, 10..19: one infinity); rows 20.. weigh input 2
    by their minimum alone (code 0: the regrouped sum's 0 * inf must not make it NaN)."""
    rng = np.random.default_rng(k + n)
    codes, scale, mins = _matrix(out, k, group, rng)
    mins[:, 0] = -8 * scale[:, 0]  # group 0 (inputs 2 and 9): code 8 is exactly 0, above 8 positive
    codes[::4, 2] = 8
    codes[1::4, 9] = 8
    codes[2:10:4, 2], codes[2:10:4, 9] = 12, 15  # both positive: -inf + inf = NaN in column 2
    codes[10:20, 2], codes[10:20, 9] = 3, 13  # negative at 2, positive at 9: +inf in column 2, -inf in 1
    codes[3, 2], codes[3, 9] = 12, 4  # positive at 2, negative at 9: -inf in column 2
    codes[20:, 2] = 0
    x, n_bad = _nonfinite_x(k, n, rng)
    entry = _entry(codes, scale, mins)
    want = np.asarray(jax.jit(int4_matmul_xla)(entry, x))
    got = np.asarray(PI4.int4_matmul(entry["q4"], entry["scale"], entry["min"], x, platform=platform, caps=caps,
                                     interpret=INTERPRET[platform]))
    assert got.shape == (out, n) and got.dtype == np.float32
    # The case has all three non-finite outcomes, and only in its non-finite columns.
    assert np.isnan(want).any() and np.isposinf(want).any() and np.isneginf(want).any()
    assert np.isfinite(want[:, n_bad:]).all() and not np.isfinite(want[:, :n_bad]).any()
    for test in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(test(got), test(want))
    fin = np.s_[:, n_bad:]
    assert np.all(np.abs(got[fin] - want[fin]) <= _bound(codes, scale, mins, x[fin]))
    if n > 4:
        assert not got[:, 4].any()


# --- lowering for each platform ----------------------------------------------------------------------


def _lowered(fn, args, platform):
    return jax.jit(lambda *a: fn(*a)).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_int4_kernel_lowers_for_the_platform(platform):
    """The kernel lowers for cuda (Triton) and tpu (Mosaic) on this CPU machine, leftover rows included;
    the lowered text names it and calls no CPU FFI kernel."""
    entry = _entry(*_matrix(70, 256, 64, np.random.default_rng(0)))
    args = (entry["q4"], entry["scale"], entry["min"], np.ones((256, 3), np.float32))
    text = _lowered(lambda *a: PI4.int4_matmul(*a, platform=platform), args, platform)
    assert pallas_names(text) == ["mvjax_int4_matmul"]
    assert not CPU_FFI.search(text)


def test_int4_kernel_inside_shard_map():
    """Inside shard_map (check_vma, as the decoder's mesh runs it), replicated weights and activations
    varying over the mesh: the kernel's output is typed varying, so it traces and lowers."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",))
    entry = _entry(*_matrix(64, 128, 32, np.random.default_rng(0)))
    x = jax.device_put(np.ones((128, 2), np.float32), NamedSharding(mesh, P(None, "data")))
    for platform in PLATFORMS:
        product = jax.shard_map(lambda q4, s, m, x: PI4.int4_matmul(q4, s, m, x, platform=platform), mesh=mesh,
                                in_specs=(P(), P(), P(), P(None, "data")), out_specs=P(None, "data"))
        text = _lowered(product, (entry["q4"], entry["scale"], entry["min"], x), platform)
        assert pallas_names(text) == ["mvjax_int4_matmul"], platform
