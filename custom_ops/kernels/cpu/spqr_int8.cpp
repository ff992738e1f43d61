// The int8 walk of SpQRMatMul at batch 1 (see spqr_int8.h): the prepared layout, the AVX-512 VNNI walk and
// its driver.
#include "spqr_int8.h"

#include <algorithm>
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
namespace int8_walk {

namespace {
int64_t row_blocks16(const Attrs& a) { return (a.N + kRows - 1) / kRows; }
constexpr int64_t kBatchesPerTask = 4;  // 256 rows
constexpr int64_t kCodeAhead = 8192;    // bytes prefetched (into L2) ahead of the walk, which streams them once
}  // namespace

bool available() { return cpu_has_avx512vnni() && !env_flag("QCOMPILE_SPQR_NO_AVX512"); }

bool supports(const Attrs& a) { return a.group_size == 16 && a.stat_bits <= 4 && a.stat_group % kRows == 0; }

int64_t prepared_bytes(const Attrs& a) { return row_blocks16(a) * a.groups() * group_bytes(a.bits); }

void pack(const Attrs& a, const uint32_t* codes, const uint32_t* stat_codes, uint8_t* dst) {
  const int64_t G = a.groups(), RB = row_blocks16(a), GB = group_bytes(a.bits);
  for (int64_t b0 = 0; b0 < RB; b0 += kBatch) {
    const int64_t J = std::min<int64_t>(kBatch, RB - b0);
    uint8_t* batch = dst + b0 * G * GB;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < J; ++j) {
        uint8_t* out = batch + (g * J + j) * GB;
        std::memset(out, 0, static_cast<size_t>(GB));
        for (int r = 0; r < kRows; ++r) {
          const int64_t n = (b0 + j) * kRows + r;
          if (n >= a.N) break;  // padding rows: code 0, never stored back
          const uint32_t* row = codes + n * a.code_words();
          for (int i = 0; i < 4; ++i)
            for (int k = 0; k < 4; ++k) {
              const int64_t p = 16 * g + 4 * i + k;  // < 16 G <= 32 chunks: inside the packed row
              const uint32_t c = code_at(row, p, a.bits);
              const int byte = 4 * r + k;
              if (a.bits == 4) {
                out[64 * (i / 2) + byte] |= (uint8_t)(c << (4 * (i % 2)));
              } else {
                out[byte] |= (uint8_t)((c & 3) << (2 * i));
                out[64 + 8 * i + byte / 8] |= (uint8_t)((c >> 2) << (byte % 8));
              }
            }
          uint32_t sc, zc;
          stat_codes_at(a, stat_codes + n * 2 * a.stat_words(), g, &sc, &zc);
          out[GB - kRows + r] = (uint8_t)(sc | zc << 4);
        }
      }
  }
}

#if QC_X86

namespace {

// acc[j] += the dense part of row block j of a batch of J, over every group. P: per row block [4][G],
// (ss, sm, zs·X_g, zm·X_g); s: the activation's scale per group.
template <int BITS, int J>
QC_AVX512VNNI void walk_batch(const uint8_t* c, int64_t G, const int8_t* q, const float* s, const float* P,
                              __m512* acc) {
  constexpr int kGroupBytes = group_bytes(BITS);
  const __m512i low4 = _mm512_set1_epi8(0x0F), low2 = _mm512_set1_epi8(3), four = _mm512_set1_epi8(4);
  const __m512i m4 = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < G; ++g, c += J * kGroupBytes, q += 16) {
    for (int l = 0; l < J * kGroupBytes; l += 64) __builtin_prefetch(c + kCodeAhead + l, 0, 2);
    int32_t xq[4];
    std::memcpy(xq, q, 16);
    const __m512i x0 = _mm512_set1_epi32(xq[0]), x1 = _mm512_set1_epi32(xq[1]), x2 = _mm512_set1_epi32(xq[2]),
                  x3 = _mm512_set1_epi32(xq[3]);
    const __m512 sg = _mm512_set1_ps(s[g]);
    for (int j = 0; j < J; ++j) {
      const uint8_t* cj = c + j * kGroupBytes;
      __m512i c0, c1, c2, c3;  // codes of positions 4i + k, byte 4r + k: row r
      if (BITS == 4) {
        const __m512i a = _mm512_loadu_si512(cj), b = _mm512_loadu_si512(cj + 64);
        c0 = _mm512_and_si512(a, low4);
        c1 = _mm512_and_si512(_mm512_srli_epi16(a, 4), low4);
        c2 = _mm512_and_si512(b, low4);
        c3 = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
      } else {  // low two bits from a shared byte, bit 2 from a mask (a masked add)
        const __m512i a = _mm512_loadu_si512(cj);
        uint64_t hi[4];
        std::memcpy(hi, cj + 64, 32);
        c0 = _mm512_and_si512(a, low2);
        c1 = _mm512_and_si512(_mm512_srli_epi16(a, 2), low2);
        c2 = _mm512_and_si512(_mm512_srli_epi16(a, 4), low2);
        c3 = _mm512_and_si512(_mm512_srli_epi16(a, 6), low2);
        c0 = _mm512_mask_add_epi8(c0, _cvtu64_mask64(hi[0]), c0, four);
        c1 = _mm512_mask_add_epi8(c1, _cvtu64_mask64(hi[1]), c1, four);
        c2 = _mm512_mask_add_epi8(c2, _cvtu64_mask64(hi[2]), c2, four);
        c3 = _mm512_mask_add_epi8(c3, _cvtu64_mask64(hi[3]), c3, four);
      }
      __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c0, x0);
      d = _mm512_dpbusd_epi32(d, c1, x1);
      d = _mm512_dpbusd_epi32(d, c2, x2);
      d = _mm512_dpbusd_epi32(d, c3, x3);
      const __m512i st = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cj + kGroupBytes - kRows)));
      const float* pj = P + j * 4 * G + g;
      const __m512 scale = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(st, m4)), _mm512_set1_ps(pj[0]),
                                           _mm512_set1_ps(pj[G]));
      const __m512 zero_x = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(st, 4)), _mm512_set1_ps(pj[2 * G]),
                                            _mm512_set1_ps(pj[3 * G]));
      acc[j] = _mm512_fmadd_ps(scale, _mm512_fmsub_ps(_mm512_cvtepi32_ps(d), sg, zero_x), acc[j]);
    }
  }
}

