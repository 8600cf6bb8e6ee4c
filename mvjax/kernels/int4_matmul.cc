// y[o, c] = sum_k (scale[o, k / G] * code[o, k] + min[o, k / G]) * x[k, c]: group-wise 4-bit weights
// (q4 uint8 (O, K / 2): code of input k in the low nibble of byte k / 2 for even k, the high one for
// odd k; scale and min float16 (O, K / G)) times float32 activations x (K, N) -> float32 y (O, N).
//
// The activations are rounded per column and group of G inputs to int8 xq (|xq| <= 127, step = the
// group's largest magnitude / 127), each group's code . xq dot product is exact in int32 (AVX2
// vpmaddubsw + vpmaddwd, or AVX-512 VNNI vpdpbusd where the CPU has it), and per group
//   sum_i (scale * code_i + min) * x_i
//     ~= scale * (step * dot + 7.5 * (sum_i x_i - step * sum_i xq_i)) + min * sum_i x_i,
// which is exact but for sum_i (code_i - 7.5) * (step * xq_i - x_i): the rounding meets only the
// codes' distance from their middle (<= 7.5, not <= 15), and the minimum meets the float sum of
// the unrounded activations. Every weight row is read once, unpacked in registers, for all N
// columns; rows are split over XLA's intra-op thread pool.
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kActivationMax = 127.0f;  // int8 activations, symmetric (never -128)
constexpr double kCodeMiddle = 7.5;       // codes 0..15

struct Weights {
  const uint8_t* q4;     // (out, k_len / 2)
  const uint16_t* scale;  // float16 bits (out, groups)
  const uint16_t* min;    // float16 bits (out, groups)
  int64_t out, k_len, groups, group;
};

// The activations as the tiles read them, per column: int8 codes in blocks of 64 inputs (the 32
// even ones, then the 32 odd ones; zeros past k_len), and per group the rounding step, the float32
// sum of the unrounded values and 7.5 times what rounding took from that sum. Groups past the end
// (up to groups_pad, a multiple of 8 with at least one spare) hold 0, so tiles may read eight
// groups at a time and G = 32 tails may read the group after the last.
struct Activations {
  int64_t n, k_len, k_pad, groups, groups_pad, group;
  std::vector<int8_t> q;      // (n, k_pad)
  std::vector<float> step;    // (n, groups_pad)
  std::vector<float> sum;     // (n, groups_pad)
  std::vector<float> centre;  // (n, groups_pad): 7.5 * (sum - step * sum of the codes)
};

// Where input k sits in a column's codes.
inline int64_t CodePosition(int64_t k) { return (k & ~int64_t(63)) + (k & 1) * 32 + ((k & 63) >> 1); }

// Groups [g0, g1) of every column of x (K, N), row-major: the columns are the fast axis, so each
// pass reads rows of x front to back.
void QuantizeGroups(const float* x, Activations& a, int64_t g0, int64_t g1) {
  const int64_t n = a.n, gp = a.groups_pad;
  std::vector<float> amax(static_cast<size_t>(n));
  std::vector<double> sum(static_cast<size_t>(n));
  std::vector<double> inv(static_cast<size_t>(n));
  std::vector<int64_t> qsum(static_cast<size_t>(n));
  for (int64_t g = g0; g < g1; ++g) {
    std::fill(amax.begin(), amax.end(), 0.0f);
    std::fill(sum.begin(), sum.end(), 0.0);
    for (int64_t k = g * a.group; k < (g + 1) * a.group; ++k) {
      const float* row = x + k * n;
      for (int64_t c = 0; c < n; ++c) {
        amax[c] = std::max(amax[c], std::fabs(row[c]));  // NaN is skipped; the caller replaces such columns
        sum[c] += row[c];
      }
    }
    for (int64_t c = 0; c < n; ++c) {
      // 127 / amax in double: finite for any positive float amax, so every group's codes reach +-127.
      // (Below ~1e-36 the float32 step itself has fewer significant bits.)
      const bool finite = amax[c] > 0.0f && amax[c] <= 3.4e38f;
      inv[c] = finite ? double(kActivationMax) / double(amax[c]) : 0.0;
      a.step[c * gp + g] = finite ? amax[c] / kActivationMax : 0.0f;
      a.sum[c * gp + g] = float(sum[c]);
    }
    std::fill(qsum.begin(), qsum.end(), 0);
    for (int64_t k = g * a.group; k < (g + 1) * a.group; ++k) {
      const float* row = x + k * n;
      const int64_t pos = CodePosition(k);
      for (int64_t c = 0; c < n; ++c) {
        // fmax/fmin drop NaN (inf * 0 in a non-finite column): the codes stay in range either way.
        const double v = std::fmin(std::fmax(double(row[c]) * inv[c], -127.0), 127.0);
        const int8_t q = int8_t(std::nearbyint(v));
        a.q[c * a.k_pad + pos] = q;
        qsum[c] += q;
      }
    }
    for (int64_t c = 0; c < n; ++c)
      a.centre[c * gp + g] = float(kCodeMiddle * (sum[c] - double(a.step[c * gp + g]) * double(qsum[c])));
  }
}

