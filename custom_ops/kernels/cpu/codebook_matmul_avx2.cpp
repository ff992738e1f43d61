// AVX2 kernels of the CodebookMatMul CPU kernel (see codebook_matmul.cpp for the paths): the table build,
// the d == 8 tile decoder of the prefill GEMM and the fused decode-dot GEMV. Called only after
// cpu_has_avx2().
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>

#include "codebook_matmul_internal.h"
#include "qcompile/cpu_features.h"
#include "qcompile/half.h"
#include "simd.h"
#include "tile_gemm.h"

// GCC 12 reports its own AVX-512 intrinsics' deliberately undefined pass-through operands (_mm512_undefined_*)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if QC_X86

namespace qcompile {
namespace codebook {
namespace detail {

namespace {
// out[s] = sum_j xg[j] * C[m][s][j] for s < LS (one table); returns max |out[s]| (NaN entries dropped).
QC_AVX2 inline float build_table(const float* xg, const float* cm, const Geometry& g, float* out) {
  constexpr int64_t kChunk = 64;  // 8 accumulators of 8 codewords
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + kChunk <= g.LS; s += kChunk) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < g.d; ++j) {
      const __m256 xv = _mm256_broadcast_ss(xg + j);
      const float* c = cm + j * g.LS + s;
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(c + 8 * i), acc[i]);
    }
    for (int i = 0; i < 8; ++i) {
      _mm256_storeu_ps(out + s + 8 * i, acc[i]);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, acc[i]));
    }
  }
  for (; s < g.LS; s += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < g.d; ++j)
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(xg + j), _mm256_loadu_ps(cm + j * g.LS + s), acc);
    _mm256_storeu_ps(out + s, acc);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, acc));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

// build_table with 16-float registers, where the CPU has AVX-512F: the fixed-point walks' table build (M = 1)
// is a tenth of their call at K = 4096 and half of it in AVX2 FMAs. Same products, same order per entry.
QC_AVX512F inline float build_table_avx512(const float* xg, const float* cm, const Geometry& g, float* out) {
  constexpr int64_t kChunk = 128;  // 8 accumulators of 16 entries
  __m512 mx = _mm512_setzero_ps();
  int64_t s = 0;
  for (; s + kChunk <= g.LS; s += kChunk) {
    __m512 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < g.d; ++j) {
      const __m512 xv = _mm512_set1_ps(xg[j]);
      const float* c = cm + j * g.LS + s;
      for (int i = 0; i < 8; ++i) acc[i] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(c + 16 * i), acc[i]);
    }
    for (int i = 0; i < 8; ++i) {
      _mm512_storeu_ps(out + s + 16 * i, acc[i]);
      mx = _mm512_max_ps(mx, _mm512_abs_ps(acc[i]));
    }
  }
  for (; s < g.LS; s += 16) {  // the last entries, masked past LS
    const __mmask16 live = g.LS - s >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (g.LS - s)) - 1);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < g.d; ++j)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(xg[j]), _mm512_maskz_loadu_ps(live, cm + j * g.LS + s), acc);
    _mm512_mask_storeu_ps(out + s, live, acc);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(acc));
  }
  return _mm512_reduce_max_ps(mx);
}
}  // namespace

QC_AVX2 void lut_build_avx2(const float* x, const float* cbt, const Geometry& g, int64_t g0, int64_t g1, float* lut) {
  for (int64_t gi = g0; gi < g1; ++gi)
    for (int64_t m = 0; m < g.M; ++m) build_table(x + gi * g.d, cbt + m * g.d * g.LS, g, lut + (gi * g.M + m) * g.LS);
}

