// AVX2 walks of the SpQRMatMul CPU kernel (see spqr_matmul.cpp for the work plan): per row of W the group
// statistics 8 groups per vector step, then the packed codes, 8 per unaligned 32-bit load, broadcast,
// variable shift and mask. M == 1 fuses decode and dot (over the prepared lanes when constant codes were
// laid out at session creation); M > 1 dequantizes 16-row panels for tile::tile_gemm. Called only after
// cpu_has_avx2().
#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "qcompile/cpu_features.h"
#include "qcompile/spqr_matmul.h"
#include "simd.h"
#include "spqr_matmul_internal.h"
#include "tile_gemm.h"

#if QC_X86

namespace qcompile {
namespace spqr {
namespace detail {

namespace {

using simd::hsum;
using simd::load_u32;

// Codes 8q..8q+7 of a 32-code chunk (4*BITS bytes at `chunk`) as floats. For 3 bits the 4th block is
// read from byte 8 with shifts 8 larger, so no load ever leaves its 12-byte chunk.
template <int BITS, int Q>
QC_AVX2 inline __m256 decode8q(const uint8_t* chunk) {
  constexpr int off = BITS == 4 ? 4 * Q : (Q == 3 ? 8 : 3 * Q);
  constexpr int extra = (BITS == 3 && Q == 3) ? 8 : 0;
  const __m256i sh = BITS == 4 ? _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)
                               : _mm256_setr_epi32(extra, 3 + extra, 6 + extra, 9 + extra, 12 + extra, 15 + extra,
                                                   18 + extra, 21 + extra);
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)load_u32(chunk + off)), sh), mask));
}

// Codes 8j..8j+7 of a row (bytes at `row`) as floats.
template <int BITS>
QC_AVX2 inline __m256 decode8(const uint8_t* row, int64_t j) {
  const uint8_t* chunk = row + 4 * BITS * (j >> 2);
  switch (j & 3) {
    case 0: return decode8q<BITS, 0>(chunk);
    case 1: return decode8q<BITS, 1>(chunk);
    case 2: return decode8q<BITS, 2>(chunk);
    default: return decode8q<BITS, 3>(chunk);
  }
}

// The scale and zero codes of groups g..g+7 (sb <= 4 bits each, packed LSB-first in the byte streams
// sbytes / zbytes of SW 32-bit words) as floats. Near a stream's end the 32-bit load starts at its last 4
// bytes and the shift makes up the difference (the stream covers these groups' bits, so all are inside).
struct StatCodeReader {
  const uint8_t* sbytes;
  const uint8_t* zbytes;
  int sb;
  int64_t last;  // last byte offset a 32-bit load may start at
  __m256i sh, mask;
  QC_AVX2 StatCodeReader(const uint8_t* s, const uint8_t* z, int bits, int64_t stat_words)
      : sbytes(s), zbytes(z), sb(bits), last(4 * stat_words - 4),
        sh(_mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits))),
        mask(_mm256_set1_epi32((1 << bits) - 1)) {}
  QC_AVX2 inline void read8(int64_t g, __m256* sc, __m256* zc) const {
    const int64_t off = (g / 8) * sb;
    const int64_t at = std::min(off, last);
    const __m256i shift = _mm256_add_epi32(sh, _mm256_set1_epi32((int)(8 * (off - at))));
    *sc = _mm256_cvtepi32_ps(
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)load_u32(sbytes + at)), shift), mask));
    *zc = _mm256_cvtepi32_ps(
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)load_u32(zbytes + at)), shift), mask));
  }
};

// Statistics of row n into scale/zero (both with room for round_up(G, 8) entries), 8 groups per step.
QC_AVX2 void stats_avx2(const Call& c, int64_t n, float* scale, float* zero) {
  const Attrs& s = *c.s;
  const int64_t G = s.groups();
  const int64_t SW = s.stat_words();
  const int sb = s.stat_bits;
  if (sb > 4) {  // 8 codes no longer fit one 32-bit load
    stats_scalar(c, n, 0, scale, zero);
    return;
  }
  const uint8_t* sbytes = (const uint8_t*)(c.w->stat_codes + n * 2 * SW);
  const StatCodeReader codes(sbytes, sbytes + 4 * SW, sb, SW);
  const uint16_t* sp = row_params(c, n);
  for (int64_t g = 0; g < G; g += 8) {
    __m256 sc, zc;
    codes.read8(g, &sc, &zc);
    __m256 ss, sm, zs, zm;
    if (g + 8 <= G) {
      ss = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sp + g)));
      sm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sp + G + g)));
      zs = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sp + 2 * G + g)));
      zm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sp + 3 * G + g)));
    } else {  // partial tail: zero-padded copies (padded groups get scale 0, zero 0)
      alignas(16) uint16_t tail[4][8] = {};
      for (int f = 0; f < 4; ++f)
        for (int64_t i = 0; g + i < G; ++i) tail[f][i] = sp[f * G + g + i];
      ss = _mm256_cvtph_ps(_mm_load_si128((const __m128i*)tail[0]));
      sm = _mm256_cvtph_ps(_mm_load_si128((const __m128i*)tail[1]));
      zs = _mm256_cvtph_ps(_mm_load_si128((const __m128i*)tail[2]));
      zm = _mm256_cvtph_ps(_mm_load_si128((const __m128i*)tail[3]));
    }
    _mm256_storeu_ps(scale + g, _mm256_fmadd_ps(sc, ss, sm));
    _mm256_storeu_ps(zero + g, _mm256_fmadd_ps(zc, zs, zm));
  }
}

