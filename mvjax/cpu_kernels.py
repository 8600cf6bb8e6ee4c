"""A CPU kernel for int8 weight-only matmuls, built on first use with the system C++ compiler.

Why: XLA's CPU backend (jaxlib 0.10) cannot dequantise int8 weights inside a dot. For
``jnp.dot(w_int8.astype(f32), x)`` it materialises the whole float32 copy of ``w`` before
the dot (every decode step, 2x slower than plain float32); ``dot(int8, int8) -> int32``
runs in YNNPACK with kernels that vectorise along the (tiny) activation dimension and
gains little. Measurements: benchmarks/RESULTS.md, "int8 first stage".

The kernel computes ``y (O, N) = wscale[:, None] * (w (O, K) @ xq.T) * xscale[None, :]`` with
``w`` int8 and ``xq`` (N, K) int16: activations are rounded per column to 15 bits
(|q| <= 16383, relative error <= 3e-5 of the column's largest value, ~100x below the int8
weight error), products are accumulated exactly in int32 (AVX2 ``vpmaddwd``) and converted
to float32 once per output. Each weight row is streamed once for all N columns; rows are
split over XLA's intra-op thread pool. Needs x86-64 with AVX2 and FMA, Linux, and a C++17
compiler (``$CXX``, else ``c++``/``g++``/``clang++``); the shared library is cached under
``$MVJAX_CACHE/kernels`` (default ``~/.cache/mvjax``), keyed by the source, jaxlib version
and compiler. Where it cannot be built :func:`int8_matmul_available` is False and callers use
plain XLA (:func:`mvjax.quantize.int8_matmul_xla`). ``MVJAX_CPU_KERNELS=0`` disables it.
Activation columns holding NaN or inf cannot be rounded to integers; their outputs are
recomputed in float32 so they propagate as in a float matmul (:func:`int8_matmul`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

log = logging.getLogger("mvjax")

TARGET = "mvjax_int8_matmul"
ACTIVATION_MAX = 16383  # int16 activations: |q| <= 2**14 - 1 keeps every int32 lane exact for 4096-long blocks

_SOURCE = r"""
// y[o, c] = wscale[o] * xscale[c] * sum_k w[o, k] * xq[c, k]   (w int8 (O, K), xq int16 (N, K))
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// int32 lanes stay exact: each lane sums 2 * 4096 / 16 products of |w| <= 127, |x| <= 16383 per block.
constexpr int64_t kBlockK = 4096;

inline int64_t HorizontalSum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// An R x C register tile: R weight rows (stride k_len) against C activation columns (stride
// k_len); every loaded weight vector meets C columns and every activation vector R rows, so
// the loads per multiply-add fall as the tile grows (R * C + R + 1 <= 16 ymm registers).
template <int R, int C>
void Tile(const int8_t* w, const int16_t* x, int64_t k_len, const float* wscale, const float* xscale,
          float* y, int64_t y_stride) {
  int64_t total[R][C] = {};
  for (int64_t kb = 0; kb < k_len; kb += kBlockK) {
    const int64_t ke = std::min(k_len, kb + kBlockK);
    __m256i acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_si256();
    int64_t k = kb;
    for (; k + 16 <= ke; k += 16) {
      __m256i wv[R];
      for (int r = 0; r < R; ++r)
        wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * k_len + k)));
      for (int c = 0; c < C; ++c) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + c * k_len + k));
        for (int r = 0; r < R; ++r) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(wv[r], xv));
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) {
        int64_t s = HorizontalSum(acc[r][c]);
        for (int64_t j = k; j < ke; ++j) s += int64_t(w[r * k_len + j]) * int64_t(x[c * k_len + j]);
        total[r][c] += s;
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * y_stride + c] = float(total[r][c]) * wscale[r] * xscale[c];
}

