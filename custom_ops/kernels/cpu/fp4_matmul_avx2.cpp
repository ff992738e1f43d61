// AVX2 path of the FP4MatMul CPU kernel (see fp4_matmul.cpp for the work plan): the E2M1 decoder, the
// batch-1 GEMV and the outer-product prefill. Called only after cpu_has_avx2() (fp4_matmul.cpp dispatches).
//
// SIMD decode: E2M1 values are exactly representable in bfloat16, i.e. each one is a float whose low 16
// bits are zero. Two pshufb lookups per nibble vector give the top and second byte of that float, one
// byte-unpack forms the bf16 pairs, and a shift / mask turns a dword holding two bf16 into two floats.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fp4_matmul_internal.h"
#include "qcompile/cpu_features.h"
#include "simd.h"
#include "tile_gemm.h"

#if QC_X86

namespace qcompile {
namespace fp4 {
namespace detail {

// fwht for b >= 8, 8 lanes at a time: the butterflies of strides 1, 2, 4 inside each vector (lane swap,
// add / subtract, blend), strides >= 8 between vectors. Same operations in the same order as fwht, so the
// results are identical.
QC_AVX2 void fwht_avx2(float* x, int64_t K, int64_t b) {
  const __m256 norm = _mm256_set1_ps(1.0f / std::sqrt(static_cast<float>(b)));
  for (int64_t i = 0; i < K; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i), t;
    t = _mm256_permute_ps(v, 0xB1);  // stride 1: (a0, a1) -> (a0 + a1, a0 - a1)
    v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xAA);
    t = _mm256_permute_ps(v, 0x4E);  // stride 2
    v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xCC);
    t = _mm256_permute2f128_ps(v, v, 1);  // stride 4
    v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xF0);
    _mm256_storeu_ps(x + i, v);
  }
  for (int64_t base = 0; base < K; base += b) {
    float* v = x + base;
    for (int64_t h = 8; h < b; h *= 2)
      for (int64_t i = 0; i < b; i += 2 * h)
        for (int64_t j = i; j < i + h; j += 8) {
          const __m256 a = _mm256_loadu_ps(v + j), c = _mm256_loadu_ps(v + j + h);
          _mm256_storeu_ps(v + j, _mm256_add_ps(a, c));
          _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a, c));
        }
    for (int64_t j = 0; j < b; j += 8) _mm256_storeu_ps(v + j, _mm256_mul_ps(_mm256_loadu_ps(v + j), norm));
  }
}
// 64 activations in natural order -> the decoder's order (Tables::perm). Decoded vector v holds weights
// base_v + {0, 4, 8, 12, 32, 36, 40, 44}: a 4x4 transpose of the 4-float groups in each 128-bit half.
QC_AVX2 void permute_block_avx2(const float* src, float* dst) {
  for (int half = 0; half < 2; ++half) {
    __m256 y[4];
    for (int j = 0; j < 4; ++j) {
      const float* a = src + 16 * half + 4 * j;
      y[j] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(a)), _mm_loadu_ps(a + 32), 1);
    }
    const __m256 t0 = _mm256_unpacklo_ps(y[0], y[1]), t1 = _mm256_unpackhi_ps(y[0], y[1]);
    const __m256 t2 = _mm256_unpacklo_ps(y[2], y[3]), t3 = _mm256_unpackhi_ps(y[2], y[3]);
    float* d = dst + 32 * half;
    _mm256_storeu_ps(d + 0, _mm256_shuffle_ps(t0, t2, 0x44));   // elements 0 of each group
    _mm256_storeu_ps(d + 16, _mm256_shuffle_ps(t0, t2, 0xEE));  // elements 1
    _mm256_storeu_ps(d + 8, _mm256_shuffle_ps(t1, t3, 0x44));   // elements 2
    _mm256_storeu_ps(d + 24, _mm256_shuffle_ps(t1, t3, 0xEE));  // elements 3
  }
}
// rows[r][k] (8 rows, stride ld) -> dst[k * kXtLd + r] for k < len (a multiple of 8): 8x8 transposes.
QC_AVX2 void transpose8_store(const float* rows, int64_t ld, int64_t len, float* dst) {
  for (int64_t k = 0; k < len; k += 8) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows + i * ld + k);
    simd::transpose8(r);
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (k + i) * kXtLd, r[i]);
  }
}
QC_AVX2 Avx2Consts avx2_consts(int64_t G) {
  const Tables& t = tables();
  Avx2Consts c;
  c.top = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.bf16_top)));
  c.second = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.bf16_second)));
  c.low4 = _mm256_set1_epi8(0x0F);
  c.hi16 = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  int idx[2][8];
  scale_lanes(G, idx);
  c.sidx0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx[0]));
  c.sidx1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx[1]));
  return c;
}