// Slot I of the lanes as floats code·2^(BITS·I); the slot holding bit 31 (4-bit codes) is shifted down
// instead (a signed conversion would read that bit as a sign), and its activations are not scaled.
template <int BITS, int I>
QC_AVX2 inline __m256 lane_slot(__m256i v) {
  if constexpr (BITS * (I + 1) == 32) return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, BITS * I));
  return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)(((1u << BITS) - 1u) << (BITS * I)))));
}

// stats_corr_m1 over the prepared stat lanes (stat_bits 3): per 8 groups two masks and conversions, no
// broadcast or variable shift. The second-level steps of group g are widened pre-scaled by
// 2^-(3·slot(g)) (exact), matching lane_slot's code·2^(3·slot).
QC_AVX2 __m256 stats_corr_m1_lanes(const Call& c, int64_t n, float* pf, int64_t* cached_rb, float* scale) {
  const Attrs& s = *c.s;
  const int64_t G = s.groups(), Gp = c.Gp, SB = c.prep->stat_blocks;
  const int64_t rb = n / s.stat_group;
  if (rb != *cached_rb) {  // widen 8 groups (one slot) per step
    const uint16_t* sp = row_params(c, n);
    static const float kSlotScale[10] = {1.0f, 0x1p-3f, 0x1p-6f, 0x1p-9f, 0x1p-12f, 0x1p-15f,
                                         0x1p-18f, 0x1p-21f, 0x1p-24f, 0x1p-27f};  // 2^-slot_exponent(3, i)
    for (int fi = 0; fi < 4; ++fi) {
      float* dst = pf + fi * Gp;
      const uint16_t* src = sp + fi * G;
      int64_t g = 0;
      for (; g + 8 <= G; g += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + g)));
        if (!(fi & 1)) v = _mm256_mul_ps(v, _mm256_set1_ps(kSlotScale[(g % 80) / 8]));
        _mm256_storeu_ps(dst + g, v);
      }
      for (; g < G; ++g) dst[g] = _cvtsh_ss(src[g]) * ((fi & 1) ? 1.0f : kSlotScale[(g % 80) / 8]);
      for (; g < Gp; ++g) dst[g] = 0.f;
    }
    *cached_rb = rb;
  }
  const uint32_t* lanes = c.prep->stat_lanes.data() + n * 2 * SB * 8;
  __m256 corr = _mm256_setzero_ps();
  const float* xs = c.xsum;
#define QC_STAT(cs, cz, i)                                                                                  \
  {                                                                                                         \
    const __m256 scl = _mm256_fmadd_ps(cs, _mm256_loadu_ps(pf + 8 * (i)), _mm256_loadu_ps(pf + Gp + 8 * (i))); \
    const __m256 zer =                                                                                      \
        _mm256_fmadd_ps(cz, _mm256_loadu_ps(pf + 2 * Gp + 8 * (i)), _mm256_loadu_ps(pf + 3 * Gp + 8 * (i))); \
    _mm256_storeu_ps(scale + 8 * (i), scl);                                                                 \
    corr = _mm256_fmadd_ps(_mm256_mul_ps(scl, zer), _mm256_loadu_ps(xs + 8 * (i)), corr);                   \
  }
