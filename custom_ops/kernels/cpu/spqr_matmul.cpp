// CPU kernels for qcompile.SpQRMatMul (contract: include/qcompile/spqr_matmul.h, docs/ops.md).
//
// Per call, activations are converted to fp32, gathered into stored (permuted) order once (K gathers per
// row of X; the weight is never un-permuted) and zero-padded to whole 32-position chunks. Per row of W:
//   pass 1 decodes the row's group statistics (8 groups per vector step: the stat codes are bitstreams
//          and the fp16 second-level parameters are stored structure-of-arrays);
//   pass 2 streams the packed codes: any 8 codes are one unaligned 32-bit load, one broadcast, one
//          variable shift and one mask away from an integer vector. With M == 1 they go straight into
//          FMAs, y = sum_g scale_g * (dot(x_g, codes_g) - zero_g * sum(x_g)) with per-group sums of x
//          precomputed; with M > 1 four rows are dequantized into a cache-resident buffer and reused
//          for every row of X.
//   then the row's CSR outliers add value * x[col] (original feature order).
// Rows are split into tasks for the caller's Parallel (ORT's intra-op pool). A portable scalar path (no SIMD) serves other CPUs and the tests
// (QCOMPILE_SPQR_SCALAR=1 forces it).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QC_SPQR_X86 1
#else
#define QC_SPQR_X86 0
#endif

#include "qcompile/spqr_matmul.h"

namespace qcompile {
namespace spqr {
namespace {

constexpr int kRowTile = 4;  // rows dequantized together when M > 1

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct Call {
  const Attrs* s;
  const Weights* w;
  int64_t M;
  const float* xk;     // [M, Kc] stored order, zero padded
  int64_t Kc;          // chunks * 32
  const float* xorig;  // [M, K] original order (outliers index the original feature)
  const float* xsum;   // [M, Gp] per-group sums of xk, zero padded to Gp = round_up(G, 8)
  int64_t Gp;
  const float* bias;   // [N] fp32 or nullptr
  float* y;            // [M, N]
};

inline const uint16_t* row_params(const Call& c, int64_t n) {
  return c.w->stat_params + (n / c.s->stat_group) * 4 * c.s->groups();
}

// Scalar statistics of groups [g0, G) of row n into scale/zero.
void stats_scalar(const Call& c, int64_t n, int64_t g0, float* scale, float* zero) {
  const Attrs& s = *c.s;
  const int64_t G = s.groups();
  const uint32_t* srow = c.w->stat_codes + n * 2 * s.stat_words();
  const uint16_t* sp = row_params(c, n);
  for (int64_t g = g0; g < G; ++g) {
    uint32_t sc, zc;
    stat_codes_at(s, srow, g, &sc, &zc);
    scale[g] = (float)sc * half_to_float(sp[g]) + half_to_float(sp[G + g]);
    zero[g] = (float)zc * half_to_float(sp[2 * G + g]) + half_to_float(sp[3 * G + g]);
  }
}

template <typename Idx>
inline float outlier_sum(const Call& c, const Idx* cols, int64_t n, int64_t m) {
  const float* xo = c.xorig + m * c.s->K;
  float acc = 0.f;
  for (int32_t o = c.w->row_offsets[n]; o < c.w->row_offsets[n + 1]; ++o)
    acc += half_to_float(c.w->values[o]) * xo[cols[o]];
  return acc;
}

inline float outliers(const Call& c, int64_t n, int64_t m) {
  return c.w->col_int16 ? outlier_sum(c, (const int16_t*)c.w->col_indices, n, m)
                        : outlier_sum(c, (const int32_t*)c.w->col_indices, n, m);
}

// ---- portable scalar path ----

void rows_scalar(const Call& c, int64_t r0, int64_t r1) {
  const Attrs& s = *c.s;
  const int64_t G = s.groups();
  thread_local std::vector<float> wrow, scale, zero;
  wrow.assign((size_t)c.Kc, 0.f);
  scale.assign((size_t)G, 0.f);
  zero.assign((size_t)G, 0.f);
  for (int64_t n = r0; n < r1; ++n) {
    stats_scalar(c, n, 0, scale.data(), zero.data());
    const uint32_t* row = c.w->codes + n * s.code_words();
    for (int64_t p = 0; p < s.K; ++p) {
      const int64_t g = p / s.group_size;
      wrow[(size_t)p] = scale[(size_t)g] * ((float)code_at(row, p, s.bits) - zero[(size_t)g]);
    }
    for (int64_t m = 0; m < c.M; ++m) {
      const float* x = c.xk + m * c.Kc;
      float acc = 0.f;
      for (int64_t p = 0; p < s.K; ++p) acc += x[p] * wrow[(size_t)p];
      acc += outliers(c, n, m);
      if (c.bias) acc += c.bias[n];
      c.y[m * s.N + n] = acc;
    }
  }
}

#if QC_SPQR_X86
// ---- AVX2 + FMA + F16C path ----
#define QC_AVX2 __attribute__((target("avx2,fma,f16c")))

QC_AVX2 inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

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
  const uint8_t* zbytes = sbytes + 4 * SW;
  const uint16_t* sp = row_params(c, n);
  const __m256i sh = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(sb));
  const __m256i mask = _mm256_set1_epi32((1 << sb) - 1);
  const int64_t last = 4 * SW - 4;  // last byte offset a 32-bit load may start at
  for (int64_t g = 0; g < G; g += 8) {
    // 8 groups of sb bits start on byte off; near the stream's end, load the stream's last 4 bytes
    // and shift (the stream covers these groups' bits, so they are all inside).
    const int64_t off = (g / 8) * sb;
    const int64_t at = std::min(off, last);
    const __m256i shift = _mm256_add_epi32(sh, _mm256_set1_epi32((int)(8 * (off - at))));
    const __m256 sc = _mm256_cvtepi32_ps(
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)load_u32(sbytes + at)), shift), mask));
    const __m256 zc = _mm256_cvtepi32_ps(
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)load_u32(zbytes + at)), shift), mask));
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

