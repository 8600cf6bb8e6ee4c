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

// Software prefetch of the nibbles 16 KiB ahead of the row being read, into L2. A tile walks R rows
// side by side, block by block, so every 4 KiB page of nibbles starts a new set of short streams the
// hardware prefetcher (which stops at page boundaries) has to learn again: without this, one core
// read the released shapes' nibbles at 6 GB/s against the 16 GB/s its loops reach on cached
// weights (single-thread CPU time, AMD EPYC Zen 4, N = 2); with it, 12-14 GB/s. 8-64 KiB and the
// L1/L2/LLC hints were tried: 16 KiB into L2 was best on every shape.
constexpr int64_t kPrefetchAhead = int64_t(16) << 10;
constexpr int64_t kMinPrefetchRows = 48;  // the minimums' own prefetch (Tile): measured +5-15 %

// A hint only: never faults, so the address may lie past the end of the weights (computed as an
// integer so that no out-of-range pointer is formed). always_inline: as a plain inline function GCC
// 12 dropped the prefetches from the target-attributed tiles (seen in the object code).
inline __attribute__((always_inline)) void PrefetchAhead(const uint8_t* p, int64_t ahead) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + uintptr_t(ahead)), _MM_HINT_T1);
}

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

inline float MaxOf(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 0x55)));
}

inline float SumOf(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55)));
}

inline int32_t SumOf(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

// 32 int32 values (four vectors, in order) as 32 int8 in order (saturating: the codes are within
// +-127 for finite activations).
inline __m256i Narrow(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Rounds column c (contiguous values x, k_len of them) into a, group by group, then block by block
// (64 inputs: the codes stored even inputs first, then odd ones).
void QuantizeColumn(const float* x, Activations& a, int64_t c) {
  const int64_t gp = a.groups_pad, group = a.group;
  float* step = a.step.data() + c * gp;
  std::vector<float> inv(static_cast<size_t>(a.groups + 1), 0.0f);     // 127 / amax per group
  std::vector<int32_t> qsums(static_cast<size_t>(a.groups + 1), 0);  // sum of the codes per group
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t g = 0; g < a.groups; ++g) {
    __m256 vmax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
    for (int64_t i = g * group; i < (g + 1) * group; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));  // NaN may be dropped; such columns are replaced
      vsum = _mm256_add_ps(vsum, v);
    }
    const float amax = MaxOf(vmax);
    a.sum[c * gp + g] = SumOf(vsum);
    if (amax > 0.0f && amax <= 3.4028235e38f) {
      // 127 / amax overflows float32 below amax ~ 3.7e-37: such groups use the largest finite
      // factor and its reciprocal as the step (subnormal: fewer significant bits).
      const double factor = double(kActivationMax) / double(amax);
      inv[g] = factor <= 3.4028235e38 ? float(factor) : 3.4028235e38f;
      step[g] = factor <= 3.4028235e38 ? amax / kActivationMax : float(1.0 / 3.4028235e38);
    } else {
      inv[g] = 0.0f;  // all zero (or non-finite: the caller replaces the column)
      step[g] = 0.0f;
    }
  }
  int8_t* q = a.q.data() + c * a.k_pad;
  const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i even_odd = _mm256_setr_m128i(split, split);
  for (int64_t b = 0; b * 64 < a.k_len; ++b) {
    // The block's group: one (G a multiple of 64), or two (G = 32: inputs 0..31 and 32..63).
    const int64_t g = group == 32 ? 2 * b : b * 64 / group, g_hi = group == 32 ? g + 1 : g;
    __m256i v[8];
    for (int j = 0; j < 8; ++j) {
      const int64_t i = b * 64 + j * 8;
      v[j] = i < a.k_len  // else the zero half of a last block of 32 inputs
                 ? _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(inv[j < 4 ? g : g_hi])))
                 : _mm256_setzero_si256();
    }
    const __m256i s_lo = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
    const __m256i s_hi = _mm256_add_epi32(_mm256_add_epi32(v[4], v[5]), _mm256_add_epi32(v[6], v[7]));
    if (g_hi != g) {
      qsums[g] += SumOf(s_lo);
      qsums[g_hi] += SumOf(s_hi);
    } else {
      qsums[g] += SumOf(_mm256_add_epi32(s_lo, s_hi));
    }
    // In order: inputs 0..31 and 32..63; each lane's bytes split into its 8 even, then 8 odd inputs.
    const __m256i lo = _mm256_shuffle_epi8(Narrow(v[0], v[1], v[2], v[3]), even_odd);
    const __m256i hi = _mm256_shuffle_epi8(Narrow(v[4], v[5], v[6], v[7]), even_odd);
    // 64-bit pieces (e: even, o: odd): lo = [e0-15, o0-15, e16-31, o16-31] -> [e0-31 | o0-31].
    const __m256i lo2 = _mm256_permute4x64_epi64(lo, 0xD8), hi2 = _mm256_permute4x64_epi64(hi, 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * 64), _mm256_permute2x128_si256(lo2, hi2, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * 64 + 32), _mm256_permute2x128_si256(lo2, hi2, 0x31));
  }
  for (int64_t g = 0; g < a.groups; ++g)
    a.centre[c * gp + g] = float(kCodeMiddle * (double(a.sum[c * gp + g]) - double(step[g]) * double(qsums[g])));
}

// Columns [c0, c1) of x (K, N), row-major: each gathered into a contiguous copy (unless N = 1) and rounded.
void QuantizeColumns(const float* x, Activations& a, int64_t c0, int64_t c1) {
  if (a.n == 1) {
    QuantizeColumn(x, a, 0);
    return;
  }
  std::vector<float> column(static_cast<size_t>(a.k_len));
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t k = 0; k < a.k_len; ++k) column[k] = x[k * a.n + c];
    QuantizeColumn(column.data(), a, c);
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
  // A decode step's few columns on this thread; many (prefill, big batches) a piece of >= 64K
  // activations per task over the pool.
  const int64_t per_piece = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(k_len, 1));
  const int64_t pieces = (n + per_piece - 1) / per_piece;
  if (pieces <= 1) {
    QuantizeColumns(x, a, 0, n);
  } else {
    Activations* ap = &a;
    mvjax::ParallelFor(pool, pieces, [=](int64_t i) {
      QuantizeColumns(x, *ap, i * per_piece, std::min(n, (i + 1) * per_piece));
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