#define QC_SLOT(i)                                                                  \
  {                                                                                 \
    const __m256 cs_ = lane_slot<3, i>(vs), cz_ = lane_slot<3, i>(vz);              \
    QC_STAT(cs_, cz_, i)                                                            \
  }
  const int64_t full = Gp / 80;  // whole blocks; then the slots of the last one up to Gp
  int64_t b = 0;
  for (; b < full; ++b, lanes += 8, pf += 80, scale += 80, xs += 80) {
    const __m256i vs = _mm256_loadu_si256((const __m256i*)lanes);
    const __m256i vz = _mm256_loadu_si256((const __m256i*)(lanes + SB * 8));
    QC_SLOT(0) QC_SLOT(1) QC_SLOT(2) QC_SLOT(3) QC_SLOT(4) QC_SLOT(5) QC_SLOT(6) QC_SLOT(7) QC_SLOT(8) QC_SLOT(9)
  }
  if (b < SB) {
    const __m256i vs = _mm256_loadu_si256((const __m256i*)lanes);
    const __m256i vz = _mm256_loadu_si256((const __m256i*)(lanes + SB * 8));
    for (int64_t i = 0; 80 * b + 8 * i < Gp; ++i) {
      const __m256i m = _mm256_set1_epi32((int)(7u << (3 * i)));
      QC_STAT(_mm256_cvtepi32_ps(_mm256_and_si256(vs, m)), _mm256_cvtepi32_ps(_mm256_and_si256(vz, m)), i)
    }
  }
#undef QC_SLOT
#undef QC_STAT
  return corr;
}

// M == 1 statistics of row n: scales into `scale` (room for Gp entries) and the zero-point term
// sum_g scale_g * zero_g * xsum_g as a vector, in one pass. The second-level parameters of the row's
// block are widened once per block into `pf` ([4][Gp] fp32, zero padded; *cached_rb tracks the block).
QC_AVX2 __m256 stats_corr_m1(const Call& c, int64_t n, float* pf, int64_t* cached_rb, float* scale) {
  const Attrs& s = *c.s;
  const int64_t G = s.groups(), Gp = c.Gp, SW = s.stat_words();
  const int sb = s.stat_bits;
  const int64_t rb = n / s.stat_group;
  if (rb != *cached_rb) {
    const uint16_t* sp = row_params(c, n);
    for (int f = 0; f < 4; ++f) {
      float* dst = pf + f * Gp;
      for (int64_t g = 0; g < G; ++g) dst[g] = _cvtsh_ss(sp[f * G + g]);
      for (int64_t g = G; g < Gp; ++g) dst[g] = 0.f;
    }
    *cached_rb = rb;
  }
  const uint8_t* sbytes = (const uint8_t*)(c.w->stat_codes + n * 2 * SW);
  const StatCodeReader codes(sbytes, sbytes + 4 * SW, sb, SW);
  __m256 corr = _mm256_setzero_ps();
  for (int64_t g = 0; g < Gp; g += 8) {
    __m256 sc, zc;
    codes.read8(g, &sc, &zc);
    const __m256 scl = _mm256_fmadd_ps(sc, _mm256_loadu_ps(pf + g), _mm256_loadu_ps(pf + Gp + g));
    const __m256 zer = _mm256_fmadd_ps(zc, _mm256_loadu_ps(pf + 2 * Gp + g), _mm256_loadu_ps(pf + 3 * Gp + g));
    _mm256_storeu_ps(scale + g, scl);
    corr = _mm256_fmadd_ps(_mm256_mul_ps(scl, zer), _mm256_loadu_ps(c.xsum + g), corr);
  }
  return corr;
}

QC_AVX2 inline __m256i load_idx8(const int16_t* p) {
  return _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i*)p));
}
QC_AVX2 inline __m256i load_idx8(const int32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }

// Sum of value * x[col] over row n's outliers: 8 per step with a gather (indices were validated).
template <typename Idx>
QC_AVX2 inline float outlier_sum_f16c(const Call& c, const Idx* cols, int64_t n, const float* xo) {
  int64_t o = row_offset(*c.w, n);
  const int64_t end = row_offset(*c.w, n + 1);
  __m256 acc = _mm256_setzero_ps();
  for (; o + 8 <= end; o += 8) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(c.w->values + o)));
    acc = _mm256_fmadd_ps(v, _mm256_i32gather_ps(xo, load_idx8(cols + o), 4), acc);
  }
  float sum = hsum(acc);
  for (; o < end; ++o) sum += _cvtsh_ss(c.w->values[o]) * xo[cols[o]];
  return sum;
}

}  // namespace

QC_AVX2 float outliers_avx2(const Call& c, int64_t n, int64_t m) {
  const float* xo = c.xorig + m * c.s->K;
  return c.w->col_int16 ? outlier_sum_f16c(c, (const int16_t*)c.w->col_indices, n, xo)
                        : outlier_sum_f16c(c, (const int32_t*)c.w->col_indices, n, xo);
}

