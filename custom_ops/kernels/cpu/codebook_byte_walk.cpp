// The batch-1 LUT walk over byte codes (CodebookMatMul, aqlm-2x8 and other 256-entry codebooks): for each
// output row, the sum of one entry per table, tables in L1-sized slices of 16 and rows streamed past each
// slice. The portable form and the AVX2/BMI2 form share the walk and differ in the 16-lookup sum. The
// AVX-512BW fixed-point form of the same walk is in codebook_lut_i16.cpp.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "codebook_matmul_internal.h"
#include "qcompile/cpu_features.h"

namespace qcompile {
namespace codebook {
namespace detail {

// Tables T16..T-1 (fewer than a slice of 16) for rows n0..n1-1, read from the file-order codes.
void lut_rows_u8_tail(const uint8_t* codes, const float* lut, int64_t T, int64_t T16, int64_t n0, int64_t n1,
                      float* acc) {
  if (T16 >= T) return;
  for (int64_t n = n0; n < n1; ++n) {
    float s = 0.f;
    for (int64_t t = T16; t < T; ++t) s += lut[t * 256 + codes[n * T + t]];
    acc[n - n0] += s;
  }
}

namespace {

// Byte codes over full 256-entry tables (no range check needed): the sum of 16 lookups in 16 consecutive
// tables, codes taken from two 64-bit loads (register shifts instead of 16 byte loads) and added as a tree
// (short dependency chains, each add folds its table load).
inline float lut16_u8(const uint8_t* c, const float* L) {
  uint64_t a, b;
  std::memcpy(&a, c, 8);
  std::memcpy(&b, c + 8, 8);
  const float v0 = L[a & 255] + L[256 + ((a >> 8) & 255)];
  const float v1 = L[512 + ((a >> 16) & 255)] + L[768 + ((a >> 24) & 255)];
  const float v2 = L[1024 + ((a >> 32) & 255)] + L[1280 + ((a >> 40) & 255)];
  const float v3 = L[1536 + ((a >> 48) & 255)] + L[1792 + (a >> 56)];
  const float v4 = L[2048 + (b & 255)] + L[2304 + ((b >> 8) & 255)];
  const float v5 = L[2560 + ((b >> 16) & 255)] + L[2816 + ((b >> 24) & 255)];
  const float v6 = L[3072 + ((b >> 32) & 255)] + L[3328 + ((b >> 40) & 255)];
  const float v7 = L[3584 + ((b >> 48) & 255)] + L[3840 + (b >> 56)];
  return ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7));
}

#if QC_X86
// The same sum with AVX2-era scalar code: BMI2 shifts (no register copies) pick the bytes, and half of the
// adds are FMAs with 1.0 (exact, one rounding like an add) so they issue on the FMA pipes next to the adders.
QC_AVX2_BMI2 inline float lut16_u8_avx2(const uint8_t* c, const float* L) {
  uint64_t a, b;
  std::memcpy(&a, c, 8);
  std::memcpy(&b, c + 8, 8);
  const __m128 one = _mm_set_ss(1.0f);
#define QC_LD(t, v, sh) _mm_load_ss(L + (t) * 256 + (((v) >> (sh)) & 255))
#define QC_FADD(acc, v) _mm_fmadd_ss((v), one, (acc))
  const __m128 v0 = _mm_add_ss(QC_LD(0, a, 0), QC_LD(1, a, 8));
  const __m128 v1 = QC_FADD(QC_LD(2, a, 16), QC_LD(3, a, 24));
  const __m128 v2 = _mm_add_ss(QC_LD(4, a, 32), QC_LD(5, a, 40));
  const __m128 v3 = QC_FADD(QC_LD(6, a, 48), QC_LD(7, a, 56));
  const __m128 v4 = _mm_add_ss(QC_LD(8, b, 0), QC_LD(9, b, 8));
  const __m128 v5 = QC_FADD(QC_LD(10, b, 16), QC_LD(11, b, 24));
  const __m128 v6 = _mm_add_ss(QC_LD(12, b, 32), QC_LD(13, b, 40));
  const __m128 v7 = QC_FADD(QC_LD(14, b, 48), QC_LD(15, b, 56));
  return _mm_cvtss_f32(
      _mm_add_ss(QC_FADD(_mm_add_ss(v0, v1), QC_FADD(v2, v3)), QC_FADD(_mm_add_ss(v4, v5), QC_FADD(v6, v7))));
#undef QC_LD
#undef QC_FADD
}
// The same sum, codes 0-7 extracted from one 64-bit load by shifts and codes 8-15 read by their own byte
// loads (movzx from memory, no ALU work): spreads the work over the ALUs and the load ports, ~7% faster
// on the prepared walk than extracting all 16 by shifts on Zen 3 (bound by the instructions per lookup).
QC_AVX2_BMI2 inline float lut16_u8_mixed(const uint8_t* c, const float* L) {
  uint64_t a;
  std::memcpy(&a, c, 8);
  const float v0 = L[a & 255] + L[256 + ((a >> 8) & 255)];
  const float v1 = L[512 + ((a >> 16) & 255)] + L[768 + ((a >> 24) & 255)];
  const float v2 = L[1024 + ((a >> 32) & 255)] + L[1280 + ((a >> 40) & 255)];
  const float v3 = L[1536 + ((a >> 48) & 255)] + L[1792 + (a >> 56)];
#define QC_LB(t) L[(t) * 256 + c[t]]
  const float v4 = QC_LB(8) + QC_LB(9), v5 = QC_LB(10) + QC_LB(11), v6 = QC_LB(12) + QC_LB(13),
              v7 = QC_LB(14) + QC_LB(15);
#undef QC_LB
  return ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7));
}
#endif  // QC_X86

