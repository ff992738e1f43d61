// Fixed-point pair-table walk for SpQRMatMul at batch 1 (see spqr_lut_i16.h): the prepared layout, the
// per-call tables, the AVX-512BW walk and its driver (run_pairs).
#include "spqr_lut_i16.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "qcompile/cpu_features.h"
#include "simd.h"
#include "spqr_matmul_internal.h"
#include "tile_gemm.h"

// GCC 12 reports its own AVX-512 intrinsics' deliberately undefined pass-through operands (_mm512_undefined_*)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace qcompile {
namespace spqr {
namespace lut_i16 {

namespace {
int64_t row_groups(int64_t R) { return (R + kRowGroup - 1) / kRowGroup; }
constexpr int64_t kCodeAhead = 4096;  // bytes prefetched ahead of the walk (it streams the codes once)
}  // namespace

bool supports(const Attrs& a) {
  return a.bits == 3 && a.group_size == 16 && a.stat_bits <= 4 && a.stat_group % 16 == 0;
}

int64_t prepared_bytes(const Attrs& a) {
  const int64_t full = a.N / kBlockRows, rest = a.N % kBlockRows;
  return (full * (kBlockRows / kRowGroup) + row_groups(rest)) * a.groups() * kGroupBytes;
}

void pack(const Attrs& a, const uint32_t* codes, const uint32_t* stat_codes, uint8_t* dst) {
  const int64_t G = a.groups();
  for (int64_t n0 = 0; n0 < a.N; n0 += kBlockRows) {
    const int64_t R = std::min(kBlockRows, a.N - n0), RG = row_groups(R);
    uint8_t* blk = dst + n0 / kRowGroup * G * kGroupBytes;
    for (int64_t gs = 0; gs < G; gs += kSliceGroups) {
      const int64_t ng = std::min<int64_t>(kSliceGroups, G - gs);
      for (int64_t rg = 0; rg < RG; ++rg)
        for (int64_t gi = 0; gi < ng; ++gi) {
          uint8_t* out = blk + ((gs * RG) + rg * ng + gi) * kGroupBytes;
          const int64_t g = gs + gi;
          for (int i = 0; i < kRowGroup; ++i) {
            const int64_t n = n0 + rg * kRowGroup + i;
            if (n >= a.N) {  // padding rows: code 0, never stored back
              for (int p = 0; p <= kPairs; ++p) out[p * kRowGroup + i] = 0;
              continue;
            }
            const uint32_t* row = codes + n * a.code_words();
            for (int p = 0; p < kPairs; ++p) {
              const int64_t pos = 16 * g + 2 * p;  // < 16·G <= chunks·32: inside the packed row
              out[p * kRowGroup + i] = (uint8_t)(code_at(row, pos, 3) | code_at(row, pos + 1, 3) << 3);
            }
            uint32_t sc, zc;
            stat_codes_at(a, stat_codes + n * 2 * a.stat_words(), g, &sc, &zc);
            out[kPairs * kRowGroup + i] = (uint8_t)(sc | zc << 4);
          }
        }
    }
  }
}

bool available() { return avx512bw_enabled("QCOMPILE_SPQR_LUT_FP32"); }

#if QC_X86

QC_AVX512BW bool build_tables(const float* xk, int64_t G, int16_t* lut, float* step) {
  // entry i of a pair table: (i & 7) - 4 times x_a plus (i >> 3) - 4 times x_b; four vectors of 16 entries
  alignas(64) float ca[kEntries], cb[kEntries];
  for (int i = 0; i < kEntries; ++i) {
    ca[i] = (float)((i & 7) - 4);
    cb[i] = (float)((i >> 3) - 4);
  }
  for (int64_t g = 0; g < G; ++g) {
    const float* x = xk + 16 * g;
    float bound = 0.f, sum = 0.f;  // (std::max drops a NaN; the sum keeps it)
    for (int p = 0; p < kPairs; ++p) {
      const float b = 4.f * (std::fabs(x[2 * p]) + std::fabs(x[2 * p + 1]));
      bound = std::max(bound, b);
      sum += b;
    }
    if (!std::isfinite(sum)) return false;
    step[g] = bound > 0.f ? bound / kPairMax : 0.f;
    const float inv = bound > 0.f ? kPairMax / bound : 0.f;
    int16_t* out = lut + g * kPairs * kEntries;
    for (int p = 0; p < kPairs; ++p) {
      const __m512 xa = _mm512_set1_ps(x[2 * p] * inv), xb = _mm512_set1_ps(x[2 * p + 1] * inv);
      for (int i = 0; i < kEntries; i += 16) {  // |entry| <= kPairMax: rounds to nearest, fits int16
        const __m512 e = _mm512_fmadd_ps(_mm512_load_ps(ca + i), xa, _mm512_mul_ps(_mm512_load_ps(cb + i), xb));
        _mm256_storeu_si256((__m256i*)(out + p * kEntries + i), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(e)));
      }
    }
  }
  return true;
}

namespace {
// Group g of J row groups (c[j]: row group j's pair and stat codes of this group): acc[2j + h] += the dense
// part scale * (step * D - (zero - 4) * xsum) of its 16-row halves h.
template <int J>
QC_AVX512BW inline void groups_dot(const uint8_t* const* c, const int16_t* T, float step, float xs,
                                 const float* const* P, int64_t G, __m512* acc) {
  __m512i d[J];
  for (int j = 0; j < J; ++j) d[j] = _mm512_setzero_si512();
  for (int p = 0; p < kPairs; ++p) {
    const __m512i e0 = _mm512_loadu_si512(T + p * kEntries), e1 = _mm512_loadu_si512(T + p * kEntries + 32);
    for (int j = 0; j < J; ++j) {
      const __m512i idx = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(c[j] + p * kRowGroup)));
      d[j] = _mm512_add_epi16(d[j], _mm512_permutex2var_epi16(e0, idx, e1));
    }
  }
  const __m512 vstep = _mm512_set1_ps(step), vxs = _mm512_set1_ps(xs);
  const __m512i m4 = _mm512_set1_epi32(15);
  for (int j = 0; j < J; ++j) {
    const uint8_t* st = c[j] + kPairs * kRowGroup;
    for (int h = 0; h < 2; ++h) {  // 16 rows of one row block each
      const __m512i s = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(st + 16 * h)));
      const float* q = P[2 * j + h];  // (ss, sm, zs, zm - 4) of this group, G apart
      const __m512 scale = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(s, m4)), _mm512_set1_ps(q[0]),
                                           _mm512_set1_ps(q[G]));
      const __m512 zero = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(s, 4)), _mm512_set1_ps(q[2 * G]),
                                          _mm512_set1_ps(q[3 * G]));
      const __m256i dh = h ? _mm512_extracti64x4_epi64(d[j], 1) : _mm512_castsi512_si256(d[j]);
      const __m512 D = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(dh));  // |D| <= 8 * 4095: exact
      const __m512 t = _mm512_fmsub_ps(D, vstep, _mm512_mul_ps(zero, vxs));
      acc[2 * j + h] = _mm512_fmadd_ps(scale, t, acc[2 * j + h]);
    }
  }
}

