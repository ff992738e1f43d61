// Fixed-point lookup walk for CodebookMatMul at batch 1 (see codebook_lut_i16.h for the numerics).
//
// Why: the fp32 walk costs one scalar load-add per code, ~1 cycle per lookup, and nothing vectorises it
// (AVX-512 gathers were slower still on Zen 4). Rounded to int16, one 256-entry table fits in 8 zmm
// registers, and four two-source word permutes plus three blends look up 32 rows' codes at once:
// ~11 instructions per 32 lookups. 4096x4096 aqlm-2x8, one thread, Zen 4: walk ~0.9 ms -> ~0.35 ms.
#include "codebook_lut_i16.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "qcompile/cpu_features.h"

// GCC 12 reports its own AVX-512 intrinsics' deliberately undefined pass-through operands (_mm512_undefined_*)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace qcompile {
namespace codebook {
namespace lut_i16 {

namespace {
constexpr int64_t kSliceEntries = kTablesPerSlice * 256;
constexpr int64_t kGroupBytes = kTablesPerSlice * kRowGroup;  // one row group's codes of one slice
constexpr int64_t kCodeAhead = 4096;  // bytes of codes prefetched ahead of the walk (it streams them once)
}  // namespace

int64_t block_bytes(int64_t R, int64_t T16) { return (R + kRowGroup - 1) / kRowGroup * kRowGroup * T16; }

void pack_block(const uint8_t* codes, int64_t T, int64_t T16, int64_t n0, int64_t R, uint8_t* dst) {
  if (T16 == 0) return;  // no whole slice (T < 16): nothing to copy, and dst may be null (memset(null, 0, 0) is UB)
  const int64_t RG = (R + kRowGroup - 1) / kRowGroup;
  std::memset(dst, 0, static_cast<size_t>(block_bytes(R, T16)));
  for (int64_t q = 0; q < T16 / kTablesPerSlice; ++q)
    for (int64_t r = 0; r < R; ++r) {
      const uint8_t* src = codes + (n0 + r) * T + q * kTablesPerSlice;
      uint8_t* grp = dst + (q * RG + r / kRowGroup) * kGroupBytes + r % kRowGroup;
      for (int64_t t = 0; t < kTablesPerSlice; ++t) grp[t * kRowGroup] = src[t];
    }
}

bool available() { return avx512bw_enabled("QCOMPILE_CODEBOOK_LUT_FP32"); }

#if QC_X86

QC_AVX512BW void quantize_slice(const float* L, const float* tmax, int16_t* out, float* step) {
  const float m = *std::max_element(tmax, tmax + kTablesPerSlice);
  *step = m > 0.f ? m / kLutI16Max : 0.f;
  const __m512 inv = _mm512_set1_ps(m > 0.f ? kLutI16Max / m : 0.f);
  for (int64_t i = 0; i < kSliceEntries; i += 16) {
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(L + i), inv));  // round to nearest
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtsepi32_epi16(v));
  }
}

namespace {
// acc[32*j + i] += step * (sum over the slice's 16 tables of table[t][code of row 32*j + i]), G row groups.
template <int G>
QC_AVX512BW inline void walk_groups(const uint8_t* c, const int16_t* Q, float step, float* acc) {
  __m512i lo32[G], hi32[G];
  for (int j = 0; j < G; ++j) lo32[j] = hi32[j] = _mm512_setzero_si512();
  const __m512i bit6 = _mm512_set1_epi16(0x40), bit7 = _mm512_set1_epi16(0x80);
  for (int t0 = 0; t0 < kTablesPerSlice; t0 += 2) {
    __m512i a[G];
    for (int j = 0; j < G; ++j) a[j] = _mm512_setzero_si512();
    for (int t = t0; t < t0 + 2; ++t) {
      const int16_t* L = Q + t * 256;
      const __m512i e0 = _mm512_loadu_si512(L), e1 = _mm512_loadu_si512(L + 32), e2 = _mm512_loadu_si512(L + 64),
                    e3 = _mm512_loadu_si512(L + 96), e4 = _mm512_loadu_si512(L + 128),
                    e5 = _mm512_loadu_si512(L + 160), e6 = _mm512_loadu_si512(L + 192),
                    e7 = _mm512_loadu_si512(L + 224);
      // this call reads G * 8 lines of codes: prefetch as many, kCodeAhead further on, spread over the tables
      for (int l = t * G / 2; l < (t + 1) * G / 2; ++l) __builtin_prefetch(c + kCodeAhead + 64 * l, 0, 3);
      for (int j = 0; j < G; ++j) {
        // codes of 32 rows for table t, widened to word indices; bits 0-5 pick within 64 entries (two
        // registers), bits 6 and 7 pick among the four quarter-tables
        const __m512i idx = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + j * kGroupBytes + t * kRowGroup)));
        const __m512i r0 = _mm512_permutex2var_epi16(e0, idx, e1);
        const __m512i r1 = _mm512_permutex2var_epi16(e2, idx, e3);
        const __m512i r2 = _mm512_permutex2var_epi16(e4, idx, e5);
        const __m512i r3 = _mm512_permutex2var_epi16(e6, idx, e7);
        const __mmask32 k6 = _mm512_test_epi16_mask(idx, bit6), k7 = _mm512_test_epi16_mask(idx, bit7);
        const __m512i lo = _mm512_mask_blend_epi16(k6, r0, r1), hi = _mm512_mask_blend_epi16(k6, r2, r3);
        a[j] = _mm512_add_epi16(a[j], _mm512_mask_blend_epi16(k7, lo, hi));
      }
    }
    for (int j = 0; j < G; ++j) {  // a pair of entries fits int16; widen before the next pair
      lo32[j] = _mm512_add_epi32(lo32[j], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a[j])));
      hi32[j] = _mm512_add_epi32(hi32[j], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(a[j], 1)));
    }
  }
  const __m512 vs = _mm512_set1_ps(step);
  for (int j = 0; j < G; ++j) {  // |sum| <= 16 * 16383 < 2^24: converted exactly
    float* o = acc + kRowGroup * j;
    _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo32[j]), vs, _mm512_loadu_ps(o)));
    _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi32[j]), vs, _mm512_loadu_ps(o + 16)));
  }
}
}  // namespace

QC_AVX512BW void walk_block(const uint8_t* blk, const int16_t* q, const float* step, int64_t slices, int64_t R,
                          float* acc) {
  const int64_t RG = (R + kRowGroup - 1) / kRowGroup;
  const uint8_t* c = blk;
  for (int64_t s = 0; s < slices; ++s) {
    const int16_t* Q = q + s * kSliceEntries;
    int64_t j = 0;
    for (; j + 4 <= RG; j += 4, c += 4 * kGroupBytes) walk_groups<4>(c, Q, step[s], acc + j * kRowGroup);
    for (; j < RG; ++j, c += kGroupBytes) walk_groups<1>(c, Q, step[s], acc + j * kRowGroup);
  }
}

#else  // not x86: the fp32 walk serves every call

void quantize_slice(const float*, const float*, int16_t*, float*) {}
void walk_block(const uint8_t*, const int16_t*, const float*, int64_t, int64_t, float*) {}

#endif

}  // namespace lut_i16
}  // namespace codebook
}  // namespace qcompile