namespace {

// Lanes (u32) ahead of the walk to prefetch: 2 KB, past the end of the row (a 4096-wide 3-bit row is 1.6 KB)
// into the next one. Why: with cold caches the hardware prefetcher alone left the walk ~40% slower than with
// warm ones. A/B on a 2-core AMD EPYC (Zen 4) VM, 4096x4096 spqr-w3, M = 1, one thread, cold caches
// (`qcompile.bench --clock thread_cpu --stat min`, 12+ runs each): 1.70-1.86 ms -> 1.35-1.57 ms.
constexpr int64_t kLanePrefetch = 512;

// M == 1, group_size 16, codes in the prepared lane layout (PreparedCodes): per block of 8·L positions one
// 256-bit load; slot i (8 positions) is a mask and a conversion, without a shift: the masked lane is
// code·2^(BITS·i) (exact in fp32, at most 3-4 significant bits) and the activations `xl` come pre-scaled
// by 2^-(BITS·i) (exact unless |x| < 2^-99 underflows; see slot_exponent), so every product is code·x. L/2 groups per block, each with its own
// accumulator. Returns the vector sum of scale_g · dot(x_g, codes_g) over whole blocks.
template <int BITS>
QC_AVX2 inline __m256 lanes_dot_g16(const uint32_t* lanes, int64_t blocks, const float* x, const float* scale) {
  constexpr int L = 32 / BITS, G = L / 2;  // codes per lane; 16-position groups per block
  static_assert(L % 2 == 0, "whole groups per block");
  __m256 acc[G];
  for (int i = 0; i < G; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, lanes += 8, x += 8 * L, scale += G) {
    if (b & 1) _mm_prefetch((const char*)(lanes + kLanePrefetch), _MM_HINT_T0);  // a 64-byte line per 2 blocks
    const __m256i v = _mm256_loadu_si256((const __m256i*)lanes);
#define QC_LANE(i) lane_slot<BITS, (i)>(v)
#define QC_GROUP(i)                                                                                        \
  acc[i] = _mm256_fmadd_ps(_mm256_fmadd_ps(QC_LANE(2 * (i)), _mm256_loadu_ps(x + 16 * (i)),             \
                                           _mm256_mul_ps(QC_LANE(2 * (i) + 1), _mm256_loadu_ps(x + 16 * (i) + 8))), \
                           _mm256_broadcast_ss(scale + (i)), acc[i]);
    QC_GROUP(0) QC_GROUP(1) QC_GROUP(2) QC_GROUP(3)
    if constexpr (G > 4) { QC_GROUP(4) }
#undef QC_GROUP
#undef QC_LANE
  }
  __m256 sum = acc[0];
  for (int i = 1; i < G; ++i) sum = _mm256_add_ps(sum, acc[i]);
  return sum;
}

}  // namespace