namespace {

// 32 bytes of W -> 64 floats in 8 vectors (order: Tables::perm).
QC_AVX2 inline void decode_block_avx2(const uint8_t* src, const Avx2Consts& c, __m256 f[8]) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i lo = _mm256_and_si256(b, c.low4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), c.low4);
  const __m256i loT = _mm256_shuffle_epi8(c.top, lo), loS = _mm256_shuffle_epi8(c.second, lo);
  const __m256i hiT = _mm256_shuffle_epi8(c.top, hi), hiS = _mm256_shuffle_epi8(c.second, hi);
  const __m256i lo0 = _mm256_unpacklo_epi8(loS, loT), lo1 = _mm256_unpackhi_epi8(loS, loT);
  const __m256i hi0 = _mm256_unpacklo_epi8(hiS, hiT), hi1 = _mm256_unpackhi_epi8(hiS, hiT);
  f[0] = _mm256_castsi256_ps(_mm256_slli_epi32(lo0, 16));
  f[1] = _mm256_castsi256_ps(_mm256_and_si256(lo0, c.hi16));
  f[2] = _mm256_castsi256_ps(_mm256_slli_epi32(hi0, 16));
  f[3] = _mm256_castsi256_ps(_mm256_and_si256(hi0, c.hi16));
  f[4] = _mm256_castsi256_ps(_mm256_slli_epi32(lo1, 16));
  f[5] = _mm256_castsi256_ps(_mm256_and_si256(lo1, c.hi16));
  f[6] = _mm256_castsi256_ps(_mm256_slli_epi32(hi1, 16));
  f[7] = _mm256_castsi256_ps(_mm256_and_si256(hi1, c.hi16));
}

QC_AVX2 inline void block_scales(const float* sc, const Geometry& g, int64_t blk, const Avx2Consts& c, __m256& s0,
                                 __m256& s1) {
  const __m256 raw = _mm256_loadu_ps(sc + ((blk * kBlock) >> g.gshift));
  s0 = _mm256_permutevar8x32_ps(raw, c.sidx0);
  s1 = _mm256_permutevar8x32_ps(raw, c.sidx1);
}

}  // namespace

// Scale codes -> floats (times ts) 8 at a time with bit arithmetic instead of the table; returns how many
// were done (the caller finishes the tail with the table). Exact: same values as Tables::e8m0 / e4m3.
QC_AVX2 int64_t decode_scales_avx2(const uint8_t* s, int64_t n, ScaleFormat fmt, float ts, float* out) {
  const __m256 vts = _mm256_set1_ps(ts);
  int64_t i = 0;
  if (fmt == ScaleFormat::kE8M0) {
    // 2^(s-127) is the float with exponent field s; s = 0 is the subnormal 2^-127, s = 255 NaN.
    const __m256i zero = _mm256_setzero_si256(), ff = _mm256_set1_epi32(255);
    const __m256i sub = _mm256_set1_epi32(0x00400000), nan = _mm256_set1_epi32(0x7FC00000);
    for (; i + 8 <= n; i += 8) {
      const __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + i)));
      __m256i bits = _mm256_slli_epi32(u, 23);
      bits = _mm256_blendv_epi8(bits, sub, _mm256_cmpeq_epi32(u, zero));
      bits = _mm256_blendv_epi8(bits, nan, _mm256_cmpeq_epi32(u, ff));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_castsi256_ps(bits), vts));
    }
  } else {
    // E4M3 |code| = eeee mmm: normal (e > 0) -> float exponent e + 120, mantissa m << 20;
    // subnormal (e = 0) -> m * 2^-9 (computed in floats: no subnormal intermediates); 0x7F -> NaN.
    const __m256i m7f = _mm256_set1_epi32(0x7F);
    const __m256i bias = _mm256_set1_epi32(120 << 23), nan = _mm256_set1_epi32(0x7FC00000);
    const __m256 sub_unit = _mm256_set1_ps(1.0f / 512.0f);
    for (; i + 8 <= n; i += 8) {
      const __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + i)));
      const __m256i mag = _mm256_and_si256(u, m7f);
      const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(mag, 20), bias);
      const __m256i subn = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(mag), sub_unit));
      __m256i bits = _mm256_blendv_epi8(normal, subn, _mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag));
      bits = _mm256_blendv_epi8(bits, nan, _mm256_cmpeq_epi32(mag, m7f));
      bits = _mm256_or_si256(bits, _mm256_slli_epi32(_mm256_srli_epi32(u, 7), 31));  // sign
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_castsi256_ps(bits), vts));
    }
  }
  return i;
}