Activations Quantize(ffi::ThreadPool& pool, const float* x, int64_t k_len, int64_t n, int64_t group) {
  Activations a;
  a.n = n;
  a.k_len = k_len;
  a.k_pad = (k_len + 63) / 64 * 64;
  a.group = group;
  a.groups = k_len / group;
  a.groups_pad = (a.groups + 1 + 7) / 8 * 8;
  a.q.assign(size_t(n * a.k_pad), 0);
  a.step.assign(size_t(n * a.groups_pad), 0.0f);
  a.sum.assign(size_t(n * a.groups_pad), 0.0f);
  a.centre.assign(size_t(n * a.groups_pad), 0.0f);
  // Small inputs (a decode step's few columns) on this thread; large ones (prefill, big batches)
  // in pieces of >= 32K activations over the pool.
  const int64_t per_piece = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(group * n, 1));
  const int64_t pieces = (a.groups + per_piece - 1) / per_piece;
  if (pieces <= 1) {
    QuantizeGroups(x, a, 0, a.groups);
  } else {
    Activations* ap = &a;
    mvjax::ParallelFor(pool, pieces, [=](int64_t i) {
      QuantizeGroups(x, *ap, i * per_piece, std::min(ap->groups, (i + 1) * per_piece));
    });
  }
  return a;
}

}  // namespace

// The tiles, once per instruction set.
#define MVJAX_INT4_TARGET __attribute__((target("avx2,fma,f16c")))
#define MVJAX_INT4_INLINE inline __attribute__((always_inline)) MVJAX_INT4_TARGET
#define MVJAX_INT4_VNNI 0
namespace mvjax_int4_avx2 {
namespace {
#include "int4_matmul_tile.h"
}  // namespace
}  // namespace mvjax_int4_avx2
#undef MVJAX_INT4_TARGET
#undef MVJAX_INT4_INLINE
#undef MVJAX_INT4_VNNI

#define MVJAX_INT4_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define MVJAX_INT4_INLINE inline __attribute__((always_inline)) MVJAX_INT4_TARGET
#define MVJAX_INT4_VNNI 1
namespace mvjax_int4_vnni {
namespace {
#include "int4_matmul_tile.h"
}  // namespace
}  // namespace mvjax_int4_vnni
#undef MVJAX_INT4_TARGET
#undef MVJAX_INT4_INLINE
#undef MVJAX_INT4_VNNI

namespace {

// AVX-512 VNNI on 256-bit vectors, with the OS saving the AVX-512 state (the builtin checks both).
bool HasVnni() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return ok;
}

enum Isa : int32_t { kAuto = 0, kAvx2 = 1, kVnni = 2 };

using RowsFn = void (*)(const Weights&, const Activations&, int64_t, int64_t, float*);

RowsFn PickRows(bool vnni, bool split) {
  if (vnni) return split ? mvjax_int4_vnni::Rows<true> : mvjax_int4_vnni::Rows<false>;
  return split ? mvjax_int4_avx2::Rows<true> : mvjax_int4_avx2::Rows<false>;
}

ffi::Error Int4Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> q4, ffi::Buffer<ffi::F16> scale,
                      ffi::Buffer<ffi::F16> mins, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                      int32_t isa) {
  const auto qd = q4.dimensions();
  const auto sd = scale.dimensions();
  const auto md = mins.dimensions();
  const auto xd = x.dimensions();
  const bool shapes = qd.size() == 2 && sd.size() == 2 && md.size() == 2 && xd.size() == 2 && sd[0] == qd[0] &&
                      md[0] == sd[0] && md[1] == sd[1] && xd[0] == 2 * qd[1] &&
                      int64_t(y->element_count()) == qd[0] * xd[1];
  const int64_t out = shapes ? qd[0] : 0, k_len = shapes ? xd[0] : 0, groups = shapes ? sd[1] : 0;
  const int64_t group = groups > 0 ? k_len / groups : 0;
  if (!shapes || (k_len > 0 && (groups == 0 || k_len % groups != 0 || (group != 32 && group % 64 != 0)))) {
    return ffi::Error::InvalidArgument(
        "mvjax_int4_matmul: q4 (O, K/2) uint8, scale and min (O, K/G) float16 with G = 32 or a multiple of 64, "
        "x (K, N) float32 -> y (O, N)");
  }
  if (isa != kAuto && isa != kAvx2 && isa != kVnni)
    return ffi::Error::InvalidArgument("mvjax_int4_matmul: isa is 0 (best), 1 (AVX2) or 2 (AVX-512 VNNI)");
  if (isa == kVnni && !HasVnni())
    return ffi::Error::InvalidArgument("mvjax_int4_matmul: this CPU has no AVX-512 VNNI");
  const int64_t n = xd[1];
  float* yp = y->typed_data();
  if (out == 0 || n == 0) return ffi::Error::Success();
  if (k_len == 0) {
    std::fill(yp, yp + out * n, 0.0f);
    return ffi::Error::Success();
  }

  const Activations a = Quantize(pool, x.typed_data(), k_len, n, group);
  const Weights w{q4.typed_data(), scale.typed_data(), mins.typed_data(), out, k_len, groups, group};
  const RowsFn rows = PickRows(isa == kVnni || (isa == kAuto && HasVnni()), group == 32);

  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  // Chunks of at most ~256 KiB of nibbles (they stay in L2 while every column group passes), at
  // least 8 per thread for balance, a multiple of 12 rows (every row tile divides it).
  const int64_t by_cache = std::max<int64_t>(12, (int64_t(256) << 10) / std::max<int64_t>(k_len / 2, 1));
  const int64_t by_threads = std::max<int64_t>(12, out / (threads * 8));
  const int64_t chunk = std::max<int64_t>(12, std::min(by_cache, by_threads) / 12 * 12);
  const int64_t chunks = (out + chunk - 1) / chunk;
  const Activations* ap = &a;
  const Weights* wp = &w;
  mvjax::ParallelFor(pool, chunks, [=](int64_t i) { rows(*wp, *ap, i * chunk, std::min(out, (i + 1) * chunk), yp); });
  return ffi::Error::Success();
}

}  // namespace

// The instruction set the kernel's automatic choice uses here: 2 (AVX-512 VNNI) or 1 (AVX2).
extern "C" int MvjaxInt4Isa() { return HasVnni() ? kVnni : kAvx2; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(MvjaxInt4Matmul, Int4Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa"));