QC_AVX2 inline __m256i load_idx8(const int16_t* p) {
  return _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i*)p));
}
QC_AVX2 inline __m256i load_idx8(const int32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }

// Sum of value * x[col] over row n's outliers: 8 per step with a gather (indices were validated).
template <typename Idx>
QC_AVX2 inline float outlier_sum_f16c(const Call& c, const Idx* cols, int64_t n, const float* xo) {
  int64_t o = c.w->row_offsets[n];
  const int64_t end = c.w->row_offsets[n + 1];
  __m256 acc = _mm256_setzero_ps();
  for (; o + 8 <= end; o += 8) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(c.w->values + o)));
    acc = _mm256_fmadd_ps(v, _mm256_i32gather_ps(xo, load_idx8(cols + o), 4), acc);
  }
  float sum = hsum(acc);
  for (; o < end; ++o) sum += _cvtsh_ss(c.w->values[o]) * xo[cols[o]];
  return sum;
}

QC_AVX2 inline float outliers_avx2(const Call& c, int64_t n, int64_t m) {
  const float* xo = c.xorig + m * c.s->K;
  return c.w->col_int16 ? outlier_sum_f16c(c, (const int16_t*)c.w->col_indices, n, xo)
                        : outlier_sum_f16c(c, (const int32_t*)c.w->col_indices, n, xo);
}

// M == 1: fused decode + dot, one pass over each packed row.
template <int BITS>
QC_AVX2 void rows_avx2_m1(const Call& c, int64_t r0, int64_t r1) {
  const Attrs& s = *c.s;
  const int64_t Gp = c.Gp;
  const int64_t bpr = s.code_words() * 4;  // bytes per packed row
  const float* x = c.xk;
  thread_local std::vector<float> scale, zero;
  scale.assign((size_t)Gp, 0.f);  // entries G..Gp-1 stay 0: padded groups contribute nothing
  zero.assign((size_t)Gp, 0.f);
  for (int64_t n = r0; n < r1; ++n) {
    stats_avx2(c, n, scale.data(), zero.data());
    // zero-point term: sum_g scale_g * zero_g * sum(x_g)
    __m256 corr = _mm256_setzero_ps();
    for (int64_t g = 0; g < Gp; g += 8)
      corr = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(scale.data() + g), _mm256_loadu_ps(zero.data() + g)),
                             _mm256_loadu_ps(c.xsum + g), corr);
    const uint8_t* row = (const uint8_t*)c.w->codes + n * bpr;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    if (s.group_size == 16) {  // the paper's setting: a 32-code chunk is exactly two groups
      const int64_t chunks = c.Kc / 32;
      const uint8_t* chunk = row;
      const float* sc = scale.data();
      for (int64_t ch = 0; ch < chunks; ++ch, chunk += 4 * BITS, sc += 2) {
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
          acc1 = _mm256_fmadd_ps(t, _mm256_broadcast_ss(scale.data() + g), acc1);
        else
          acc0 = _mm256_fmadd_ps(t, _mm256_broadcast_ss(scale.data() + g), acc0);
      }
    }
    float v = hsum(_mm256_add_ps(acc0, acc1)) - hsum(corr) + outliers_avx2(c, n, 0);
    if (c.bias) v += c.bias[n];
    c.y[n] = v;
  }
}

