// int8 lookup walk for CodebookMatMul at accuracy_level 4 (see codebook_lut_i8.h for the numerics).
//
// Why: the 16-bit walk needs 8 registers per table and four word permutes plus three blends per 32 rows;
// in int8 a table is 4 registers and two byte permutes plus a blend look up 64 rows. The looked-up bytes
// (entry + 128, so unsigned) are summed in 16-bit lanes, even and odd rows apart (each by one u8 x s8
// multiply-add with the table's power of two, no widening shuffles), and widened once per slice of 16 tables.
// On Intel cores the two byte permutes (two cycles each on port 5) are the floor: 64 rows in about 8 cycles
// here, against 10 with masks and shifts.
#include "codebook_lut_i8.h"

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
namespace lut_i8 {

namespace {
constexpr int64_t kSliceEntries = kTablesPerSlice * 256;
constexpr int64_t kGroupBytes = kTablesPerSlice * kRowGroup;  // one row group's codes of one slice
// Bytes of codes prefetched ahead of the walk, into L2 (it streams them once; this walk eats them twice as
// fast as the 16-bit one, so they are asked for further ahead). Zen 4 VM, 4096 x 4096, cold: 4 KB into L1
// 0.44-0.56 ms, 16-64 KB into L2 0.30-0.31 ms.
constexpr int64_t kCodeAhead = 16384;
}  // namespace

int64_t block_bytes(int64_t R, int64_t T16) { return (R + kRowGroup - 1) / kRowGroup * kRowGroup * T16; }

void pack_block(const uint8_t* codes, int64_t T, int64_t T16, int64_t n0, int64_t R, uint8_t* dst) {
  const int64_t RG = (R + kRowGroup - 1) / kRowGroup;
  std::memset(dst, 0, static_cast<size_t>(block_bytes(R, T16)));
  for (int64_t q = 0; q < T16 / kTablesPerSlice; ++q)
    for (int64_t r = 0; r < R; ++r) {
      const uint8_t* src = codes + (n0 + r) * T + q * kTablesPerSlice;
      uint8_t* grp = dst + (q * RG + r / kRowGroup) * kGroupBytes + r % kRowGroup;
      for (int64_t t = 0; t < kTablesPerSlice; ++t) grp[t * kRowGroup] = src[t];
    }
}

bool available() {
  return cpu_has_avx512vbmi() && !env_flag("QCOMPILE_CODEBOOK_LUT_FP32") && !env_flag("QCOMPILE_CODEBOOK_NO_INT8");
}

#if QC_X86

QC_AVX512VBMI void quantize_slice(const float* L, const float* tmax, uint8_t* out, uint8_t* shift, float* unit) {
  const float m = *std::max_element(tmax, tmax + kTablesPerSlice);
  *unit = m > 0.f ? m / (kLutI8Max * (1 << kMaxFiner)) : 0.f;
  const __m512i bias = _mm512_set1_epi32(128);
  for (int t = 0; t < kTablesPerSlice; ++t) {
    // e: how many times finer than the slice's step this table's step can be (|entry| * 2^e <= max)
    int e = 0;
    while (e < kMaxFiner && m > 0.f && tmax[t] * static_cast<float>(2 << e) <= m) ++e;
    shift[t] = static_cast<uint8_t>(kMaxFiner - e);
    const __m512 inv = _mm512_set1_ps(m > 0.f ? kLutI8Max * static_cast<float>(1 << e) / m : 0.f);
    for (int64_t i = 256 * t; i < 256 * (t + 1); i += 16) {
      // |entry| * 127 * 2^e / max rounds to at most 127: +128 fits a byte
      const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(L + i), inv)), bias);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtusepi32_epi8(v));
    }
  }
}