// M == 1: fused decode + dot, one pass over each packed row.
template <int BITS>
QC_AVX2 void rows_avx2_m1(const Call& c, int64_t r0, int64_t r1) {
  const Attrs& s = *c.s;
  const int64_t Gp = c.Gp;
  const int64_t bpr = s.code_words() * 4;  // bytes per packed row
  const float* x = c.xk;
  // per-thread buffers, reached once: a thread_local named in the row loop costs a TLS lookup per use
  thread_local std::vector<float> scale_buf, zero_buf, pf_buf;
  scale_buf.assign((size_t)Gp, 0.f);  // entries G..Gp-1 stay 0: padded groups contribute nothing
  zero_buf.assign((size_t)Gp, 0.f);
  pf_buf.resize((size_t)(4 * Gp));
  float* const scale = scale_buf.data();
  float* const zero = zero_buf.data();
  float* const pf = pf_buf.data();
  int64_t cached_rb = -1;
  const bool fused_stats = s.stat_bits <= 4;  // 8 stat codes fit one 32-bit load
  for (int64_t n = r0; n < r1; ++n) {
    // zero-point term: sum_g scale_g * zero_g * sum(x_g)
    __m256 corr = _mm256_setzero_ps();
    if (c.prep && !c.prep->stat_lanes.empty()) {
      corr = stats_corr_m1_lanes(c, n, pf, &cached_rb, scale);
    } else if (fused_stats) {
      corr = stats_corr_m1(c, n, pf, &cached_rb, scale);
    } else {
      stats_avx2(c, n, scale, zero);
      for (int64_t g = 0; g < Gp; g += 8)
        corr = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(scale + g), _mm256_loadu_ps(zero + g)),
                               _mm256_loadu_ps(c.xsum + g), corr);
    }
    const uint8_t* row = (const uint8_t*)c.w->codes + n * bpr;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    if (c.prep && s.group_size == 16) {  // prepared lanes, then the last positions from the packed row
      constexpr int64_t kBlock = 8 * (32 / BITS);
      const int64_t blocks = c.prep->blocks;
      acc0 = lanes_dot_g16<BITS>(c.prep->lanes.data() + n * blocks * 8, blocks, c.xl, scale);
      for (int64_t j = blocks * kBlock / 8; j < c.Kc / 8; j += 2) {  // whole groups of 16 positions
        const __m256 t = _mm256_fmadd_ps(decode8<BITS>(row, j), _mm256_loadu_ps(x + 8 * j),
                                         _mm256_mul_ps(decode8<BITS>(row, j + 1), _mm256_loadu_ps(x + 8 * j + 8)));
        acc1 = _mm256_fmadd_ps(t, _mm256_broadcast_ss(scale + j / 2), acc1);
      }
    } else if (s.group_size == 16) {  // the paper's setting: a 32-code chunk is exactly two groups
      const int64_t chunks = c.Kc / 32;
      const uint8_t* chunk = row;
      const float* sc = scale;
      // Two chunks per step into four accumulators: the scale FMAs no longer form two serial chains.
      __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
      int64_t ch = 0;
      for (; ch + 2 <= chunks; ch += 2, chunk += 8 * BITS, sc += 4) {
        const float* xp = x + 32 * ch;
        const uint8_t* nx = chunk + 4 * BITS;
        const __m256 ta = _mm256_fmadd_ps(decode8q<BITS, 0>(chunk), _mm256_loadu_ps(xp),
                                          _mm256_mul_ps(decode8q<BITS, 1>(chunk), _mm256_loadu_ps(xp + 8)));
        const __m256 tb = _mm256_fmadd_ps(decode8q<BITS, 2>(chunk), _mm256_loadu_ps(xp + 16),
                                          _mm256_mul_ps(decode8q<BITS, 3>(chunk), _mm256_loadu_ps(xp + 24)));
        const __m256 tc = _mm256_fmadd_ps(decode8q<BITS, 0>(nx), _mm256_loadu_ps(xp + 32),
                                          _mm256_mul_ps(decode8q<BITS, 1>(nx), _mm256_loadu_ps(xp + 40)));
        const __m256 td = _mm256_fmadd_ps(decode8q<BITS, 2>(nx), _mm256_loadu_ps(xp + 48),
                                          _mm256_mul_ps(decode8q<BITS, 3>(nx), _mm256_loadu_ps(xp + 56)));
        acc0 = _mm256_fmadd_ps(ta, _mm256_broadcast_ss(sc), acc0);
        acc1 = _mm256_fmadd_ps(tb, _mm256_broadcast_ss(sc + 1), acc1);
        acc2 = _mm256_fmadd_ps(tc, _mm256_broadcast_ss(sc + 2), acc2);
        acc3 = _mm256_fmadd_ps(td, _mm256_broadcast_ss(sc + 3), acc3);
      }
      acc0 = _mm256_add_ps(acc0, acc2);
      acc1 = _mm256_add_ps(acc1, acc3);
      for (; ch < chunks; ++ch, chunk += 4 * BITS, sc += 2) {
        const float* xp = x + 32 * ch;
        const __m256 ta = _mm256_fmadd_ps(decode8q<BITS, 0>(chunk), _mm256_loadu_ps(xp),
                                          _mm256_mul_ps(decode8q<BITS, 1>(chunk), _mm256_loadu_ps(xp + 8)));
        const __m256 tb = _mm256_fmadd_ps(decode8q<BITS, 2>(chunk), _mm256_loadu_ps(xp + 16),
                                          _mm256_mul_ps(decode8q<BITS, 3>(chunk), _mm256_loadu_ps(xp + 24)));
        acc0 = _mm256_fmadd_ps(ta, _mm256_broadcast_ss(sc), acc0);
        acc1 = _mm256_fmadd_ps(tb, _mm256_broadcast_ss(sc + 1), acc1);
      }
    } else {
      const int64_t gs8 = s.group_size / 8, G = s.groups(), blocks = c.Kc / 8;
      for (int64_t g = 0; g < G; ++g) {
        __m256 t = _mm256_setzero_ps();
        const int64_t end = std::min(blocks, (g + 1) * gs8);
        for (int64_t j = g * gs8; j < end; ++j) t = _mm256_fmadd_ps(decode8<BITS>(row, j), _mm256_loadu_ps(x + 8 * j), t);
        if (g & 1)
          acc1 = _mm256_fmadd_ps(t, _mm256_broadcast_ss(scale + g), acc1);
        else
          acc0 = _mm256_fmadd_ps(t, _mm256_broadcast_ss(scale + g), acc0);
      }
    }
    float v = (hsum(_mm256_add_ps(acc0, acc1)) - hsum(corr)) * c.dense_scale + outliers_avx2(c, n, 0);
    if (c.bias) v += c.bias[n];
    c.y[n] = v;
  }
}