// The row blocks [b0, b0 + J) of one batch: parameters, walk, then outliers and bias.
QC_AVX512VNNI void run_batch(const Attrs& a, const Weights& w, const int8_t* q, const float* s, const float* xsum,
                             const float* xhat, const float* bias, float* y, const uint8_t* prepared, int64_t b0,
                             int64_t J) {
  const int64_t G = a.groups();
  thread_local std::vector<float> P;
  P.resize(static_cast<size_t>(J * G * 4));
  for (int64_t j = 0; j < J; ++j) {
    const int64_t rb = (b0 + j) * kRows / a.stat_group;  // this block's row block of second-level parameters
    float* pj = P.data() + j * 4 * G;
    simd::half_to_float_avx2(w.stat_params + rb * 4 * G, pj, 4 * G);
    for (int64_t g = 0; g < G; ++g) {
      pj[2 * G + g] *= xsum[g];
      pj[3 * G + g] *= xsum[g];
    }
  }
  __m512 acc[kBatch];
  for (int j = 0; j < kBatch; ++j) acc[j] = _mm512_setzero_ps();
  const uint8_t* c = prepared + b0 * G * group_bytes(a.bits);
  const bool three = a.bits == 3;
  switch (J) {
    case 4: (three ? walk_batch<3, 4> : walk_batch<4, 4>)(c, G, q, s, P.data(), acc); break;
    case 3: (three ? walk_batch<3, 3> : walk_batch<4, 3>)(c, G, q, s, P.data(), acc); break;
    case 2: (three ? walk_batch<3, 2> : walk_batch<4, 2>)(c, G, q, s, P.data(), acc); break;
    default: (three ? walk_batch<3, 1> : walk_batch<4, 1>)(c, G, q, s, P.data(), acc); break;
  }
  alignas(64) float dense[kBatch * kRows];
  for (int j = 0; j < kBatch; ++j) _mm512_store_ps(dense + kRows * j, acc[j]);
  const detail::Call call{&a, &w, 1, nullptr, 0, xhat, nullptr, 0, bias, y, nullptr, nullptr, nullptr};
  for (int64_t r = 0; r < J * kRows; ++r) {
    const int64_t n = b0 * kRows + r;
    if (n >= a.N) break;
    float v = dense[r] + detail::outliers_avx2(call, n, 0);
    if (bias) v += bias[n];
    y[n] = v;
  }
}

}  // namespace

Status run(const Attrs& a, const Weights& w, const int8_t* q, const float* s, const float* xhat, const float* bias,
           float* y, const uint8_t* prepared, const Parallel& par) {
  const int64_t G = a.groups(), RB = row_blocks16(a);
  thread_local std::vector<float> xsum_buf;  // X_g = s_g · Σ_{p∈g} q_p
  xsum_buf.resize(static_cast<size_t>(G));
  for (int64_t g = 0; g < G; ++g) {
    int32_t sum = 0;
    for (int i = 0; i < 16; ++i) sum += q[16 * g + i];
    xsum_buf[g] = s[g] * static_cast<float>(sum);
  }
  const float* xsum = xsum_buf.data();
  const int64_t batches = (RB + kBatch - 1) / kBatch;
  const int64_t tasks = (batches + kBatchesPerTask - 1) / kBatchesPerTask;
  return tile::run_tasks(par, tasks, detail::kOp, [&](int64_t t) {
    for (int64_t bt = t * kBatchesPerTask; bt < std::min(batches, (t + 1) * kBatchesPerTask); ++bt) {
      const int64_t b0 = bt * kBatch;
      run_batch(a, w, q, s, xsum, xhat, bias, y, prepared, b0, std::min<int64_t>(kBatch, RB - b0));
    }
  });
}

#else  // not x86: the fp32 paths serve every call

Status run(const Attrs&, const Weights&, const int8_t*, const float*, const float*, const float*, float*,
           const uint8_t*, const Parallel&) {
  return Status::Error("SpQRMatMul: int8 walk without AVX-512");
}

#endif

}  // namespace int8_walk
}  // namespace spqr
}  // namespace qcompile
