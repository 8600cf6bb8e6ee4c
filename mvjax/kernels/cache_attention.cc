// One decode step's attention over the KV cache (float32, bf16 stored as its uint16 bits, or int8 with a float32 scale per
// row, head and position), reading the stored keys and values directly:
//   y[r, h, :] = sum_s p[s] v[r, h, :, s],  p = softmax_s(scale * q[r, h, :] . k[r, h, :, s]),
// over the slots s <= pos[r] inside the first `window` positions. Cache layout: (R, H, D, S),
// positions last; scales (R, H, S). Work items are (row, head) pairs, split over XLA's
// intra-op thread pool.
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

// Eight stored values from p as float32.
inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const uint16_t* p) {  // bfloat16: the high half of a float32
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline __m256 Load8(const int8_t* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}
inline float Load1(const float* p) { return *p; }
inline float Load1(const uint16_t* p) {
  const uint32_t bits = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float Load1(const int8_t* p) { return float(*p); }

inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0, eight lanes: 2^n * e^r with |r| <= ln2 / 2 (Cody-Waite split of ln 2) and a
// degree-6 polynomial for e^r (relative error ~2e-7); lanes below -87 give 0.
inline __m256 Exp8(__m256 x) {
  const __m256 too_small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(1.0f / 720);
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f / 120));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f / 24));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f / 6));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(0.5f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(poly, _mm256_castsi256_ps(exponent));
  return _mm256_andnot_ps(too_small, result);
}

inline float Exp1(float x) { return x < -87.0f ? 0.0f : std::exp(x); }

// scores[s] = sum_d q[d] * k[d * stride + s] for s < n. Four key rows at a time are streamed
// front to back (contiguous reads the prefetcher follows) into the scores, which stay in L1.
template <typename T>
void Scores(const float* q, const T* k, int64_t d_len, int64_t stride, int64_t n, float* scores) {
  std::fill(scores, scores + n, 0.0f);
  int64_t d = 0;
  for (; d + 4 <= d_len; d += 4) {
    const T* r0 = k + d * stride;
    const T* r1 = r0 + stride;
    const T* r2 = r1 + stride;
    const T* r3 = r2 + stride;
    const __m256 q0 = _mm256_set1_ps(q[d]), q1 = _mm256_set1_ps(q[d + 1]);
    const __m256 q2 = _mm256_set1_ps(q[d + 2]), q3 = _mm256_set1_ps(q[d + 3]);
    int64_t s = 0;
    for (; s + 8 <= n; s += 8) {
      __m256 acc = _mm256_loadu_ps(scores + s);
      acc = _mm256_fmadd_ps(q0, Load8(r0 + s), acc);
      acc = _mm256_fmadd_ps(q1, Load8(r1 + s), acc);
      acc = _mm256_fmadd_ps(q2, Load8(r2 + s), acc);
      acc = _mm256_fmadd_ps(q3, Load8(r3 + s), acc);
      _mm256_storeu_ps(scores + s, acc);
    }
    for (; s < n; ++s)
      scores[s] += q[d] * Load1(r0 + s) + q[d + 1] * Load1(r1 + s) + q[d + 2] * Load1(r2 + s) +
                   q[d + 3] * Load1(r3 + s);
  }
  for (; d < d_len; ++d) {
    const T* row = k + d * stride;
    const __m256 qd = _mm256_set1_ps(q[d]);
    int64_t s = 0;
    for (; s + 8 <= n; s += 8)
      _mm256_storeu_ps(scores + s, _mm256_fmadd_ps(qd, Load8(row + s), _mm256_loadu_ps(scores + s)));
    for (; s < n; ++s) scores[s] += q[d] * Load1(row + s);
  }
}

// weights[s] <- exp(weights[s] - max) / sum (times vscale[s] when given), s < n.
void Softmax(float* w, int64_t n, const float* vscale) {
  float top = -INFINITY;
  for (int64_t s = 0; s < n; ++s) top = std::max(top, w[s]);
  const __m256 top8 = _mm256_set1_ps(top);
  __m256 total8 = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(w + s), top8));
    _mm256_storeu_ps(w + s, e);
    total8 = _mm256_add_ps(total8, e);
  }
  float total = Sum8(total8);
  for (; s < n; ++s) {
    w[s] = Exp1(w[s] - top);
    total += w[s];
  }
  const float inv = 1.0f / total;
  for (s = 0; s < n; ++s) w[s] *= vscale == nullptr ? inv : inv * vscale[s];
}

