// Small building blocks every CPU kernel uses: horizontal sums, an in-register 8x8 transpose, fp16 widening
// (QC_AVX2 inline functions: call them only from QC_AVX2 code, after cpu_has_avx2(), where they inline),
// and portable scans (unaligned loads, finiteness checks).
#pragma once

#include <cstdint>
#include <cstring>

#include "qcompile/cpu_features.h"
#include "qcompile/half.h"

namespace qcompile {
namespace simd {

// Four unaligned bytes as a little-endian word (no alignment or aliasing assumptions).
inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// No x[i] is Inf or NaN. Branch-free over the exponent bits, so the compiler vectorises it.
inline bool all_finite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, 4);
    bad |= (b & 0x7F800000u) == 0x7F800000u;
  }
  return bad == 0;
}

// The same for fp16 bits.
inline bool all_finite(const uint16_t* h, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= (h[i] & 0x7C00u) == 0x7C00u;
  return bad == 0;
}

#if QC_X86

// Sum of the 8 lanes.
QC_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Four 8-lane accumulators -> their four sums.
QC_AVX2 inline __m128 reduce4(__m256 p, __m256 q, __m256 r, __m256 s) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(p, q), _mm256_hadd_ps(r, s));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// In-register 8x8 transpose: v[i][t] -> v[t][i].
QC_AVX2 inline void transpose8(__m256 v[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  v[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  v[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  v[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  v[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  v[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  v[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  v[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  v[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// 8 fp16 values (unaligned) widened to fp32.
QC_AVX2 inline __m256 load_half8(const uint16_t* h) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
}

// out[i] = fp16 h[i] widened, i < n (exact, like half_to_float).
QC_AVX2 inline void half_to_float_avx2(const uint16_t* h, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load_half8(h + i));
  for (; i < n; ++i) out[i] = half_to_float(h[i]);
}

#endif  // QC_X86

}  // namespace simd
}  // namespace qcompile