QC_AVX2 void lut_build_tables_avx2(const float* x, const float* cbt, const Geometry& g, int64_t t0, int64_t t1,
                                   float* out, float* tmax) {
  static const bool avx512 = cpu_has_avx512bw();
  for (int64_t t = t0; t < t1; ++t) {
    const float* xg = x + (t / g.M) * g.d;
    const float* cm = cbt + (t % g.M) * g.d * g.LS;
    float* dst = out + (t - t0) * g.LS;
    const float m = avx512 ? build_table_avx512(xg, cm, g, dst) : build_table(xg, cm, g, dst);
    if (tmax) tmax[t - t0] = m;
  }
}
// d == 8: one codeword is one vector, so a group decodes to M loads, M-1 adds and one store.
template <typename C, bool kCheck>
QC_AVX2 void decode_tile_avx2_d8(const C* codes, const float* cb, const Geometry& g, int64_t n0, int64_t nb,
                                 int64_t Kp, float* wt, uint32_t* maxc) {
  const uint32_t last = static_cast<uint32_t>(g.S - 1);
  uint32_t mx = 0;
  for (int64_t i = 0; i < kNR; ++i) {
    float* dst = wt + i * Kp;
    if (i >= nb) {
      std::fill(dst, dst + Kp, 0.0f);
      continue;
    }
    const C* row = codes + (n0 + i) * g.T;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const C* cg = row + gi * g.M;
      __m256 w = _mm256_setzero_ps();
      for (int64_t m = 0; m < g.M; ++m) {
        uint32_t c = cg[m];
        if (kCheck) {
          mx = std::max(mx, c);
          c = std::min(c, last);
        }
        w = _mm256_add_ps(w, _mm256_loadu_ps(cb + ((m * g.S + c) << 3)));
      }
      _mm256_storeu_ps(dst + (gi << 3), w);
    }
  }
  if (kCheck) *maxc = std::max(*maxc, mx);
}
namespace {

using simd::hsum;
using simd::reduce4;

template <typename C, bool kCheck>
QC_AVX2 inline __m256 decode_group_d8(const C* cg, const float* cb, int64_t M, int64_t S, uint32_t last,
                                       uint32_t& mx) {
  uint32_t c = cg[0];
  if (kCheck) {
    mx = std::max(mx, c);
    c = std::min(c, last);
  }
  __m256 w = _mm256_loadu_ps(cb + (static_cast<int64_t>(c) << 3));
  for (int64_t m = 1; m < M; ++m) {
    c = cg[m];
    if (kCheck) {
      mx = std::max(mx, c);
      c = std::min(c, last);
    }
    w = _mm256_add_ps(w, _mm256_loadu_ps(cb + ((m * S + c) << 3)));
  }
  return w;
}

template <typename C, bool kCheck, int kM>
QC_AVX2 inline __m256 decode_group_fixed(const C* cg, const float* cb, int64_t S, uint32_t last, uint32_t& mx) {
  if constexpr (kM == 2 && sizeof(C) == 1 && !kCheck) {  // both codes in one 16-bit load
    uint16_t pair;
    std::memcpy(&pair, cg, 2);
    return _mm256_add_ps(_mm256_loadu_ps(cb + (static_cast<uint32_t>(pair & 0xFF) << 3)),
                         _mm256_loadu_ps(cb + ((S + (pair >> 8)) << 3)));
  }
  __m256 w;
  for (int m = 0; m < kM; ++m) {
    uint32_t c = cg[m];
    if (kCheck) {
      mx = std::max(mx, c);
      c = std::min(c, last);
    }
    const __m256 v = _mm256_loadu_ps(cb + ((m * S + c) << 3));
    w = m == 0 ? v : _mm256_add_ps(w, v);
  }
  return w;
}

// R == 1 with M known at compile time: four output channels at once share each x load and give four
// independent FMA chains.
template <typename C, bool kCheck, int kM>
QC_AVX2 void fused_gemv_avx2_d8(const C* codes, const float* cb, const Geometry& g, const float* x, int64_t n0,
                                int64_t n1, float* out, uint32_t* maxc) {
  const uint32_t last = static_cast<uint32_t>(g.S - 1);
  uint32_t mx = 0;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const C* r0 = codes + n * g.T;
    const C* r1 = r0 + g.T;
    const C* r2 = r1 + g.T;
    const C* r3 = r2 + g.T;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t gi = 0;
    for (; gi + 2 <= g.G; gi += 2) {
      const __m256 xv = _mm256_loadu_ps(x + (gi << 3)), xw = _mm256_loadu_ps(x + (gi << 3) + 8);
      const int64_t o = gi * kM, q = o + kM;
      a0 = _mm256_fmadd_ps(decode_group_fixed<C, kCheck, kM>(r0 + o, cb, g.S, last, mx), xv, a0);
      a1 = _mm256_fmadd_ps(decode_group_fixed<C, kCheck, kM>(r1 + o, cb, g.S, last, mx), xv, a1);
      a2 = _mm256_fmadd_ps(decode_group_fixed<C, kCheck, kM>(r2 + o, cb, g.S, last, mx), xv, a2);
      a3 = _mm256_fmadd_ps(decode_group_fixed<C, kCheck, kM>(r3 + o, cb, g.S, last, mx), xv, a3);
      b0 = _mm256_fmadd_ps(decode_group_fixed<C, kCheck, kM>(r0 + q, cb, g.S, last, mx), xw, b0);
      b1 = _mm256_fmadd_ps(decode_group_fixed<C, kCheck, kM>(r1 + q, cb, g.S, last, mx), xw, b1);
      b2 = _mm256_fmadd_ps(decode_group_fixed<C, kCheck, kM>(r2 + q, cb, g.S, last, mx), xw, b2);
      b3 = _mm256_fmadd_ps(decode_group_fixed<C, kCheck, kM>(r3 + q, cb, g.S, last, mx), xw, b3);
    }
    for (; gi < g.G; ++gi) {
      const __m256 xv = _mm256_loadu_ps(x + (gi << 3));
      const int64_t o = gi * kM;
      a0 = _mm256_fmadd_ps(decode_group_fixed<C, kCheck, kM>(r0 + o, cb, g.S, last, mx), xv, a0);
      a1 = _mm256_fmadd_ps(decode_group_fixed<C, kCheck, kM>(r1 + o, cb, g.S, last, mx), xv, a1);
      a2 = _mm256_fmadd_ps(decode_group_fixed<C, kCheck, kM>(r2 + o, cb, g.S, last, mx), xv, a2);
      a3 = _mm256_fmadd_ps(decode_group_fixed<C, kCheck, kM>(r3 + o, cb, g.S, last, mx), xv, a3);
    }
    _mm_storeu_ps(out + (n - n0), reduce4(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2),
                                          _mm256_add_ps(a3, b3)));
  }
  for (; n < n1; ++n) {
    const C* r0 = codes + n * g.T;
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < g.G; ++gi)
      a0 = _mm256_fmadd_ps(decode_group_fixed<C, kCheck, kM>(r0 + gi * kM, cb, g.S, last, mx),
                           _mm256_loadu_ps(x + (gi << 3)), a0);
    out[n - n0] = hsum(a0);
  }
  if (kCheck) *maxc = std::max(*maxc, mx);
}

}  // namespace