template <int J>
QC_AVX512BW inline void row_groups_slice(const Attrs& a, const uint8_t* c, int64_t ng, int64_t gs, int64_t n0,
                                       int64_t rg, const int16_t* lut, const float* step, const float* xsum,
                                       const float* params, float* acc) {
  const int64_t G = a.groups(), last_rb = a.row_blocks() - 1;
  __m512 v[2 * J];
  const float* pr[2 * J];  // second-level parameters of each 16-row half (padding rows: the last block's)
  for (int j = 0; j < J; ++j)
    for (int h = 0; h < 2; ++h) {
      v[2 * j + h] = _mm512_loadu_ps(acc + (rg + j) * kRowGroup + 16 * h);
      const int64_t rb = std::min(last_rb, (n0 + (rg + j) * kRowGroup + 16 * h) / a.stat_group);
      pr[2 * j + h] = params + (rb - n0 / a.stat_group) * 4 * G;
    }
  for (int64_t gi = 0; gi < ng; ++gi) {
    const int64_t g = gs + gi;
    const uint8_t* cj[J];
    const float* P[2 * J];
    for (int j = 0; j < J; ++j) cj[j] = c + (j * ng + gi) * kGroupBytes;
    for (int k = 0; k < 2 * J; ++k) P[k] = pr[k] + g;
    // these J row groups' codes are one run of J * ng * kGroupBytes bytes: prefetch it kCodeAhead further
    // on, J * kGroupBytes per group
    const uint8_t* pf = c + kCodeAhead + gi * J * kGroupBytes;
    for (int l = 0; l < J * kGroupBytes; l += 64) __builtin_prefetch(pf + l, 0, 3);
    groups_dot<J>(cj, lut + g * kPairs * kEntries, step[g], xsum[g], P, G, v);
  }
  for (int k = 0; k < 2 * J; ++k) _mm512_storeu_ps(acc + rg * kRowGroup + 16 * k, v[k]);
}
}  // namespace