namespace {

// Dot product of one W row with x over whole blocks [b0, b1); block blk's bytes are at src + 32 * (blk - b0).
// kOneScale: G >= 32, so both halves of a block share one scale vector (lane 0: group g, lane 1: g or g+1)
// and the block needs a single permute and a single scaled accumulate.
// (Measured: interleaving 2 or 4 rows per pass to share the x loads was slower with cold caches: one
// sequential W stream prefetches better than several.)
template <bool kOneScale>
QC_AVX2 __attribute__((always_inline)) inline void gemv_blocks_avx2(const uint8_t* src, const float* sc,
                                                                    const float* x, int gshift, int64_t b0,
                                                                    int64_t b1, const Avx2Consts& c, __m256& acc0,
                                                                    __m256& acc1) {
  const Avx2Consts k = c;  // local copy: lets the compiler keep the constants in registers
  for (int64_t blk = b0; blk < b1; ++blk) {
    const float* xv = x + blk * kBlock;
    // 1 KB ahead in the W stream (measured 2-4% faster than leaving it to the hardware prefetcher; a
    // prefetch past the end of W is harmless: it never faults and nothing is read from it)
    _mm_prefetch(reinterpret_cast<const char*>(src + (blk - b0) * (kBlock / 2) + 1024), _MM_HINT_T0);
    __m256 f[8];
    decode_block_avx2(src + (blk - b0) * (kBlock / 2), k, f);
    __m256 t0 = _mm256_mul_ps(f[0], _mm256_loadu_ps(xv));
    __m256 t1 = _mm256_mul_ps(f[4], _mm256_loadu_ps(xv + 32));
    t0 = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xv + 8), t0);
    t1 = _mm256_fmadd_ps(f[5], _mm256_loadu_ps(xv + 40), t1);
    t0 = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xv + 16), t0);
    t1 = _mm256_fmadd_ps(f[6], _mm256_loadu_ps(xv + 48), t1);
    t0 = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xv + 24), t0);
    t1 = _mm256_fmadd_ps(f[7], _mm256_loadu_ps(xv + 56), t1);
    const __m256 raw = _mm256_loadu_ps(sc + ((blk * kBlock) >> gshift));
    if (kOneScale) {
      acc0 = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_permutevar8x32_ps(raw, k.sidx0), acc0);
    } else {
      acc0 = _mm256_fmadd_ps(t0, _mm256_permutevar8x32_ps(raw, k.sidx0), acc0);
      acc1 = _mm256_fmadd_ps(t1, _mm256_permutevar8x32_ps(raw, k.sidx1), acc1);
    }
  }
}

// dot(W row, x). Whole blocks are read in place; only the ragged last block (Kp not a multiple of 64) goes
// through a zero-padded copy, so the hot loop has no bounds check.
template <bool kOneScale>
QC_AVX2 float gemv_row_avx2(const uint8_t* row, const float* sc, const float* x, const Geometry& g,
                            const Avx2Consts& c) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const int64_t full = g.row_bytes / (kBlock / 2);
  gemv_blocks_avx2<kOneScale>(row, sc, x, g.gshift, 0, full, c, acc0, acc1);
  if (full < g.nblk) {  // at most one ragged block
    alignas(32) uint8_t pad[kBlock / 2];
    const uint8_t* tail = block_bytes(row, g, full, pad);
    gemv_blocks_avx2<kOneScale>(tail, sc, x, g.gshift, full, full + 1, c, acc0, acc1);
  }
  return simd::hsum(_mm256_add_ps(acc0, acc1));
}

}  // namespace

