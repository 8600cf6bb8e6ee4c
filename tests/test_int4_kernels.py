"""The int4 product on CPU: the C++ kernel (both instruction sets) against the plain-XLA oracle and a
float64 reference, its error beside the 4-bit weights' own, NaN/inf, the dispatch and its fallbacks."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvjax.kernels import cpu_int8
from mvjax.kernels import int4 as K4
from tests.conftest import REPO
from tests.kernel_util import assert_nonfinite_as_float, put_nonfinite

KERNEL_CALL = re.compile(r"custom_call\s*@" + re.escape(cpu_int8.INT4_TARGET) + r"\b")
MIDDLE = 7.5  # the kernel centres the codes here (int4_matmul.cc)


def _isas():
    """The instruction sets to test the kernel with: AVX2 always, AVX-512 VNNI where this CPU has it
    (else reported as a skip), and the automatic choice."""
    return ["auto", "avx2", "avx512vnni"]


def _need_kernel(isa="auto"):
    if not K4.int4_kernel_used():
        why = cpu_int8._state.get("why") or f"backend {jax.default_backend()}"
        pytest.skip(f"CPU kernels unavailable here ({why})")
    if isa == "avx512vnni" and cpu_int8.int4_isa() != "avx512vnni":
        pytest.skip("this CPU has no AVX-512 VNNI; the AVX2 case runs")


def _entry(rng, out, k, group, *, signs=True):
    """Random codes and float16 scales/minimums, row magnitudes from 1e-3 to 10, minimums of both
    signs (and some negative scales, which the layout allows) so every term of the kernel's sum
    is exercised."""
    codes = rng.integers(0, 16, (out, k))
    mag = rng.uniform(1e-3, 10, (out, 1))
    scale = mag * rng.uniform(0.02, 0.2, (out, k // group))
    if signs:
        scale *= np.where(rng.random(scale.shape) < 0.1, -1, 1)
    mins = mag * rng.uniform(-2.0, 0.5, (out, k // group))
    return {"q4": K4.pack_codes(jnp.asarray(codes)), "scale": jnp.asarray(scale, jnp.float16),
            "min": jnp.asarray(mins, jnp.float16)}


def _parts(entry):
    """float64 codes (out, in), and the scale and minimum expanded to (out, in)."""
    q = np.asarray(K4.unpack_codes(entry["q4"]), np.float64)
    group = K4.group_size(entry)
    scale = np.repeat(np.asarray(entry["scale"], np.float64), group, axis=1)
    mins = np.repeat(np.asarray(entry["min"], np.float64), group, axis=1)
    return q, scale, mins


def _reference(entry, x):
    """Float64 product of the dequantised weights, elementwise (IEEE: 0 * inf = NaN, inf - inf = NaN)."""
    q, scale, mins = _parts(entry)
    w = scale * q + mins
    with np.errstate(invalid="ignore"):
        return (w[:, :, None] * np.asarray(x, np.float64)[None, :, :]).sum(axis=1)


def _bounds(entry, x):
    """What the kernel may differ from the exact product by, as (rounding, float32) parts.

    Activation rounding: per column and group the step is amax / 127, each entry moves by <= step / 2,
    and the rounding meets only ``scale * (code - 7.5)`` (the minimums and the codes' middle meet
    exact float sums), so |error| <= sum_i |scale_i| |code_i - 7.5| step_i / 2 (x 1.001: the step is
    a rounded float32). Float32 arithmetic (group scalings, lane sums; the oracle's own dot): 2e-5
    of the magnitude sum_i (|scale_i| (code_i + 7.5) + |min_i|) |x_i| the terms are formed from
    (their cancellation is what could amplify rounding), ~100x below the rounding term here.
    Worst-case float32 sums over K terms could exceed 2e-5 for K >> 1000; blocked sums stay ~sqrt(K) eps."""
    q, scale, mins = _parts(entry)
    group = K4.group_size(entry)
    x = np.asarray(x, np.float64)
    amax = np.abs(x).reshape(x.shape[0] // group, group, x.shape[1]).max(axis=1)
    step = np.repeat(amax / cpu_int8.INT4_ACTIVATION_MAX, group, axis=0)  # (in, N)
    rounding = (np.abs(scale) * np.abs(q - MIDDLE)) @ (step / 2) * 1.001
    magnitude = (np.abs(scale) * (q + MIDDLE) + np.abs(mins)) @ np.abs(x)
    return rounding, 2e-5 * magnitude


def _bound(entry, x):
    rounding, float_part = _bounds(entry, x)
    return rounding + float_part


def _dispatch():
    """The decoder's entry point under a jit of a new function object (traced afresh, so the
    dispatch sees the current kernel availability)."""
    return jax.jit(lambda entry, x: K4.int4_matmul(entry, x))


def _product(entry, x, *, kernel: bool):
    """``int4_matmul`` under jit, after checking the lowered program calls the kernel exactly when
    ``kernel``."""
    f = _dispatch()
    calls = KERNEL_CALL.findall(f.lower(entry, jnp.asarray(x)).as_text())
    assert len(calls) == (1 if kernel else 0), calls
    got = np.asarray(f(entry, jnp.asarray(x)))
    assert got.shape == (entry["q4"].shape[0], x.shape[1]) and got.dtype == np.float32
    return got


# O not a multiple of any row tile; K a multiple of G (and for G = 32 not of 64: a half block ends
# each row); N = 1, 2, 3 (column tiles of 1..3), 5, 64 (four-column tiles plus remainders).
SIZES = [(37, 96, 32, 1), (13, 160, 32, 3), (70, 320, 64, 2), (9, 384, 128, 5), (130, 1056, 32, 64),
         (67, 2048, 64, 64), (41, 4224, 128, 3), (5, 64, 64, 1)]


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("out,k,group,n", SIZES)
def test_int4_kernel_matches_oracle(isa, out, k, group, n):
    """The kernel equals the float64 product of the dequantised weights, and the plain-XLA oracle,
    within the activation-rounding bound (:func:`_bound`), for odd sizes, G = 32/64/128, outlier
    features and an all-zero column; and the bound is tight enough to catch swapped nibbles."""
    _need_kernel(isa)
    rng = np.random.default_rng(out * k + n)
    entry = _entry(rng, out, k, group)
    x = rng.standard_normal((k, n)).astype(np.float32)
    x[3] *= 40  # an outlier feature: only its own group's step widens
    if n > 2:
        x[:, 1] = 0.0  # an all-zero column
    f = jax.jit(lambda e, x: cpu_int8.kernel_int4_matmul(e["q4"], e["scale"], e["min"], x, isa=isa))
    got = np.asarray(f(entry, jnp.asarray(x)))
    want = _reference(entry, x)
    oracle = np.asarray(jax.jit(K4.int4_matmul_xla)(entry, jnp.asarray(x)))
    rounding, float_part = _bounds(entry, x)
    bound = rounding + float_part
    assert np.all(np.abs(got - want) <= bound), (np.abs(got - want) / bound).max()
    # The oracle sits within the float32 part of the bound, so kernel - oracle <= the whole bound
    # plus that part again.
    assert np.all(np.abs(oracle - want) <= float_part + 1e-30)
    assert np.all(np.abs(got - oracle) <= bound + float_part)
    if n > 2:
        assert not got[:, 1].any()
    # A kernel reading the nibbles the other way round would be caught.
    swapped = dict(entry, q4=(entry["q4"] >> 4) | (entry["q4"] << 4))
    assert np.any(np.abs(_reference(swapped, x) - want) > bound)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_kernel_rounding_error_is_small_beside_the_weight_error(group):
    """Gaussian weights quantised to 4 bits round to nearest (per group: min and (max - min) / 15)
    and gaussian activations: the kernel's extra error (its activation rounding) against the
    oracle is a small fraction of the 4-bit weights' own error against the float weights.

    Expected ratio of the rms errors: a weight's error is uniform over a code step, range / 15
    (range ~ 4.8 sigma for 64 gaussian values): rms ~ 0.09 sigma_w each; the kernel's error per
    product is (w - middle) * (rounding of x), rms ~ sigma_w * (amax_x / 127) / sqrt(12) with
    amax_x ~ 2.5 sigma_x: ~ 0.006 sigma_w sigma_x. Ratio ~ 0.07 (G = 32's ranges and maxima are
    both smaller: about the same); asserted below 0.12."""
    _need_kernel()
    rng = np.random.default_rng(group)
    out, k, n = 256, 2048, 4
    w = rng.standard_normal((out, k))
    g = w.reshape(out, k // group, group)
    lo, hi = g.min(axis=2), g.max(axis=2)
    scale = np.asarray(np.asarray((hi - lo) / 15, np.float16), np.float64)
    mins = np.asarray(np.asarray(lo, np.float16), np.float64)
    codes = np.clip(np.round((g - mins[:, :, None]) / scale[:, :, None]), 0, 15).reshape(out, k)
    entry = {"q4": K4.pack_codes(jnp.asarray(codes)), "scale": jnp.asarray(scale, jnp.float16),
             "min": jnp.asarray(mins, jnp.float16)}
    x = rng.standard_normal((k, n)).astype(np.float32)
    exact = w @ x.astype(np.float64)
    dequantised = _reference(entry, x)
    got = np.asarray(jax.jit(K4.int4_matmul)(entry, jnp.asarray(x)))
    weight_error = np.sqrt(np.mean((dequantised - exact) ** 2))
    kernel_error = np.sqrt(np.mean((got - dequantised) ** 2))
    # The weights really are 4-bit: ~0.09-0.1 sigma_w error per weight, so ~0.09-0.1 of |y| (rms).
    assert 0.05 < weight_error / np.sqrt(np.mean(exact ** 2)) < 0.15
    assert kernel_error < 0.12 * weight_error, (kernel_error, weight_error)


def _nonfinite_case(n):
    """Weights with exact zeros (scale 1, min -8, code 8) and both signs at the non-finite positions;
    activation columns: NaN, +inf alone, -inf and +inf together, NaN and inf together, then finite
    ones (n == 1: the mixed-inf column alone)."""
    rng = np.random.default_rng(n)
    out, k, group = 30, 128, 32
    codes = rng.integers(0, 16, (out, k))
    scale = np.full((out, k // group), 1.0)
    mins = np.full((out, k // group), -8.0)  # w = code - 8: exact zeros at code 8
    codes[::4, 2] = 8  # 0 * inf = NaN in these rows
    codes[1::4, 9] = 8
    codes[:10, 2] = rng.integers(9, 16, 10)  # rows where -inf at 2 and +inf at 9 ...
    codes[:10, 9] = rng.integers(9, 16, 10)  # ... meet positive weights (NaN)
    codes[10:20, 2] = rng.integers(0, 8, 10)  # rows where they agree (+inf)
    codes[10:20, 9] = rng.integers(9, 16, 10)
    codes[20:25, 2] = 12  # and rows where they agree on -inf (w = 4 at 2, -5 at 9)
    codes[20:25, 9] = 3
    entry = {"q4": K4.pack_codes(jnp.asarray(codes)), "scale": jnp.asarray(scale, jnp.float16),
             "min": jnp.asarray(mins, jnp.float16)}
    x = rng.standard_normal((k, n)).astype(np.float32)
    touched = put_nonfinite(x)
    return entry, x, touched


@pytest.mark.parametrize("n", [1, 6])
def test_int4_matmul_propagates_nonfinite(n):
    """NaN/inf activations give what float arithmetic gives through the kernel's dispatch: NaN in
    every output of a NaN column, +-inf or NaN row by row in an inf column (weight signs,
    0 * inf), and the other columns finite and within the kernel's bound."""
    _need_kernel()
    entry, x, n_bad = _nonfinite_case(n)
    got = _product(entry, x, kernel=True)
    want = _reference(entry, x)
    assert_nonfinite_as_float(got, want, n_bad)
    fin = np.s_[:, n_bad:]
    assert np.all(np.abs(got[fin] - want[fin]) <= _bound(entry, x[fin]))