template <typename C, bool kCheck, int R>
QC_AVX2 void fused_rows_avx2_d8(const C* codes, const float* cb, const Geometry& g, const float* x, int64_t ldx,
                                int64_t n0, int64_t n1, float* out, uint32_t* maxc) {
  if (R == 1 && g.M == 1) return fused_gemv_avx2_d8<C, kCheck, 1>(codes, cb, g, x, n0, n1, out, maxc);
  if (R == 1 && g.M == 2) return fused_gemv_avx2_d8<C, kCheck, 2>(codes, cb, g, x, n0, n1, out, maxc);
  const uint32_t last = static_cast<uint32_t>(g.S - 1);
  uint32_t mx = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const C* row = codes + n * g.T;
    __m256 a0[R], a1[R];  // two chains per row hide the FMA latency
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    int64_t gi = 0;
    for (; gi + 2 <= g.G; gi += 2) {
      const __m256 w0 = decode_group_d8<C, kCheck>(row + gi * g.M, cb, g.M, g.S, last, mx);
      const __m256 w1 = decode_group_d8<C, kCheck>(row + (gi + 1) * g.M, cb, g.M, g.S, last, mx);
      for (int r = 0; r < R; ++r) {
        a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * ldx + (gi << 3)), a0[r]);
        a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * ldx + ((gi + 1) << 3)), a1[r]);
      }
    }
    if (gi < g.G) {
      const __m256 w0 = decode_group_d8<C, kCheck>(row + gi * g.M, cb, g.M, g.S, last, mx);
      for (int r = 0; r < R; ++r) a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * ldx + (gi << 3)), a0[r]);
    }
    for (int r = 0; r < R; ++r) out[r * (n1 - n0) + (n - n0)] = hsum(_mm256_add_ps(a0[r], a1[r]));
  }
  if (kCheck) *maxc = std::max(*maxc, mx);
}

// ---- prefill: outer products over a decoded tile ------------------------------------------------------------
//
// Why: the dot-product microkernel reloaded all of X (2 MB at 128 x 4096) for every 16 W rows and spent 7
// loads per 12 FMAs. Here a task decodes 12 rows of W one K slice (256) at a time into an L1 tile and runs
// the 6 x 16 outer-product kernel of tile_gemm.h over X packed transposed (once per call): one broadcast of
// a decoded weight feeds two FMAs, as in FP4MatMul's prefill.