namespace {
// acc[64 j + slot] += unit * (sum over the slice's 16 tables of table[t][code] << shift[t]) for G row groups
// of 64.
template <int G>
QC_AVX512VBMI inline void walk_groups(const uint8_t* c, const uint8_t* Q, const uint8_t* shift, float unit,
                                      float* acc) {
  // 16-bit sums of (entry + 128) << shift of rows 2i and 2i + 1: at most 16 * 255 * 16 < 2^16; the sum less
  // the offsets fits int16 (|entry| << shift <= 127 * 16)
  __m512i even[G], odd[G];
  for (int j = 0; j < G; ++j) even[j] = odd[j] = _mm512_setzero_si512();
  int offset = 0;
  for (int t = 0; t < kTablesPerSlice; ++t) {
    // (entry + 128) << shift of the even / odd byte of each 16-bit lane, by one u8 x s8 multiply-add each
    // (the other byte's factor is 0): two uops where a mask and three shifts took six
    const int16_t f = static_cast<int16_t>(1 << shift[t]);
    const __m512i f_even = _mm512_set1_epi16(f), f_odd = _mm512_set1_epi16(static_cast<int16_t>(f << 8));
    offset += 128 << shift[t];
    const uint8_t* L = Q + t * 256;
    const __m512i e0 = _mm512_loadu_si512(L), e1 = _mm512_loadu_si512(L + 64), e2 = _mm512_loadu_si512(L + 128),
                  e3 = _mm512_loadu_si512(L + 192);
    // this call reads G * 16 lines of codes: prefetch as many into L2, kCodeAhead further on
    for (int j = 0; j < G; ++j) __builtin_prefetch(c + kCodeAhead + j * kGroupBytes + t * kRowGroup, 0, 2);
    for (int j = 0; j < G; ++j) {
      // bits 0-6 pick among 128 entries (two registers), bit 7 between the table's halves
      const __m512i idx = _mm512_loadu_si512(c + j * kGroupBytes + t * kRowGroup);
      const __m512i lo = _mm512_permutex2var_epi8(e0, idx, e1), hi = _mm512_permutex2var_epi8(e2, idx, e3);
      const __m512i r = _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi);
      even[j] = _mm512_add_epi16(even[j], _mm512_maddubs_epi16(r, f_even));
      odd[j] = _mm512_add_epi16(odd[j], _mm512_maddubs_epi16(r, f_odd));
    }
  }
  const __m512 vs = _mm512_set1_ps(unit);
  const __m512i off = _mm512_set1_epi16(static_cast<int16_t>(offset - 65536 * (offset >= 32768)));
  for (int j = 0; j < G; ++j) {  // the sum (mod 2^16) less the offsets is the exact int16 sum
    float* o = acc + kRowGroup * j;
    const __m512i e = _mm512_sub_epi16(even[j], off), d = _mm512_sub_epi16(odd[j], off);
    const __m512 parts[4] = {_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(e))),
                             _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(e, 1))),
                             _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(d))),
                             _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(d, 1)))};
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(o + 16 * k, _mm512_fmadd_ps(parts[k], vs, _mm512_loadu_ps(o + 16 * k)));
  }
}
}  // namespace

QC_AVX512VBMI void walk_block(const uint8_t* blk, const uint8_t* q, const uint8_t* shift, const float* unit,
                              int64_t slices, int64_t R, float* acc) {
  const int64_t RG = (R + kRowGroup - 1) / kRowGroup;
  const uint8_t* c = blk;
  for (int64_t s = 0; s < slices; ++s) {
    const uint8_t* Q = q + s * kSliceEntries;
    const uint8_t* sh = shift + s * kTablesPerSlice;
    int64_t j = 0;
    for (; j + 4 <= RG; j += 4, c += 4 * kGroupBytes) walk_groups<4>(c, Q, sh, unit[s], acc + j * kRowGroup);
    for (; j < RG; ++j, c += kGroupBytes) walk_groups<1>(c, Q, sh, unit[s], acc + j * kRowGroup);
  }
}

#else  // not x86: the fp32 walk serves every call

void quantize_slice(const float*, const float*, uint8_t*, uint8_t*, float*) {}
void walk_block(const uint8_t*, const uint8_t*, const uint8_t*, const float*, int64_t, int64_t, float*) {}

#endif

}  // namespace lut_i8
}  // namespace codebook
}  // namespace qcompile