// Rows [o0, o1) against columns [c0, c0 + C): the widest row tile that fits the registers,
// single rows for the remainder.
template <int R, int C>
void RowsForColumns(const int8_t* w, const float* wscale, const int16_t* x, const float* xscale, float* y,
                    int64_t k_len, int64_t n, int64_t o0, int64_t o1, int64_t c0) {
  int64_t o = o0;
  for (; o + R <= o1; o += R)
    Tile<R, C>(w + o * k_len, x + c0 * k_len, k_len, wscale + o, xscale + c0, y + o * n + c0, n);
  for (; o < o1; ++o)
    Tile<1, C>(w + o * k_len, x + c0 * k_len, k_len, wscale + o, xscale + c0, y + o * n + c0, n);
}

// One chunk of rows (sized to stay in L2) against every column, four columns at a time: the
// chunk comes from memory once and is re-read from cache for each group of columns.
void Rows(const int8_t* w, const float* wscale, const int16_t* x, const float* xscale, float* y,
          int64_t k_len, int64_t n, int64_t o0, int64_t o1) {
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) RowsForColumns<2, 4>(w, wscale, x, xscale, y, k_len, n, o0, o1, c);
  switch (n - c) {
    case 3: RowsForColumns<3, 3>(w, wscale, x, xscale, y, k_len, n, o0, o1, c); break;
    case 2: RowsForColumns<4, 2>(w, wscale, x, xscale, y, k_len, n, o0, o1, c); break;
    case 1: RowsForColumns<6, 1>(w, wscale, x, xscale, y, k_len, n, o0, o1, c); break;
    default: break;
  }
}

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> running{0};
  std::mutex mu;
  std::condition_variable done;
};

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> wscale,
                      ffi::Buffer<ffi::S16> x, ffi::Buffer<ffi::F32> xscale, ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  const auto xd = x.dimensions();
  if (wd.size() != 2 || xd.size() != 2 || wd[1] != xd[1] || int64_t(wscale.element_count()) != wd[0] ||
      int64_t(xscale.element_count()) != xd[0] || int64_t(y->element_count()) != wd[0] * xd[0]) {
    return ffi::Error::InvalidArgument("mvjax_int8_matmul: w (O, K), wscale (O,), x (N, K), xscale (N,) -> y (O, N)");
  }
  const int64_t out = wd[0], k_len = wd[1], n = xd[0];
  const int8_t* wp = w.typed_data();
  const float* wsp = wscale.typed_data();
  const int16_t* xp = x.typed_data();
  const float* xsp = xscale.typed_data();
  float* yp = y->typed_data();
  if (out == 0 || n == 0) return ffi::Error::Success();

  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  // Chunks of at most ~256 KiB of weights (they stay in L2 while every column group passes),
  // at least 8 per thread for balance, a multiple of 12 rows (every row tile divides it).
  const int64_t by_cache = std::max<int64_t>(12, (int64_t(256) << 10) / std::max<int64_t>(k_len, 1));
  const int64_t by_threads = std::max<int64_t>(12, out / (threads * 8));
  const int64_t chunk = std::max<int64_t>(12, std::min(by_cache, by_threads) / 12 * 12);
  const int64_t chunks = (out + chunk - 1) / chunk;
  const int64_t helpers = std::min<int64_t>(threads - 1, chunks - 1);
  auto shared = std::make_shared<Shared>();
  auto work = [=](Shared* s) {
    for (int64_t i = s->next.fetch_add(1); i < chunks; i = s->next.fetch_add(1)) {
      Rows(wp, wsp, xp, xsp, yp, k_len, n, i * chunk, std::min(out, (i + 1) * chunk));
    }
  };
  // Helpers that start after the caller has taken every chunk find no work; the caller
  // only waits for helpers still inside a chunk (the shared state outlives the call).
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([shared, work]() {
      shared->running.fetch_add(1);
      work(shared.get());
      if (shared->running.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->done.notify_all();
      }
    });
  }
  work(shared.get());
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->done.wait(lock, [&] { return shared->running.load() == 0; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MvjaxInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
"""

_lock = threading.Lock()
_state: dict = {}


def _cpu_has_avx2_fma() -> bool:
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return {"avx2", "fma"} <= flags
    return False


def _compiler() -> Optional[str]:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    return None


_CXXFLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w")


def _build(cache: Path, compiler: str) -> Path:
    import jaxlib

    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([_SOURCE, jaxlib.__version__, compiler, *_CXXFLAGS]).encode()).hexdigest()[:16]
    lib = cache / "kernels" / key / "libmvjax_int8.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src = Path(tmp) / "int8_matmul.cc"
        src.write_text(_SOURCE)
        out = Path(tmp) / lib.name
        res = subprocess.run([compiler, *_CXXFLAGS, f"-I{include}", str(src), "-o", str(out)],
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {res.stderr.strip()[-2000:]}")
        os.replace(out, lib)  # atomic: concurrent builders write the same bytes
    return lib


def int8_matmul_available() -> bool:
    """Whether the CPU int8 kernel is built and registered (built on the first call)."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        ok, why = False, ""
        if os.environ.get("MVJAX_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
            why = "disabled by MVJAX_CPU_KERNELS"
        elif not _cpu_has_avx2_fma():
            why = "needs an x86-64 Linux CPU with AVX2 and FMA"
        elif (compiler := _compiler()) is None:
            why = "no C++ compiler found (set CXX)"
        else:
            try:
                from mvjax.models import cache_root

                lib = ctypes.cdll.LoadLibrary(str(_build(cache_root(), compiler)))
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MvjaxInt8Matmul), platform="cpu")
                _state["lib"] = lib  # keep the handle alive
                ok = True
            except Exception as exc:  # noqa: BLE001 - any failure means: use the XLA path
                why = f"build failed: {exc}"
        if not ok:
            log.warning("int8 CPU kernel unavailable (%s); int8 weights are dequantised by XLA instead, "
                        "which is slower than float32 on CPU", why)
        _state["ok"], _state["why"] = ok, why
        return ok


def quantize_activations(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x (K, N) float -> (int16 (N, K), float32 scale (N,)): per column, |q| <= ACTIVATION_MAX.
    A column holding NaN or inf has no meaningful scale (its codes are 0 or garbage);
    :func:`int8_matmul` replaces that column's outputs."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=0)
    scale = jnp.where(amax > 0, amax / ACTIVATION_MAX, 1.0)
    q = jnp.round(x / scale[None, :]).astype(jnp.int16)
    return q.T, scale


def _float_for_nonfinite_columns(w: jnp.ndarray, wscale: jnp.ndarray, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """``y`` with every column whose activations hold NaN or inf replaced by the float32 product.

    Integer codes cannot carry NaN/inf: such a column would come out as finite garbage (NaN:
    the scale falls back to 1.0) or NaN everywhere (inf: the scale is inf). A float matmul
    gives NaN for a NaN column and, for an inf column, +-inf or NaN row by row (signs of the
    weights met, ``0 * inf``), never a finite value. The exact float result costs a float32
    copy of ``w`` (what the kernel avoids), so it runs under ``lax.cond`` only when some column
    is non-finite; the usual step pays one ``isfinite`` pass over ``x`` (K x N, tiny next to
    the O x K weights) and the branch. (Under ``vmap`` with a batched predicate ``cond`` becomes
    a select that runs both branches; the decoder batches along N instead.)"""
    bad = jnp.any(~jnp.isfinite(x), axis=0)

    def patch(y):
        from mvjax.quantize import int8_matmul_xla

        exact = int8_matmul_xla(w, wscale, jnp.where(bad[None, :], x, jnp.zeros((), x.dtype)))
        return jnp.where(bad[None, :], exact, y)

    return jax.lax.cond(jnp.any(bad), patch, lambda y: y, y)


def int8_matmul(w: jnp.ndarray, wscale: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """``(w * wscale[:, None]) @ x`` for int8 ``w`` (O, K) and float ``x`` (K, N) -> float32 (O, N),
    through the CPU kernel (call :func:`int8_matmul_available` first). Columns of ``x`` with
    NaN/inf give what the float32 product gives (:func:`_float_for_nonfinite_columns`)."""
    xq, xscale = quantize_activations(x)
    out = jax.ShapeDtypeStruct((w.shape[0], x.shape[1]), jnp.float32)
    wscale = wscale.astype(jnp.float32)
    y = jax.ffi.ffi_call(TARGET, out)(w, wscale, xq, xscale)
    return _float_for_nonfinite_columns(w, wscale, x, y)