namespace {
constexpr int64_t kOuterLd = kOuterKC + 8;  // decoded tile row stride, off powers of two

// C^T[12][m0..m1) (+)= the tile's 12 rows times the 16-row blocks [m0, m1) of xt over K positions
// [k0, k0 + len). `wide`: tile::prefill_avx512(), one 12 x 16 AVX-512 call per block instead of two 6 x 16
// AVX2 ones.
QC_AVX2 void outer_tile(const float* tile, int64_t ld, const float* xt, int64_t Kp, int64_t m0, int64_t m1,
                        int64_t k0, int64_t len, float* acc, int64_t ldc, bool wide) {
  for (int64_t m = m0; m < m1; m += kXtLd) {
    const float* xs = xt + m * Kp + k0 * kXtLd;
    if (wide) {  // 32 rows of X per call where there are, reused from L1 by every 12 rows of the tile
      static_assert(kOuterRows % 12 == 0 && kXtLd == 16, "the AVX-512 kernel takes 12 rows, 16 or 32 columns");
      const bool two = m1 - m >= 32;
      const float* xs1 = two ? xs + kXtLd * Kp : xs;
      for (int64_t r = 0; r < kOuterRows; r += 12) {
        const float* ws = tile + r * ld;
        float* cs = acc + r * ldc + m;
        tile::outer_x16<12, kOuterLd>(ws, xs, xs1, two, k0 > 0, kXtLd, len, cs, ldc);
      }
      if (two) m += kXtLd;
      continue;
    }
    for (int64_t r = 0; r < kOuterRows; r += 6) {
      const float* ws = tile + r * ld;
      const float* rows[6] = {ws, ws + ld, ws + 2 * ld, ws + 3 * ld, ws + 4 * ld, ws + 5 * ld};
      float* cs = acc + r * ldc + m;
      if (k0 == 0) tile::outer_product<6, 2, false>(rows, xs, kXtLd, len, cs, ldc);
      else tile::outer_product<6, 2, true>(rows, xs, kXtLd, len, cs, ldc);
    }
  }
}
}  // namespace