// Decodes blocks [b0, b1) of one row, scales applied, into out (permuted order, 64 floats per block).
QC_AVX2 void decode_row_avx2(const uint8_t* row, const float* sc, const Geometry& g, int64_t b0, int64_t b1,
                             const Avx2Consts& c, float* out) {
  alignas(32) uint8_t pad[kBlock / 2];
  __m256 f[8];
  for (int64_t blk = b0; blk < b1; ++blk, out += kBlock) {
    decode_block_avx2(block_bytes(row, g, blk, pad), c, f);
    __m256 s0, s1;
    block_scales(sc, g, blk, c, s0, s1);
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + 8 * v, _mm256_mul_ps(f[v], s0));
    for (int v = 4; v < 8; ++v) _mm256_storeu_ps(out + 8 * v, _mm256_mul_ps(f[v], s1));
  }
}

// out[n - n0] = dot(W row n, x) for rows [n0, n1) (scales: room for one row's decode_scales).
QC_AVX2 void gemv_rows_avx2(const Problem& p, const Geometry& g, int64_t n0, int64_t n1, const float* x,
                            float* scales, float* out) {
  const Avx2Consts c = avx2_consts(g.G);
  for (int64_t n = n0; n < n1; ++n) {
    decode_scales(p, g, n, scales, true);
    const uint8_t* row = p.w + n * g.row_bytes;
    out[n - n0] = g.G >= 32 ? gemv_row_avx2<true>(row, scales, x, g, c) : gemv_row_avx2<false>(row, scales, x, g, c);
  }
}

namespace {

// Prefetches the bytes of W rows [r0, r1) that hold weights [k0, k0 + len): the decoder reads 12 rows
// 2 KB apart 128 bytes at a time, a pattern the hardware prefetcher does not follow far enough ahead.
void prefetch_rows(const Problem& p, const Geometry& g, int64_t r0, int64_t r1, int64_t k0, int64_t len) {
  const int64_t b0 = k0 / 2, b1 = std::min(g.row_bytes, (k0 + len) / 2);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = b0; b < b1; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p.w + r * g.row_bytes + b), _MM_HINT_T0);
}

// C^T[12][m0..m1) (+)= a 12-row decoded tile times the 16-row blocks [m0, m1) of the transposed activations:
// 6x16 (or 6x8 for a last block of 8) outer products, one broadcast per decoded weight. `wide`:
// tile::prefill_avx512(), whole 16-row blocks in one 12 x 16 (or 6 x 16) AVX-512 call.
QC_AVX2 void outer_tile(const float* tile, int64_t ld, int64_t nc, const float* xt, int64_t Kx, int64_t m0,
                        int64_t m1, int64_t k0, int64_t len, float* acc, int64_t ldc, bool wide) {
  for (int64_t m = m0; m < m1; m += kXtLd) {
    const float* xs = xt + m * Kx + k0 * kXtLd;
    if (wide && m1 - m >= 16) {
      static_assert(kOuterRows == 12 && kXtLd == 16, "the AVX-512 kernel covers 6 or 12 rows, 16 columns");
      const bool two = m1 - m >= 32;  // two blocks per call
      const float* xs1 = two ? xs + kXtLd * Kx : xs;
      float* cs = acc + m;
      if (nc > 6) tile::outer_x16<12, kOuterLd>(tile, xs, xs1, two, k0 > 0, kXtLd, len, cs, ldc);
      else tile::outer_x16<6, kOuterLd>(tile, xs, xs1, two, k0 > 0, kXtLd, len, cs, ldc);
      if (two) m += kXtLd;
      continue;
    }
    for (int64_t r = 0; r < nc; r += 6) {
      const float* ws = tile + r * ld;
      const float* rows[6] = {ws, ws + ld, ws + 2 * ld, ws + 3 * ld, ws + 4 * ld, ws + 5 * ld};
      float* cs = acc + r * ldc + m;
      if (m1 - m >= 16) {
        if (k0 == 0) tile::outer_product<6, 2, false>(rows, xs, kXtLd, len, cs, ldc);
        else tile::outer_product<6, 2, true>(rows, xs, kXtLd, len, cs, ldc);
      } else {
        if (k0 == 0) tile::outer_product<6, 1, false>(rows, xs, kXtLd, len, cs, ldc);
        else tile::outer_product<6, 1, true>(rows, xs, kXtLd, len, cs, ldc);
      }
    }
  }
}

}  // namespace