@pytest.mark.parametrize("n", [1, 3, 64])
def test_int4_matmul_dispatch_runs_the_kernel(n):
    """On CPU the decoder's entry point lowers to the kernel (one custom call) and matches the
    reference within the kernel's bound; bfloat16 activations are taken as float32."""
    _need_kernel()
    assert K4.int4_kernel_used()
    rng = np.random.default_rng(n)
    entry = _entry(rng, 45, 192, 64)
    assert K4.int4_kernel_used(entry)
    x = rng.standard_normal((192, n)).astype(np.float32)
    got = _product(entry, x, kernel=True)
    assert np.all(np.abs(got - _reference(entry, x)) <= _bound(entry, x))
    xb = jnp.asarray(x, jnp.bfloat16)
    xf = np.asarray(xb.astype(jnp.float32))
    got_b = np.asarray(_dispatch()(entry, xb))
    assert np.all(np.abs(got_b - _reference(entry, xf)) <= _bound(entry, xf))


@pytest.mark.parametrize("why", ["group", "unavailable"])
def test_int4_matmul_falls_back_to_xla(monkeypatch, why):
    """Where the kernel does not run (a group size it does not take, G = 16 or 96; or no kernel
    built) the entry point lowers to no kernel call and gives the oracle's float32 product,
    NaN/inf included."""
    rng = np.random.default_rng(5)
    if why == "group":
        entries = [_entry(rng, 20, 96, 16), _entry(rng, 20, 192, 96)]
        for entry in entries:
            assert not cpu_int8.int4_kernel_takes(entry) and not K4.int4_kernel_used(entry)
    else:
        monkeypatch.setattr(cpu_int8, "int8_matmul_available", lambda: False)
        monkeypatch.setattr(cpu_int8, "cpu_kernels_ready", lambda: False)
        assert not K4.int4_kernel_used()
        entries = [_entry(rng, 20, 128, 32)]
    for entry in entries:
        k = 2 * entry["q4"].shape[1]
        x = rng.standard_normal((k, 3)).astype(np.float32)
        x[4, 0] = np.nan
        x[7, 1] = np.inf
        got = _product(entry, x, kernel=False)
        want = _reference(entry, x)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        q, scale, mins = _parts(entry)
        magnitude = (np.abs(scale) * q + np.abs(mins)) @ np.abs(x[:, 2:].astype(np.float64))
        assert np.all(np.abs(got[:, 2:] - want[:, 2:]) <= 2e-5 * magnitude)