template <typename C, bool kCheck>
Status run_outer_avx2_d8(const C* codes, const float* cb, const Geometry& g, const float* xt, int64_t rows,
                         int64_t Kp, const float* scales, const float* bias, DType dtype, void* y, const Parallel& par,
                         uint32_t* maxc, int64_t accuracy_level) {
  // accumulator row stride: off powers of two, rows 64-byte multiples (AMX)
  const int64_t Mpad = (rows + kXtLd - 1) / kXtLd * kXtLd, ldc = Mpad + 16;
  const uint32_t last = static_cast<uint32_t>(g.S - 1);
  const bool wide = tile::prefill_avx512();
  const tile::amx::XPack* xpack = tile::amx::prepare_pack(accuracy_level, rows, xt, Kp, Mpad);
  const int64_t tile_rows = xpack ? tile::amx::kTileRows : kOuterRows;   // W rows per tile
  const int64_t cap = (tile_rows + kOuterRows - 1) / kOuterRows * kOuterRows;  // rows the FMA kernels touch
  struct Tile {
    const C* codes;
    const float* cb;
    const Geometry& g;
    const float* xt;
    int64_t rows, Kp, m0, m1, ldc, n0, nc, cap;
    const float* scales;
    const float* bias;
    DType dtype;
    void* y;
    uint32_t last;
    uint32_t* maxc;
    float* tile;
    float* acc;
    bool wide;
    const tile::amx::XPack* xpack;  // null: the FMA kernels
    QC_AVX2 void decode(int64_t k0, int64_t len) {
      uint32_t mx = 0;
      const int64_t k1 = std::min(k0 + len, g.K);  // Kp past K: zero, so padded X columns meet 0 (never NaN)
      for (int64_t r = 0; r < cap; ++r) {
        float* dst = tile + r * kOuterLd;
        if (r >= nc) {
          std::fill(dst, dst + len, 0.0f);
          continue;
        }
        const C* row = codes + (n0 + r) * g.T;
        // the next slice's codes of this row: 12 rows a row stride apart, which the hardware prefetcher does
        // not follow far enough ahead (as in FP4MatMul's prefill)
        const char* next = reinterpret_cast<const char*>(row + ((k0 + len) >> 3) * g.M);
        const int64_t next_bytes = std::min<int64_t>(len, g.K - k0 - len) / 8 * g.M * static_cast<int64_t>(sizeof(C));
        for (int64_t b = 0; b < next_bytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
        int64_t k = k0;
        if (g.M == 2) {
          for (; k < k1; k += 8)
            _mm256_storeu_ps(dst + (k - k0), decode_group_fixed<C, kCheck, 2>(row + (k >> 3) * 2, cb, g.S, last, mx));
        } else {
          for (; k < k1; k += 8)
            _mm256_storeu_ps(dst + (k - k0), decode_group_d8<C, kCheck>(row + (k >> 3) * g.M, cb, g.M, g.S, last, mx));
        }
        for (; k < k0 + len; k += 8) _mm256_storeu_ps(dst + (k - k0), _mm256_setzero_ps());
      }
      if (kCheck) *maxc = std::max(*maxc, mx);
    }
    QC_AVX2 void multiply(int64_t k0, int64_t len) {
      if (xpack && tile::amx::multiply(tile, kOuterLd, nc, *xpack, m0, m1, k0, len, acc, ldc, k0 > 0)) return;
      for (int64_t r = 0; r < nc; r += kOuterRows)  // the FMA kernels take 12 rows at a time
        outer_tile(tile + r * kOuterLd, kOuterLd, xt, Kp, m0, m1, k0, len, acc + r * ldc, ldc, wide);
    }
    void finish() {
      for (int64_t m = m0; m < std::min(m1, rows); ++m)
        for (int64_t r = 0; r < nc; ++r) {
          const int64_t n = n0 + r;
          float v = acc[r * ldc + m] * scales[n];
          if (bias) v += bias[n];
          if (dtype == DType::kFloat16) static_cast<uint16_t*>(y)[m * g.N + n] = float_to_half(v);
          else static_cast<float*>(y)[m * g.N + n] = v;
        }
    }
  };
  const int64_t task_rows = tile::prefill_task_rows(g.N, tile_rows);
  const tile::Plan plan{g.N, task_rows, tile_rows, Kp, kOuterKC, Mpad,
                        tile::x_rows_per_pass(Mpad, kOuterKC + task_rows)};
  const Status st = tile::tile_gemm(par, kOp, plan, [&](int64_t n0, int64_t nc, int64_t m0, int64_t m1, int slot) {
    thread_local std::array<std::vector<float>, tile::kMaxTilesPerTask> tile_buf;
    thread_local std::array<tile::CacheLineVector<float>, tile::kMaxTilesPerTask> acc_buf;
    float* tile = scratch(tile_buf[static_cast<size_t>(slot)], static_cast<size_t>(cap * kOuterLd));
    float* acc = scratch(acc_buf[static_cast<size_t>(slot)], static_cast<size_t>(cap * ldc));
    return Tile{codes, cb, g, xt, rows, Kp, m0, m1, ldc, n0, nc, cap, scales, bias, dtype, y, last,
                maxc + n0 / kOuterRows, tile, acc, wide, xpack};
  });
  tile::amx::release_pack();
  return st;
}

#define QC_INSTANTIATE(C, kCheck)                                                                             \
  template QC_AVX2 void decode_tile_avx2_d8<C, kCheck>(const C*, const float*, const Geometry&, int64_t, int64_t, \
                                                       int64_t, float*, uint32_t*);                           \
  template QC_AVX2 void fused_rows_avx2_d8<C, kCheck, 1>(const C*, const float*, const Geometry&, const float*, \
                                                         int64_t, int64_t, int64_t, float*, uint32_t*);       \
  template QC_AVX2 void fused_rows_avx2_d8<C, kCheck, 2>(const C*, const float*, const Geometry&, const float*, \
                                                         int64_t, int64_t, int64_t, float*, uint32_t*);       \
  template QC_AVX2 void fused_rows_avx2_d8<C, kCheck, 3>(const C*, const float*, const Geometry&, const float*, \
                                                         int64_t, int64_t, int64_t, float*, uint32_t*);       \
  template QC_AVX2 void fused_rows_avx2_d8<C, kCheck, 4>(const C*, const float*, const Geometry&, const float*, \
                                                         int64_t, int64_t, int64_t, float*, uint32_t*);       \
  template Status run_outer_avx2_d8<C, kCheck>(const C*, const float*, const Geometry&, const float*, int64_t,    \
                                               int64_t, const float*, const float*, DType, void*, const Parallel&, \
                                               uint32_t*, int64_t);
QC_INSTANTIATE(uint8_t, false)
QC_INSTANTIATE(uint8_t, true)
QC_INSTANTIATE(uint16_t, false)
QC_INSTANTIATE(uint16_t, true)
#undef QC_INSTANTIATE

}  // namespace detail
}  // namespace codebook
}  // namespace qcompile

#endif  // QC_X86