template <int BITS>
QC_AVX2 void dequant_row_avx2(const Call& c, int64_t n, float* scale, float* zero, float* out) {
  const Attrs& s = *c.s;
  stats_avx2(c, n, scale, zero);
  const uint8_t* row = (const uint8_t*)c.w->codes + n * s.code_words() * 4;
  const int64_t gs8 = s.group_size / 8, blocks = c.Kc / 8;
  for (int64_t g = 0; g < s.groups(); ++g) {
    const __m256 sv = _mm256_set1_ps(scale[g]), off = _mm256_set1_ps(-scale[g] * zero[g]);
    const int64_t end = std::min(blocks, (g + 1) * gs8);
    for (int64_t j = g * gs8; j < end; ++j) _mm256_storeu_ps(out + 8 * j, _mm256_fmadd_ps(decode8<BITS>(row, j), sv, off));
  }
  for (int64_t p = s.K; p < c.Kc; ++p) out[p] = 0.f;  // padding meets x == 0; keep it finite
}

// M > 1: dequantize kRowTile rows, then run every row of X against them (2 rows of X at a time).
template <int BITS>
QC_AVX2 void rows_avx2_mm(const Call& c, int64_t r0, int64_t r1) {
  const Attrs& s = *c.s;
  thread_local std::vector<float> buf, scale, zero;
  buf.assign((size_t)(kRowTile * c.Kc), 0.f);
  scale.assign((size_t)c.Gp, 0.f);
  zero.assign((size_t)c.Gp, 0.f);
  const float* wr[kRowTile];
  for (int r = 0; r < kRowTile; ++r) wr[r] = buf.data() + r * c.Kc;
  for (int64_t n0 = r0; n0 < r1; n0 += kRowTile) {
    const int nr = (int)std::min<int64_t>(kRowTile, r1 - n0);
    for (int r = 0; r < nr; ++r) dequant_row_avx2<BITS>(c, n0 + r, scale.data(), zero.data(), buf.data() + r * c.Kc);
    int64_t m = 0;
    for (; m + 2 <= c.M; m += 2) {
      const float* xa = c.xk + m * c.Kc;
      const float* xb = xa + c.Kc;
      __m256 a[kRowTile], b[kRowTile];
      for (int r = 0; r < kRowTile; ++r) a[r] = b[r] = _mm256_setzero_ps();
      for (int64_t p = 0; p < c.Kc; p += 8) {
        const __m256 va = _mm256_loadu_ps(xa + p), vb = _mm256_loadu_ps(xb + p);
        for (int r = 0; r < kRowTile; ++r) {
          const __m256 wv = _mm256_loadu_ps(wr[r] + p);
          a[r] = _mm256_fmadd_ps(va, wv, a[r]);
          b[r] = _mm256_fmadd_ps(vb, wv, b[r]);
        }
      }
      for (int r = 0; r < nr; ++r) {
        const int64_t n = n0 + r;
        const float bias = c.bias ? c.bias[n] : 0.f;
        c.y[m * s.N + n] = hsum(a[r]) + outliers_avx2(c, n, m) + bias;
        c.y[(m + 1) * s.N + n] = hsum(b[r]) + outliers_avx2(c, n, m + 1) + bias;
      }
    }
    for (; m < c.M; ++m) {
      const float* xa = c.xk + m * c.Kc;
      __m256 a[kRowTile];
      for (int r = 0; r < kRowTile; ++r) a[r] = _mm256_setzero_ps();
      for (int64_t p = 0; p < c.Kc; p += 8) {
        const __m256 va = _mm256_loadu_ps(xa + p);
        for (int r = 0; r < kRowTile; ++r) a[r] = _mm256_fmadd_ps(va, _mm256_loadu_ps(wr[r] + p), a[r]);
      }
      for (int r = 0; r < nr; ++r) {
        const int64_t n = n0 + r;
        c.y[m * s.N + n] = hsum(a[r]) + outliers_avx2(c, n, m) + (c.bias ? c.bias[n] : 0.f);
      }
    }
  }
}

bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

bool force_scalar() {
  const char* v = std::getenv("QCOMPILE_SPQR_SCALAR");
  return v && *v && *v != '0';
}

// Rows per task: a multiple of kRowTile, about 256K weight-ops per task so the pool's per-task cost
// stays small while every thread still gets several tasks.
int64_t rows_per_task(const Attrs& a, int64_t M) {
  const int64_t ops = a.K * std::max<int64_t>(1, std::min<int64_t>(M, 8));
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, ops));
  return round_up(rows, kRowTile);
}

// Shared driver: xf is fp32 [M, K] in original order; y fp32 [M, N].
void run(const float* xf, int64_t M, const Attrs& s, const Weights& w, const float* bias, float* y,
         const Parallel& par) {
  const int64_t Kc = s.chunks() * kChunk, G = s.groups(), Gp = round_up(G, 8);
  std::vector<float> xk((size_t)(M * Kc), 0.f), xsum((size_t)(M * Gp), 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const float* src = xf + m * s.K;
    float* dst = xk.data() + m * Kc;
    if (w.perm) {
      for (int64_t p = 0; p < s.K; ++p) dst[p] = src[w.perm[p]];
    } else {
      std::memcpy(dst, src, sizeof(float) * (size_t)s.K);
    }
    for (int64_t p = 0; p < s.K; ++p) xsum[(size_t)(m * Gp + p / s.group_size)] += dst[p];
  }
  const Call c{&s, &w, M, xk.data(), Kc, xf, xsum.data(), Gp, bias, y};
  const int64_t rpt = rows_per_task(s, M);
  const size_t tasks = (size_t)((s.N + rpt - 1) / rpt);
  void (*rows)(const Call&, int64_t, int64_t) = rows_scalar;
#if QC_SPQR_X86
  if (have_avx2() && !force_scalar()) {
    if (M == 1)
      rows = s.bits == 4 ? rows_avx2_m1<4> : rows_avx2_m1<3>;
    else
      rows = s.bits == 4 ? rows_avx2_mm<4> : rows_avx2_mm<3>;
  }
#endif
  par.for_each(tasks, [&](size_t t) {
    const int64_t r0 = (int64_t)t * rpt;
    rows(c, r0, std::min(s.N, r0 + rpt));
  });
}

}  // namespace

Status matmul_cpu(const Problem& p, const Parallel& par) {
  const Attrs& a = p.attrs;
  if (p.M <= 0) return Status::OK();
  if (p.dtype == DType::kFloat32) {
    run((const float*)p.x, p.M, a, p.w, (const float*)p.bias, (float*)p.y, par);
    return Status::OK();
  }
  const uint16_t* x = (const uint16_t*)p.x;
  std::vector<float> xf((size_t)(p.M * a.K)), yf((size_t)(p.M * a.N)), bf;
  for (size_t i = 0; i < xf.size(); ++i) xf[i] = half_to_float(x[i]);
  if (p.bias) {
    bf.resize((size_t)a.N);
    for (int64_t n = 0; n < a.N; ++n) bf[(size_t)n] = half_to_float(((const uint16_t*)p.bias)[n]);
  }
  run(xf.data(), p.M, a, p.w, p.bias ? bf.data() : nullptr, yf.data(), par);
  uint16_t* y = (uint16_t*)p.y;
  for (size_t i = 0; i < yf.size(); ++i) y[i] = float_to_half(yf[i]);
  return Status::OK();
}

}  // namespace spqr
}  // namespace qcompile