// y[n] += sum_t lut[t][codes[n, t]] for rows [n0, n1), uint8 codes into 256-entry tables (LS == 256).
// Codes are row-major with a row stride of T bytes (1 KB at K=4096), so walking 16-byte slices of many
// rows would thrash the cache sets. Instead, per super-slice of up to kSuper tables, the task first copies
// each row's codes (whole cache lines, prefetched ahead) into a slice-major buffer (L2-resident), then
// walks 16 KB LUT slices of 16 tables, L1-resident, over the buffer read sequentially.
constexpr int64_t kSuper = 256;
template <float (*Lut16)(const uint8_t*, const float*)>
__attribute__((always_inline)) inline void lut_rows_u8_impl(const uint8_t* codes, const float* lut, int64_t T,
                                                            int64_t n0, int64_t n1, float* acc) {
  thread_local std::vector<uint8_t> buf_store;
  const int64_t R = n1 - n0;
  const int64_t QS = R * 16 + 64;  // sub-slice stride, one line off a multiple of 4 KB (no set conflicts)
  if (buf_store.size() < static_cast<size_t>(kSuper / 16 * QS)) buf_store.resize(static_cast<size_t>(kSuper / 16 * QS));
  uint8_t* buf = buf_store.data();
  const int64_t T16 = T / 16 * 16;
  constexpr int64_t kAhead = 8;  // rows prefetched ahead of the copy
  for (int64_t t0 = 0; t0 < T16; t0 += kSuper) {
    const int64_t q_end = std::min<int64_t>(kSuper, T16 - t0) / 16;
    const uint8_t* src = codes + n0 * T + t0;
    for (int64_t r = 0; r < R; ++r, src += T) {
      if (r + kAhead < R)
        for (int64_t b = 0; b < 16 * q_end; b += 64) __builtin_prefetch(src + kAhead * T + b);
      if (q_end == kSuper / 16) {  // the common case, fully unrolled
        for (int64_t q = 0; q < kSuper / 16; ++q) std::memcpy(buf + q * QS + r * 16, src + 16 * q, 16);
      } else {
        for (int64_t q = 0; q < q_end; ++q) std::memcpy(buf + q * QS + r * 16, src + 16 * q, 16);
      }
    }
    // While the rows pass over the first four sub-slices, prefetch the next super-slice's code lines (one
    // line per row per pass), so the next copy finds them in cache.
    const int64_t next = t0 + kSuper;
    for (int64_t q = 0; q < q_end; ++q) {
      const float* L = lut + (t0 + 16 * q) * 256;
      const uint8_t* c = buf + q * QS;
      if (q < 4 && next + 64 * q < T16) {
        const uint8_t* pf = codes + n0 * T + next + 64 * q;
        for (int64_t r = 0; r < R; ++r, c += 16, pf += T) {
          __builtin_prefetch(pf, 0, 2);
          acc[r] += Lut16(c, L);
        }
      } else {
        for (int64_t r = 0; r < R; ++r, c += 16) acc[r] += Lut16(c, L);
      }
    }
  }
  lut_rows_u8_tail(codes, lut, T, T16, n0, n1, acc);
}

