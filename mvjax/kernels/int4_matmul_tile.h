// The int4 matmul's inner loops (int4_matmul.cc), compiled twice from this one text: once for AVX2
// (vpmaddubsw + vpmaddwd) and once for AVX-512 VNNI on 256-bit vectors (vpdpbusd), picked at run
// time. No include guard on purpose: int4_matmul.cc includes it inside one namespace per instruction
// set, with MVJAX_INT4_TARGET (the functions' target attribute) and MVJAX_INT4_VNNI (0 or 1) set.
//
// Layouts (int4_matmul.cc builds the activation side, Weights and Activations are defined there):
// a row's nibbles in blocks of 32 bytes = 64 inputs, byte i holding input 2i (low nibble) and
// 2i + 1 (high nibble); a column's rounded activations in blocks of 64 bytes, the 32 even inputs
// then the 32 odd ones, so the low nibbles of a block meet the first 32 bytes and the high nibbles
// the second 32 byte for byte. Either way the int32 lanes 0..3 of a block's dot product sum
// inputs 0..31 of the block and lanes 4..7 inputs 32..63: one group (G a multiple of 64) or two
// (G = 32, one per 128-bit half).

// acc + the 64 products of a block: codes (lo: even inputs, hi: odd, unsigned 0..15) times the
// column's int8 activations at x (64 bytes). Exact: a byte pair sums to <= 2 * 15 * 127 (int16).
MVJAX_INT4_INLINE __m256i DotBlock(__m256i acc, __m256i lo, __m256i hi, const int8_t* x) {
  const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
#if MVJAX_INT4_VNNI
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, lo, even), hi, odd);
#else
  // Two pair sums per int16 lane: <= 4 * 15 * 127 = 7620, still exact.
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

MVJAX_INT4_INLINE float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

// Eight float16 values from p (count < 8: the rest read as 0) as float32.
MVJAX_INT4_INLINE __m256 LoadHalf8(const uint16_t* p, int64_t count) {
  if (count >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  uint16_t tmp[8] = {};
  std::memcpy(tmp, p, size_t(std::max<int64_t>(count, 0)) * sizeof(uint16_t));
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp)));
}

// A row's float16 scales as float32 in dst (padded entries 0).
MVJAX_INT4_INLINE void HalfRow(const uint16_t* src, int64_t count, float* dst, int64_t padded) {
  for (int64_t g = 0; g < padded; g += 8) _mm256_storeu_ps(dst + g, LoadHalf8(src + g, count - g));
}

// dot[r][c] += the integer dots of blocks [b0, b1) of rows q4 + r * row_bytes with columns xq[c]
// (full blocks of 32 bytes; half: one block of 16 bytes, a row's last 32 inputs).
// Each row also asks for the cache line kPrefetchAhead bytes further on (once per 64 bytes; see
// kPrefetchAhead in int4_matmul.cc for why).
template <int R, int C>
MVJAX_INT4_INLINE void AddDots(const uint8_t* q4, int64_t row_bytes, const int8_t* const* xq, int64_t b0,
                               int64_t b1, bool half, __m256i (&dot)[R][C]) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int64_t b = b0; b < b1; ++b) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = q4 + r * row_bytes + b * 32;
      if ((b & 1) == 0) PrefetchAhead(p, kPrefetchAhead);
      const __m256i v = half ? _mm256_inserti128_si256(_mm256_setzero_si256(),
                                                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), 0)
                             : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i lo = _mm256_and_si256(v, mask);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
      for (int c = 0; c < C; ++c) dot[r][c] = DotBlock(dot[r][c], lo, hi, xq[c] + b * 64);
    }
  }
}

// dot[r][c] = hadd(integer dots of unit u, of unit u + 1): a unit is a group (G a multiple of 64,
// G / 64 blocks) or, split (G = 32), one block of two groups. Lanes: [u 0+1, u 2+3, u+1 0+1,
// u+1 2+3 | u 4+5, u 6+7, u+1 4+5, u+1 6+7].
template <int R, int C, bool Split>
MVJAX_INT4_INLINE void PairDots(const uint8_t* q4, int64_t row_bytes, const int8_t* const* xq, int64_t u,
                                int64_t per_unit, int64_t full, __m256i (&dot)[R][C]) {
  __m256i d0[R][C], d1[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) d0[r][c] = d1[r][c] = _mm256_setzero_si256();
  AddDots<R, C>(q4, row_bytes, xq, u * per_unit, (u + 1) * per_unit, Split && u >= full, d0);
  AddDots<R, C>(q4, row_bytes, xq, (u + 1) * per_unit, (u + 2) * per_unit, Split && u + 1 >= full, d1);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) dot[r][c] = _mm256_hadd_epi32(d0[r][c], d1[r][c]);
}