namespace {

// M > 1, GEMM-style (tile::tile_gemm), as FP4MatMul's prefill: a task owns kTileRows rows of W; per K slice
// it dequantizes them, scale · (code − zero) plus the slice's outliers, into a row-major L1 tile, and a 6 x 16
// outer-product microkernel multiplies the tile with every 16-row block of X, packed transposed once per call
// in stored order. (A transposed panel, the former layout, cost eight 8x8 transposes per 64 weights.)
constexpr int64_t kTileRows = 12;  // two 6-row microkernel calls
constexpr int64_t kSlice = 256;    // K positions per tile (whole groups of 16)
constexpr int64_t kTileLd = kSlice + 8;
constexpr int64_t kXtLd = 16;

// One outlier of a tile: stored position, row within the tile, value.
struct TileEntry {
  int32_t p;
  int32_t r;
  float v;
};

// A tile's working set, kept per thread across calls.
struct TileScratch {
  std::vector<float> tile, scale, offs;
  tile::CacheLineVector<float> acc;
  std::vector<TileEntry> entries;  // the tile's outliers, bucketed by K slice
  std::vector<size_t> bucket_start, fill_pos;
};

// The calling thread's scratch for the tile in slot `slot` of a task (its tiles are alive together).
TileScratch& tile_scratch(int slot) {
  thread_local std::array<TileScratch, tile::kMaxTilesPerTask> s;
  return s[static_cast<size_t>(slot)];
}

// Statistics (scale and -scale·zero per group) of rows [n0, n0 + nr) and their outliers bucketed by the K
// slice of their stored position (a column names an input feature).
QC_AVX2 void tile_begin(const Call& c, int64_t n0, int nr, int cap, int64_t ldc, TileScratch& s) {
  const int64_t Gp = c.Gp;
  s.bucket_start.resize((size_t)((c.Kc + kSlice - 1) / kSlice + 1));
  s.tile.resize((size_t)(cap * kTileLd));
  s.acc.resize((size_t)(cap * ldc));
  s.scale.resize((size_t)(cap * Gp));
  s.offs.resize((size_t)(cap * Gp));
  for (int r = 0; r < nr; ++r) {
    float* sc = s.scale.data() + r * Gp;
    float* off = s.offs.data() + r * Gp;
    stats_avx2(c, n0 + r, sc, off);  // off holds zero until the next line
    for (int64_t g = 0; g < Gp; ++g) off[g] = -sc[g] * off[g];
  }
  std::fill(s.bucket_start.begin(), s.bucket_start.end(), 0);
  const int64_t o0 = row_offset(*c.w, n0), o1 = row_offset(*c.w, n0 + nr);
  s.entries.resize((size_t)(o1 - o0));
  for (int r = 0; r < nr; ++r)
    for (int64_t o = row_offset(*c.w, n0 + r), end = row_offset(*c.w, n0 + r + 1); o < end; ++o) {
      const int64_t col = col_at(*c.w, o);
      ++s.bucket_start[(size_t)((c.inv_perm ? c.inv_perm[col] : col) / kSlice) + 1];
    }
  for (size_t b = 1; b < s.bucket_start.size(); ++b) s.bucket_start[b] += s.bucket_start[b - 1];
  s.fill_pos.assign(s.bucket_start.begin(), s.bucket_start.end() - 1);
  for (int r = 0; r < nr; ++r)
    for (int64_t o = row_offset(*c.w, n0 + r), end = row_offset(*c.w, n0 + r + 1); o < end; ++o) {
      const int64_t col = col_at(*c.w, o);
      const int32_t p = c.inv_perm ? c.inv_perm[col] : (int32_t)col;
      s.entries[s.fill_pos[(size_t)(p / kSlice)]++] = TileEntry{p, r, _cvtsh_ss(c.w->values[o])};
    }
}

// The tile's weights at stored positions [ks, ks + len), outliers added; rows past nr (up to cap) are zero.
template <int BITS>
QC_AVX2 void tile_decode(const Call& c, int64_t n0, int nr, int cap, int64_t ks, int64_t len, TileScratch& s) {
  const Attrs& a = *c.s;
  const int64_t Gp = c.Gp, bpr = a.code_words() * 4;
  for (int r = 0; r < cap; ++r) {
    float* dst = s.tile.data() + r * kTileLd;
    if (r >= nr) {
      std::fill(dst, dst + len, 0.0f);
      continue;
    }
    const uint8_t* row = (const uint8_t*)c.w->codes + (n0 + r) * bpr;
    // the next slice's codes of this row: kTileRows rows a row apart, which the hardware prefetcher does not
    // follow far enough ahead
    if (ks + len < c.Kc)
      for (int64_t b = 0; b < len * BITS / 8; b += 64) _mm_prefetch((const char*)(row + (ks + len) * BITS / 8 + b), _MM_HINT_T0);
    const float* sc = s.scale.data() + r * Gp;
    const float* off = s.offs.data() + r * Gp;
    // a 32-code chunk at a time (ks and len are whole chunks): each of its halves lies in one group
    const int64_t gs16 = a.group_size / 16;
    int64_t h = ks / 16, g = h / gs16, hg = h - g * gs16;  // (one division per row and slice, not per code)
    for (int64_t ch = ks / 32; ch < (ks + len) / 32; ++ch) {
      const uint8_t* chunk = row + 4 * BITS * ch;
      float* d = dst + 32 * ch - ks;
      const __m256 sa = _mm256_broadcast_ss(sc + g), oa = _mm256_broadcast_ss(off + g);
      if (++hg == gs16) {
        hg = 0;
        ++g;
      }
      const __m256 sb = _mm256_broadcast_ss(sc + g), ob = _mm256_broadcast_ss(off + g);
      if (++hg == gs16) {
        hg = 0;
        ++g;
      }
      _mm256_storeu_ps(d, _mm256_fmadd_ps(decode8q<BITS, 0>(chunk), sa, oa));
      _mm256_storeu_ps(d + 8, _mm256_fmadd_ps(decode8q<BITS, 1>(chunk), sa, oa));
      _mm256_storeu_ps(d + 16, _mm256_fmadd_ps(decode8q<BITS, 2>(chunk), sb, ob));
      _mm256_storeu_ps(d + 24, _mm256_fmadd_ps(decode8q<BITS, 3>(chunk), sb, ob));
    }
  }
  // padding positions p >= K meet x == 0; keep them exactly 0 even for non-finite statistics
  for (int64_t p = std::max(ks, a.K); p < ks + len; ++p)
    for (int r = 0; r < cap; ++r) s.tile[(size_t)(r * kTileLd + p - ks)] = 0.0f;
  // outliers add to the dequantized tile, in this slice's bucket
  for (size_t e = s.bucket_start[(size_t)(ks / kSlice)]; e < s.bucket_start[(size_t)(ks / kSlice) + 1]; ++e)
    s.tile[(size_t)(s.entries[e].r * kTileLd + s.entries[e].p - ks)] += s.entries[e].v;
}

// C^T[12][m0..m1) (+)= the tile's rows times the 16-row blocks [m0, m1) of xt ([Mpad/16][Kc][16]) over
// [ks, ks + len). `wide`: tile::prefill_avx512(), one 12 x 16 AVX-512 call per block instead of two 6 x 16
// AVX2 ones.
QC_AVX2 void tile_multiply(const float* tile, const float* xt, int64_t Kc, int64_t m0, int64_t m1, int64_t ks,
                           int64_t len, float* acc, int64_t ldc, bool wide) {
  for (int64_t m = m0; m < m1; m += kXtLd) {
    const float* xs = xt + m * Kc + ks * kXtLd;
    if (wide) {
      static_assert(kTileRows == 12 && kXtLd == 16, "the AVX-512 kernel covers the whole tile");
      const bool two = m1 - m >= 32;  // two blocks per call
      const float* xs1 = two ? xs + kXtLd * Kc : xs;
      tile::outer_x16<12, kTileLd>(tile, xs, xs1, two, ks > 0, kXtLd, len, acc + m, ldc);
      if (two) m += kXtLd;
      continue;
    }
    for (int64_t r = 0; r < kTileRows; r += 6) {
      const float* ws = tile + r * kTileLd;
      const float* rows[6] = {ws, ws + kTileLd, ws + 2 * kTileLd, ws + 3 * kTileLd, ws + 4 * kTileLd,
                              ws + 5 * kTileLd};
      float* cs = acc + r * ldc + m;
      if (ks == 0) tile::outer_product<6, 2, false>(rows, xs, kXtLd, len, cs, ldc);
      else tile::outer_product<6, 2, true>(rows, xs, kXtLd, len, cs, ldc);
    }
  }
}

// xk rows (stride ldx) -> blocks of 16 rows stored k-major, [Mpad/16][Kc][16], zero padded, via 8x8
// transposes.
QC_AVX2 void pack_xt(const Call& c, int64_t Mpad, float* xt) {
  const int64_t ldx = c.x_stride();
  alignas(32) static const float zeros[8] = {};
  for (int64_t m0 = 0; m0 < Mpad; m0 += 8)
    for (int64_t k = 0; k < c.Kc; k += 8) {
      __m256 v[8];
      for (int i = 0; i < 8; ++i) v[i] = m0 + i < c.M ? _mm256_loadu_ps(c.xk + (m0 + i) * ldx + k) : _mm256_load_ps(zeros);
      simd::transpose8(v);
      float* dst = xt + (m0 / kXtLd) * c.Kc * kXtLd + m0 % kXtLd;
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (k + i) * kXtLd, v[i]);
    }
}

}  // namespace