def test_int4_kernel_rejects_bad_layouts():
    """The kernel itself refuses a group size it has no loops for, and an instruction set the CPU
    lacks is refused rather than run (the dispatch never asks for either)."""
    _need_kernel()
    rng = np.random.default_rng(0)
    entry = _entry(rng, 8, 96, 16)
    x = jnp.ones((96, 1), jnp.float32)
    with pytest.raises(Exception, match="G = 32 or a multiple of 64"):
        np.asarray(cpu_int8.kernel_int4_matmul(entry["q4"], entry["scale"], entry["min"], x))
    if cpu_int8.int4_isa() != "avx512vnni":
        entry = _entry(rng, 8, 64, 32)
        with pytest.raises(Exception, match="no AVX-512 VNNI"):
            np.asarray(cpu_int8.kernel_int4_matmul(entry["q4"], entry["scale"], entry["min"], x[:64], isa="avx512vnni"))


def test_int4_kernel_benchmark_smoke():
    """benchmarks.int4_kernel runs (small shapes) and prints a machine line per variant."""
    _need_kernel()
    res = subprocess.run([sys.executable, "-m", "benchmarks.int4_kernel", "--quick"], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("int4-kernel ")]
    variants = {re.search(r"variant=(\S+)", line).group(1) for line in lines}
    assert {"int4", "int8", "float32"} <= variants, res.stdout
    assert all("GB_per_s=" in line and "ms=" in line for line in lines)