// out[d] = sum_{s < n} w[s] * v[d * stride + s]: four value rows at a time, sharing each load of w.
template <typename T>
void Mix(const float* w, const T* v, int64_t d_len, int64_t stride, int64_t n, float* out) {
  int64_t d = 0;
  for (; d + 4 <= d_len; d += 4) {
    const T* r0 = v + d * stride;
    const T* r1 = r0 + stride;
    const T* r2 = r1 + stride;
    const T* r3 = r2 + stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= n; s += 8) {
      const __m256 ws = _mm256_loadu_ps(w + s);
      a0 = _mm256_fmadd_ps(ws, Load8(r0 + s), a0);
      a1 = _mm256_fmadd_ps(ws, Load8(r1 + s), a1);
      a2 = _mm256_fmadd_ps(ws, Load8(r2 + s), a2);
      a3 = _mm256_fmadd_ps(ws, Load8(r3 + s), a3);
    }
    float t0 = Sum8(a0), t1 = Sum8(a1), t2 = Sum8(a2), t3 = Sum8(a3);
    for (; s < n; ++s) {
      t0 += w[s] * Load1(r0 + s);
      t1 += w[s] * Load1(r1 + s);
      t2 += w[s] * Load1(r2 + s);
      t3 += w[s] * Load1(r3 + s);
    }
    out[d] = t0, out[d + 1] = t1, out[d + 2] = t2, out[d + 3] = t3;
  }
  for (; d < d_len; ++d) {
    const T* row = v + d * stride;
    __m256 acc = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= n; s += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + s), Load8(row + s), acc);
    float total = Sum8(acc);
    for (; s < n; ++s) total += w[s] * Load1(row + s);
    out[d] = total;
  }
}

template <typename T>
ffi::Error Attend(ffi::ThreadPool& pool, const float* q, const T* k, const float* kscale, const T* v,
                  const float* vscale, const int32_t* pos, float* y, int64_t rows, int64_t heads, int64_t d_len,
                  int64_t length, int64_t window) {
  const float scale = 1.0f / std::sqrt(float(d_len));
  const int64_t limit = std::min(window, length);
  mvjax::ParallelFor(pool, rows * heads, [=](int64_t item) {
    thread_local std::vector<float> buffer;
    buffer.resize(size_t(d_len + limit));
    float* scratch = buffer.data();
    const int64_t r = item / heads;
    const int64_t n = std::min<int64_t>(limit, int64_t(std::max<int32_t>(pos[r], 0)) + 1);
    float* qs = scratch;  // q * scale (* the keys' per-position scales, applied to the scores)
    float* w = scratch + d_len;
    for (int64_t d = 0; d < d_len; ++d) qs[d] = q[item * d_len + d] * scale;
    const int64_t cache_at = item * d_len * length;
    Scores(qs, k + cache_at, d_len, length, n, w);
    if (kscale != nullptr)
      for (int64_t s = 0; s < n; ++s) w[s] *= kscale[item * length + s];
    Softmax(w, n, vscale == nullptr ? nullptr : vscale + item * length);
    Mix(w, v + cache_at, d_len, length, n, y + item * d_len);
  });
  return ffi::Error::Success();
}

bool Shapes(ffi::AnyBuffer::Dimensions qd, ffi::AnyBuffer::Dimensions kd, ffi::AnyBuffer::Dimensions vd,
            int64_t pos_count) {
  return qd.size() == 3 && kd.size() == 4 && vd.size() == 4 && kd[0] == qd[0] && kd[1] == qd[1] &&
         kd[2] == qd[2] && pos_count == qd[0] && std::equal(kd.begin(), kd.end(), vd.begin());
}

// A float32 or bf16 (uint16 bits) cache: the stored values are the values, no scales.
template <ffi::DataType DT, typename T>
ffi::Error PlainAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<DT> k, ffi::Buffer<DT> v,
                          ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> y, int64_t window) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (!Shapes(qd, kd, v.dimensions(), int64_t(pos.element_count())))
    return ffi::Error::InvalidArgument("mvjax cache attention: q (R, H, D), k and v (R, H, D, S), pos (R,)");
  return Attend(pool, q.typed_data(), reinterpret_cast<const T*>(k.typed_data()), nullptr,
                reinterpret_cast<const T*>(v.typed_data()), nullptr, pos.typed_data(), y->typed_data(),
                kd[0], kd[1], kd[2], kd[3], window);
}

template <ffi::DataType DT>
auto PlainBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<DT>>()
      .template Arg<ffi::Buffer<DT>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Attr<int64_t>("window");
}

ffi::Error Int8Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S8> k,
                         ffi::Buffer<ffi::F32> kscale, ffi::Buffer<ffi::S8> v, ffi::Buffer<ffi::F32> vscale,
                         ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> y, int64_t window) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const int64_t scales = kd.size() == 4 ? kd[0] * kd[1] * kd[3] : -1;
  if (!Shapes(qd, kd, v.dimensions(), int64_t(pos.element_count())) ||
      int64_t(kscale.element_count()) != scales || int64_t(vscale.element_count()) != scales)
    return ffi::Error::InvalidArgument(
        "mvjax_int8_attention: q (R, H, D), k and v (R, H, D, S) int8, their scales (R, H, S), pos (R,)");
  return Attend(pool, q.typed_data(), k.typed_data(), kscale.typed_data(), v.typed_data(), vscale.typed_data(),
                pos.typed_data(), y->typed_data(), kd[0], kd[1], kd[2], kd[3], window);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MvjaxF32Attention, (PlainAttention<ffi::F32, float>), PlainBinding<ffi::F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MvjaxBf16Attention, (PlainAttention<ffi::U16, uint16_t>), PlainBinding<ffi::U16>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MvjaxInt8Attention, Int8Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));