template <int BITS>
Status run_panels(const Call& c, const Parallel& par) {
  // accumulator row stride: off powers of two, rows 64-byte multiples (AMX)
  const int64_t Mpad = (c.M + kXtLd - 1) / kXtLd * kXtLd, ldc = Mpad + 16;
  thread_local std::vector<float> xt_buf;
  try {
    xt_buf.resize((size_t)(Mpad * c.Kc));
  } catch (const std::bad_alloc&) {
    return Status::Error("SpQRMatMul: out of memory for the activation buffer");
  }
  const float* xt = xt_buf.data();
  pack_xt(c, Mpad, xt_buf.data());
  const bool wide = tile::prefill_avx512();
  const tile::amx::XPack* xpack = tile::amx::prepare_pack(c.s->accuracy_level, c.M, xt, c.Kc, Mpad);
  const int64_t rows = xpack ? tile::amx::kTileRows : kTileRows;  // W rows per tile
  const int cap = (int)((rows + kTileRows - 1) / kTileRows * kTileRows);  // rows the FMA kernels touch
  struct Tile {
    const Call& c;
    const float* xt;
    int64_t m0, m1, ldc, n0;
    int nr, cap;
    TileScratch& s;
    bool wide;
    const tile::amx::XPack* xpack;  // null: the FMA kernels
    void decode(int64_t ks, int64_t len) { tile_decode<BITS>(c, n0, nr, cap, ks, len, s); }
    void multiply(int64_t ks, int64_t len) {
      if (xpack && tile::amx::multiply(s.tile.data(), kTileLd, nr, *xpack, m0, m1, ks, len, s.acc.data(), ldc, ks > 0))
        return;
      for (int r = 0; r < nr; r += kTileRows)  // the FMA kernels take 12 rows at a time
        tile_multiply(s.tile.data() + r * kTileLd, xt, c.Kc, m0, m1, ks, len, s.acc.data() + r * ldc, ldc, wide);
    }
    void finish() {
      for (int64_t m = m0; m < std::min(m1, c.M); ++m)
        for (int r = 0; r < nr; ++r)
          c.y[m * c.s->N + n0 + r] = s.acc[(size_t)(r * ldc + m)] + (c.bias ? c.bias[n0 + r] : 0.f);
    }
  };
  const int64_t task_rows = tile::prefill_task_rows(c.s->N, rows);
  const tile::Plan plan{c.s->N, task_rows, rows, c.Kc, kSlice, Mpad, tile::x_rows_per_pass(Mpad, kSlice + task_rows)};
  const Status st = tile::tile_gemm(par, kOp, plan, [&](int64_t n0, int64_t nr, int64_t m0, int64_t m1, int slot) {
    TileScratch& s = tile_scratch(slot);
    tile_begin(c, n0, (int)nr, cap, ldc, s);
    return Tile{c, xt, m0, m1, ldc, n0, (int)nr, cap, s, wide, xpack};
  });
  if (xt_buf.capacity() > (size_t{16} << 20)) std::vector<float>().swap(xt_buf);  // do not pin >64 MB per thread
  tile::amx::release_pack();
  return st;
}

template QC_AVX2 void rows_avx2_m1<3>(const Call&, int64_t, int64_t);
template QC_AVX2 void rows_avx2_m1<4>(const Call&, int64_t, int64_t);
template Status run_panels<3>(const Call&, const Parallel&);
template Status run_panels<4>(const Call&, const Parallel&);

}  // namespace detail
}  // namespace spqr
}  // namespace qcompile

#endif  // QC_X86