// The per-group factors v (a row's scales or a column's steps) of units u .. u + 3 in the lane order
// of hadd(PairDots(u), PairDots(u + 2)): groups u .. u + 3 in each half (G % 64 == 0), or, split,
// groups 2u + [0, 2, 4, 6] in the low half (the blocks' first groups) and 2u + [1, 3, 5, 7] high.
template <bool Split>
MVJAX_INT4_INLINE __m256 Factors4(const float* v, int64_t u) {
  if constexpr (Split) {
    return _mm256_permutevar8x32_ps(_mm256_loadu_ps(v + 2 * u), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
  } else {
    return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(v + u));
  }
}

// The factors of one unit u in the lane order of its dot vector.
template <bool Split>
MVJAX_INT4_INLINE __m256 Factors1(const float* v, int64_t u) {
  if constexpr (Split) {
    return _mm256_setr_m128(_mm_set1_ps(v[2 * u]), _mm_set1_ps(v[2 * u + 1]));
  } else {
    return _mm256_broadcast_ss(v + u);
  }
}

// An R x C tile: rows o .. o + R - 1 (their scales as float32 in sf, stride a.groups_pad) against
// columns c0 .. c0 + C - 1. Each unit's integer dot products (exact int32) are scaled by the weight
// scale times the activation step into float lanes; with Batch, four units' dots are first folded
// into one vector by two rounds of vphaddd, so one conversion, scaling and add serve four units
// (at the cost of 4 R C live vectors instead of 2 R C). The minimums and the centring term
// (int4_matmul.cc) are added at the end, eight groups a step.
template <int R, int C, bool Split, bool Batch>
MVJAX_INT4_TARGET void Tile(const Weights& w, const Activations& a, int64_t o, const float* sf, int64_t c0,
                            float* y) {
  const int64_t row_bytes = w.k_len / 2, gp = a.groups_pad;
  const uint8_t* q4 = w.q4 + o * row_bytes;
  const int8_t* xq[C] = {};
  const float* xstep[C];
  const float* xsum[C];
  const float* xcentre[C];
  for (int c = 0; c < C; ++c) {
    xq[c] = a.q.data() + (c0 + c) * a.k_pad;
    xstep[c] = a.step.data() + (c0 + c) * gp;
    xsum[c] = a.sum.data() + (c0 + c) * gp;
    xcentre[c] = a.centre.data() + (c0 + c) * gp;
  }
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  // The minimums and scales of the rows kMinPrefetchRows further on (float16 rows read at the end
  // of a tile and just before it; their streams are too slow for the hardware prefetcher to follow).
  for (int r = 0; r < R; ++r) {
    const int64_t ahead = std::min(o + r + kMinPrefetchRows, w.out - 1) * w.groups;
    PrefetchAhead(reinterpret_cast<const uint8_t*>(w.min + ahead), 0);
    PrefetchAhead(reinterpret_cast<const uint8_t*>(w.scale + ahead), 0);
  }

  // Units: groups of G / 64 blocks, or (split, G = 32) single blocks of two groups, the last one
  // half a block when k_len % 64 == 32 (its second group is the zero padding at index `groups`).
  const int64_t per_unit = Split ? 1 : w.group / 64;
  const int64_t units = Split ? (w.k_len + 63) / 64 : w.groups;
  const int64_t full = w.k_len / 64;  // split: units from here on are half blocks
  int64_t u = 0;
  if constexpr (Batch) {
    for (; u + 4 <= units; u += 4) {
      __m256i h01[R][C], h23[R][C];
      PairDots<R, C, Split>(q4, row_bytes, xq, u, per_unit, full, h01);
      PairDots<R, C, Split>(q4, row_bytes, xq, u + 2, per_unit, full, h23);
      __m256 xv[C];
      for (int c = 0; c < C; ++c) xv[c] = Factors4<Split>(xstep[c], u);
      for (int r = 0; r < R; ++r) {
        const __m256 rv = Factors4<Split>(sf + r * gp, u);
        for (int c = 0; c < C; ++c) {
          const __m256 dots = _mm256_cvtepi32_ps(_mm256_hadd_epi32(h01[r][c], h23[r][c]));
          acc[r][c] = _mm256_fmadd_ps(dots, _mm256_mul_ps(rv, xv[c]), acc[r][c]);
        }
      }
    }
  }
  for (; u < units; ++u) {
    __m256i dot[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) dot[r][c] = _mm256_setzero_si256();
    AddDots<R, C>(q4, row_bytes, xq, u * per_unit, (u + 1) * per_unit, Split && u >= full, dot);
    __m256 xv[C];
    for (int c = 0; c < C; ++c) xv[c] = Factors1<Split>(xstep[c], u);
    for (int r = 0; r < R; ++r) {
      const __m256 rv = Factors1<Split>(sf + r * gp, u);
      for (int c = 0; c < C; ++c)
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][c]), _mm256_mul_ps(rv, xv[c]), acc[r][c]);
    }
  }

  // sum_g min[g] * (sum of the group's activations) + scale[g] * 7.5 * (what rounding took from that
  // sum), eight groups a step (the activation side is zero past `groups`).
  for (int64_t g = 0; g < w.groups; g += 8) {
    for (int r = 0; r < R; ++r) {
      const __m256 mn = LoadHalf8(w.min + (o + r) * w.groups + g, w.groups - g);
      const __m256 sv = _mm256_loadu_ps(sf + r * gp + g);
      for (int c = 0; c < C; ++c) {
        acc[r][c] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(xsum[c] + g), acc[r][c]);
        acc[r][c] = _mm256_fmadd_ps(sv, _mm256_loadu_ps(xcentre[c] + g), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[(o + r) * a.n + c0 + c] = HorizontalSum(acc[r][c]);
}

// Rows [o0, o1) against columns [c0, c0 + C): R-row tiles, single rows for the remainder; each
// tile's scales are converted to float32 into sf (room for R rows) just before it runs, so they
// come from the cache the tiles before prefetched them into, not from memory in one burst per chunk
// (that burst was ~10 % of an int4 decode step's kernel time, all of it waiting on the loads).
template <int R, int C, bool Split, bool Batch>
MVJAX_INT4_TARGET void RowsForColumns(const Weights& w, const Activations& a, int64_t o0, int64_t o1, float* sf,
                                      int64_t c0, float* y) {
  const int64_t gp = a.groups_pad;
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    for (int r = 0; r < R; ++r) HalfRow(w.scale + (o + r) * w.groups, w.groups, sf + r * gp, gp);
    Tile<R, C, Split, Batch>(w, a, o, sf, c0, y);
  }
  for (; o < o1; ++o) {
    HalfRow(w.scale + o * w.groups, w.groups, sf, gp);
    Tile<1, C, Split, Batch>(w, a, o, sf, c0, y);
  }
}

// Register tiles, R rows x C columns (R divides 12, the chunk granularity), batched or not (Tile):
// live vectors 4 R C (batched) or 2 R C, plus the block's codes and constants; AVX-512 VL has 32
// vector registers, AVX2 16. Picked by single-thread CPU time on an AMD EPYC (Zen 4) for N = 1, 2,
// 4: batching pays at one column (where the scaling is most of the per-group work) and not at more
// (vphaddd is slow there, and the wider tile it forces reuses each unpacked block less).
constexpr int kMaxTileRows = 4;  // the largest R below
#if MVJAX_INT4_VNNI
constexpr int kRows4 = 2, kRows3 = 2, kRows2 = 4, kRows1 = 4;
constexpr bool kBatch4 = false, kBatch3 = true, kBatch2 = false, kBatch1 = true;
#else
constexpr int kRows4 = 1, kRows3 = 1, kRows2 = 2, kRows1 = 3;
constexpr bool kBatch4 = false, kBatch3 = false, kBatch2 = false, kBatch1 = true;
#endif

// One chunk of rows against every column, four columns at a time: the chunk's nibbles (sized by
// the caller to stay in L2) come from memory once and from cache for every further column group.
template <bool Split>
MVJAX_INT4_TARGET void Rows(const Weights& w, const Activations& a, int64_t o0, int64_t o1, float* y) {
  std::vector<float> sf(size_t(kMaxTileRows * a.groups_pad));
  int64_t c = 0;
  for (; c + 4 <= a.n; c += 4) RowsForColumns<kRows4, 4, Split, kBatch4>(w, a, o0, o1, sf.data(), c, y);
  switch (a.n - c) {
    case 3: RowsForColumns<kRows3, 3, Split, kBatch3>(w, a, o0, o1, sf.data(), c, y); break;
    case 2: RowsForColumns<kRows2, 2, Split, kBatch2>(w, a, o0, o1, sf.data(), c, y); break;
    case 1: RowsForColumns<kRows1, 1, Split, kBatch1>(w, a, o0, o1, sf.data(), c, y); break;
    default: break;
  }
}