// M >= kOuterMinM with AVX2: tiles of 12 W rows. Per K slice the rows are decoded (scales applied) into a
// row-major tile and multiplied with the 16-row blocks of the transposed activations xt ([Mpad/16][Kx][16])
// of the pass (tile::x_rows_per_pass), accumulating C^T [12][Mpad]; the next slice's W bytes are prefetched
// meanwhile.
Status run_outer(const Problem& p, const Geometry& g, const float* xt, int64_t Mpad, const Parallel& par) {
  const int64_t ldc = Mpad + 16;  // accumulator row stride: off powers of two, rows 64-byte multiples (AMX)
  // K slices of at most kOuterKC, as even as whole blocks allow (576 -> 3 x 192, not 256 + 256 + 64: a short
  // slice pays the microkernel's fixed cost for little work)
  const int64_t nslices = (g.Kx + kOuterKC - 1) / kOuterKC;
  const int64_t kc = (g.Kx / kBlock + nslices - 1) / nslices * kBlock;
  const Avx2Consts consts = avx2_consts(g.G);
  const bool wide = tile::prefill_avx512();
  const tile::amx::XPack* xpack = tile::amx::prepare_pack(p.attrs.accuracy_level, p.M, xt, g.Kx, Mpad);
  const int64_t rows = xpack ? tile::amx::kTileRows : kOuterRows;  // W rows per tile
  const int64_t cap = (rows + kOuterRows - 1) / kOuterRows * kOuterRows;  // rows the FMA kernels may touch
  struct Tile {
    const Problem& p;
    const Geometry& g;
    const float* xt;
    int64_t m0, m1, ldc, kc, n0, nc, cap;
    TaskScratch& s;
    const Avx2Consts& c;
    bool wide;
    const tile::amx::XPack* xpack;  // null: the FMA kernels
    void decode(int64_t k0, int64_t len) {
      decode_tile(p, g, true, c, n0, nc, cap, s.scales.data(), k0, len, s.tile.data(), kOuterLd);
      if (k0 + kc < g.Kx) prefetch_rows(p, g, n0, n0 + nc, k0 + kc, kc);
    }
    void multiply(int64_t k0, int64_t len) {
      // the first K slice stores, later ones accumulate: no zeroing
      if (xpack && tile::amx::multiply(s.tile.data(), kOuterLd, nc, *xpack, m0, m1, k0, len, s.out.data(), ldc, k0 > 0))
        return;
      for (int64_t r = 0; r < nc; r += kOuterRows)  // the FMA kernels take 12 rows at a time
        outer_tile(s.tile.data() + r * kOuterLd, kOuterLd, std::min(kOuterRows, nc - r), xt, g.Kx, m0, m1, k0, len,
                   s.out.data() + r * ldc, ldc, wide);
    }
    void finish() { store_transposed(p, n0, nc, s.out.data(), ldc, m0, m1); }
  };
  const int64_t task_rows = tile::prefill_task_rows(g.N, rows);
  const tile::Plan plan{g.N, task_rows, rows, g.Kx, kc, Mpad, tile::x_rows_per_pass(Mpad, kc + task_rows)};
  const Status st = tile::tile_gemm(par, kOp, plan, [&](int64_t n0, int64_t nc, int64_t m0, int64_t m1, int slot) {
    TaskScratch& s = tile_scratch(p, g, true, n0, nc, cap, kOuterLd, cap * ldc, slot);
    prefetch_rows(p, g, n0, n0 + nc, 0, kc);
    return Tile{p, g, xt, m0, m1, ldc, kc, n0, nc, cap, s, consts, wide, xpack};
  });
  tile::amx::release_pack();
  return st;
}

}  // namespace detail
}  // namespace fp4
}  // namespace qcompile

#endif  // QC_X86