// Code bytes ahead of the sliced walk to prefetch (into L1): the walk streams them once, from DRAM when the
// caches are cold, and the hardware prefetcher alone did not keep up (the same held for SpQR's lanes). A/B on
// a 2-core AMD EPYC (Zen 4) VM, 4096x4096 aqlm-2x8, M = 1, one thread, cold: 1.23-1.30 ms -> 1.03-1.11 ms.
constexpr int64_t kCodePrefetch = 2048;

// The same sums over codes prepared once in slice order (PreparedCodes::sliced; `blk` is this block of
// rows): the walk reads them strictly sequentially, no per-call copy.
template <float (*Lut16)(const uint8_t*, const float*)>
__attribute__((always_inline)) inline void lut_rows_u8_sliced_impl(const uint8_t* codes, const uint8_t* blk,
                                                                   const float* lut, int64_t T, int64_t n0,
                                                                   int64_t n1, float* acc) {
  const int64_t R = n1 - n0;
  const int64_t T16 = T / 16 * 16;
  const uint8_t* c = blk;
  constexpr int64_t kSliceLines = 16 * 256 * 4 / 64;  // cache lines of one 16-table LUT slice
  for (int64_t t0 = 0; t0 < T16; t0 += 16) {
    const float* L = lut + t0 * 256;
    // While walking this slice, prefetch the next one a line per two rows (all of it for blocks of 512 rows),
    // so it comes from L2 rather than on demand from L3 (the whole LUT is larger than L2).
    const char* next = reinterpret_cast<const char*>(L + 16 * 256);
    const int64_t lines = t0 + 16 < T16 ? kSliceLines : 0;
    int64_t r = 0, line = 0;
    for (; r + 2 <= R; r += 2, c += 32) {
      if (line < lines) __builtin_prefetch(next + 64 * line++, 0, 1);
      if (r & 2) __builtin_prefetch(c + kCodePrefetch, 0, 3);  // a 64-byte line of codes per 4 rows
      acc[r] += Lut16(c, L);
      acc[r + 1] += Lut16(c + 16, L);
    }
    for (; r < R; ++r, c += 16) acc[r] += Lut16(c, L);
  }
  lut_rows_u8_tail(codes, lut, T, T16, n0, n1, acc);
}

}  // namespace

void lut_rows_u8(const uint8_t* codes, const uint8_t* blk, const float* lut, int64_t T, int64_t n0, int64_t n1,
                 float* acc) {
  if (blk) lut_rows_u8_sliced_impl<lut16_u8>(codes, blk, lut, T, n0, n1, acc);
  else lut_rows_u8_impl<lut16_u8>(codes, lut, T, n0, n1, acc);
}
#if QC_X86
QC_AVX2_BMI2 void lut_rows_u8_avx2(const uint8_t* codes, const uint8_t* blk, const float* lut, int64_t T, int64_t n0,
                                 int64_t n1, float* acc) {
  // (the copying walk gains nothing from the mixed form: measured equal)
  if (blk) lut_rows_u8_sliced_impl<lut16_u8_mixed>(codes, blk, lut, T, n0, n1, acc);
  else lut_rows_u8_impl<lut16_u8_avx2>(codes, lut, T, n0, n1, acc);
}
#endif

}  // namespace detail
}  // namespace codebook
}  // namespace qcompile
