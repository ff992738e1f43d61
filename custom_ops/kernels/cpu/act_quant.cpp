// Block-of-16 int8 activation quantization (act_quant.h). The AVX2 form does the same IEEE operations
// (max of |x|, one division per element, round half to even), so both give bit-identical q and s.
#include "act_quant.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "qcompile/cpu_features.h"
#include "simd.h"

namespace qcompile {
namespace act_quant {
namespace {

void quantize_portable(const float* x, int64_t n, int8_t* q, float* scale) {
  for (int64_t b = 0; b < n; b += kBlock) {
    float amax = 0.f;
    for (int64_t i = b; i < b + kBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float s = amax / 127.0f;
    scale[b / kBlock] = s;
    for (int64_t i = b; i < b + kBlock; ++i) {
      const float r = s > 0.f ? std::nearbyint(x[i] / s) : 0.f;
      q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, r)));
    }
  }
}

#if QC_X86
QC_AVX2 void quantize_avx2(const float* x, int64_t n, int8_t* q, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f), lim = _mm256_set1_ps(127.f), nlim = _mm256_set1_ps(-127.f);
  for (int64_t b = 0; b < n; b += kBlock) {
    const __m256 v0 = _mm256_loadu_ps(x + b), v1 = _mm256_loadu_ps(x + b + 8);
    __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float s = _mm_cvtss_f32(h) / 127.0f;
    scale[b / kBlock] = s;
    if (!(s > 0.f)) {
      std::fill(q + b, q + b + kBlock, int8_t{0});
      continue;
    }
    const __m256 vs = _mm256_set1_ps(s);
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256 r0 = _mm256_min_ps(lim, _mm256_max_ps(nlim, _mm256_round_ps(_mm256_div_ps(v0, vs), kRound)));
    const __m256 r1 = _mm256_min_ps(lim, _mm256_max_ps(nlim, _mm256_round_ps(_mm256_div_ps(v1, vs), kRound)));
    const __m256i i16 = _mm256_packs_epi32(_mm256_cvtps_epi32(r0), _mm256_cvtps_epi32(r1));  // lane-interleaved
    const __m128i i8 = _mm_packs_epi16(_mm256_castsi256_si128(i16), _mm256_extracti128_si256(i16, 1));
    // packs order: r0[0..3] r1[0..3] r0[4..7] r1[4..7] -> restore 0..15
    const __m128i order = _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b), _mm_shuffle_epi8(i8, order));
  }
}
#endif

}  // namespace

bool quantize(const float* x, int64_t n, int8_t* q, float* scale) {
  if (!simd::all_finite(x, n)) return false;
#if QC_X86
  if (cpu_has_avx2()) {
    quantize_avx2(x, n, q, scale);
    return true;
  }
#endif
  quantize_portable(x, n, q, scale);
  return true;
}

bool round_trip(float* x, int64_t n) {
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> s;
  q.resize(static_cast<size_t>(n));
  s.resize(static_cast<size_t>(n / kBlock));
  if (!quantize(x, n, q.data(), s.data())) return false;
  for (int64_t i = 0; i < n; ++i) x[i] = s[static_cast<size_t>(i / kBlock)] * static_cast<float>(q[static_cast<size_t>(i)]);
  return true;
}

}  // namespace act_quant
}  // namespace qcompile