QC_AVX512BW void walk_block(const Attrs& a, const uint8_t* blk, int64_t n0, int64_t R, const int16_t* lut,
                          const float* step, const float* xsum, const float* params, float* acc) {
  const int64_t G = a.groups(), RG = row_groups(R);
  std::fill(acc, acc + RG * kRowGroup, 0.f);
  for (int64_t gs = 0; gs < G; gs += kSliceGroups) {
    const int64_t ng = std::min<int64_t>(kSliceGroups, G - gs);
    const uint8_t* c = blk + gs * RG * kGroupBytes;
    int64_t rg = 0;
    for (; rg + 2 <= RG; rg += 2) row_groups_slice<2>(a, c + rg * ng * kGroupBytes, ng, gs, n0, rg, lut, step, xsum, params, acc);
    for (; rg < RG; ++rg) row_groups_slice<1>(a, c + rg * ng * kGroupBytes, ng, gs, n0, rg, lut, step, xsum, params, acc);
  }
}

// ---- per-call driver ----------------------------------------------------------------------------------

namespace {
using detail::Call;
using detail::kOp;

// One block of rows of run_pairs: dense parts, then outliers and bias.
QC_AVX2 void pairs_block(const Call& c, const PreparedCodes& prep, const int16_t* lut, const float* step, int64_t n0) {
  const Attrs& s = *c.s;
  const int64_t G = s.groups(), R = std::min(kBlockRows, s.N - n0);
  // this block's second-level parameters widened to fp32 [rb][4][G], the zero offset shifted by 4 (the
  // tables centre the codes)
  const int64_t rb0 = n0 / s.stat_group, rb1 = (n0 + R - 1) / s.stat_group;
  thread_local std::vector<float> params, acc;
  params.resize((size_t)((rb1 - rb0 + 1) * 4 * G));
  for (int64_t rb = rb0; rb <= rb1; ++rb) {
    const uint16_t* src = c.w->stat_params + rb * 4 * G;
    float* dst = params.data() + (rb - rb0) * 4 * G;
    simd::half_to_float_avx2(src, dst, 4 * G);
    for (int64_t g = 0; g < G; ++g) dst[3 * G + g] -= 4.f;
  }
  acc.resize((size_t)detail::round_up(R, kRowGroup));
  walk_block(s, prep.pairs.data() + n0 / kRowGroup * G * kGroupBytes, n0, R, lut, step, c.xsum, params.data(),
             acc.data());
  for (int64_t r = 0; r < R; ++r) {
    float v = acc[(size_t)r] * c.dense_scale + detail::outliers_avx2(c, n0 + r, 0);
    if (c.bias) v += c.bias[n0 + r];
    c.y[n0 + r] = v;
  }
}

}  // namespace

// M == 1 over the fixed-point walk's layout: tables once per call, then per block of rows the dense parts,
// then each row's outliers and bias.
Status run(const Attrs& s, const Weights& w, const float* xk, const float* xorig, const float* xsum, int64_t Gp,
           float dense_scale, const float* bias, float* y, const PreparedCodes& prep, const Parallel& par,
           bool* ran) {
  const int64_t G = s.groups();
  thread_local std::vector<int16_t> lut_buf;
  thread_local std::vector<float> step_buf;
  lut_buf.resize((size_t)(G * kPairs * kEntries));
  step_buf.resize((size_t)G);
  *ran = build_tables(xk, G, lut_buf.data(), step_buf.data());
  if (!*ran) return Status::OK();
  const int16_t* lut = lut_buf.data();  // the calling thread's buffers, shared with the tasks
  const float* step = step_buf.data();
  const Call c{&s, &w, 1, xk, s.chunks() * kChunk, xorig, xsum, Gp, bias, y, nullptr, nullptr, nullptr, dense_scale};
  const int64_t blocks = (s.N + kBlockRows - 1) / kBlockRows;
  return tile::run_tasks(par, blocks, kOp, [&](int64_t t) { pairs_block(c, prep, lut, step, t * kBlockRows); });
}

#else  // not x86: the fp32 walk serves every call

bool build_tables(const float*, int64_t, int16_t*, float*) { return false; }
void walk_block(const Attrs&, const uint8_t*, int64_t, int64_t, const int16_t*, const float*, const float*,
                const float*, float*) {}

#endif

}  // namespace lut_i16
}  // namespace spqr
}  // namespace qcompile
