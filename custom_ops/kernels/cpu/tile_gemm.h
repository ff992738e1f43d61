// The prefill (M > 1) machinery the CPU kernels share: running tasks on a Parallel without letting an
// exception escape, the decoded-tile GEMM driver, and its FMA microkernels.
//
// Every op's prefill path has the same shape: a task owns a few output rows of W; for each K slice it
// decodes those rows' weights once into a small cache-resident tile, then multiplies every row of X with
// the tile. Only the decoding (and the tile layout it picks) is op-specific; tile_gemm() is the loop and
// dot_rx4* / outer_product the multiplications.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "amx_tile.h"
#include "qcompile/cpu_features.h"
#include "qcompile/parallel.h"
#include "qcompile/status.h"
#include "simd.h"

namespace qcompile {
namespace tile {

// Runs fn(i) for i in [0, n) on `par`. An exception (e.g. bad_alloc of a scratch buffer) must not escape
// into the host's thread pool, so it is caught per task and reported as "<op>: out of memory ...".
template <typename F>
Status run_tasks(const Parallel& par, int64_t n, const char* op, F&& fn) {
  std::atomic<bool> failed{false};
  par.for_each(static_cast<size_t>(n), [&](size_t i) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      fn(static_cast<int64_t>(i));
    } catch (...) {
      failed.store(true);
    }
  });
  return failed.load() ? Status::Error(std::string(op) + ": out of memory for scratch buffers") : Status::OK();
}

// How tile_gemm cuts the work: N output rows in tasks of task_rows (the unit of parallelism), each in tiles
// of tile_rows (the unit of decoding; at most kMaxTilesPerTask per task), K positions in slices of `slice`;
// the M rows of X in passes of pass_rows (0, or M or more: one pass).
struct Plan {
  int64_t N = 0, task_rows = 0, tile_rows = 0;
  int64_t K = 0, slice = 0;
  int64_t M = 0, pass_rows = 0;
};

// Tiles a task keeps at once (the ops' per-tile scratch has this many slots).
constexpr int kMaxTilesPerTask = 8;

// Rows per task of an outer-product prefill over N rows of W in tiles of tile_rows: up to kMaxTilesPerTask
// tiles, as long as N still makes at least 32 tasks (a 576-row layer keeps one tile per task, and so its 48
// tasks, for machines with many cores). QCOMPILE_PREFILL_TASK_TILES (1 to kMaxTilesPerTask) sets the tile
// count, for tests of several tiles per task at small N.
inline int64_t prefill_task_rows(int64_t N, int64_t tile_rows) {
  const char* env = std::getenv("QCOMPILE_PREFILL_TASK_TILES");
  const int64_t tiles = env && std::atoll(env) > 0
                            ? std::min<int64_t>(std::atoll(env), kMaxTilesPerTask)
                            : std::clamp<int64_t>(N / (tile_rows * 32), 1, kMaxTilesPerTask);
  return tiles * tile_rows;
}

// The decoded-tile GEMM driver. make_tile(n0, rows, m0, m1, slot) returns the op's tile of output rows
// [n0, n0 + rows) for the rows [m0, m1) of X, using the calling thread's scratch slot `slot` (0 ..
// kMaxTilesPerTask - 1: a task's tiles are alive together), an object with
//   void decode(int64_t k0, int64_t len);    // those rows' weights at K positions [k0, k0 + len) into it
//   void multiply(int64_t k0, int64_t len);  // that slice's contribution to X rows [m0, m1)
//   void finish();                           // the outputs of those rows of X (bias, conversion, store)
// A task walks K once, and per K slice decodes and multiplies each of its tiles in turn, so the slice of X
// stays in L2 for all of them (a tile at a time would stream all of X from L3 per tile once X outgrows L2)
// and each weight is decoded once per pass. Passes over X (each a sweep of all N) bound the L2 that one
// slice of X and the tiles' accumulators take. With one pass (M = 0 or pass_rows = 0), m0 = 0 and m1 = M.
template <typename MakeTile>
Status tile_gemm(const Parallel& par, const char* op, const Plan& plan, MakeTile&& make_tile) {
  using Tile = decltype(make_tile(int64_t{0}, int64_t{0}, int64_t{0}, int64_t{0}, 0));
  const int64_t tasks = (plan.N + plan.task_rows - 1) / plan.task_rows;
  if ((plan.task_rows + plan.tile_rows - 1) / plan.tile_rows > kMaxTilesPerTask)
    return Status::Error(std::string(op) + ": internal error: more tiles per task than scratch slots");
  const int64_t step = plan.pass_rows > 0 && plan.pass_rows < plan.M ? plan.pass_rows : plan.M;
  int64_t m0 = 0;
  do {
    const int64_t m1 = std::min(plan.M, m0 + step);
    QCOMPILE_RETURN_IF_ERROR(run_tasks(par, tasks, op, [&](int64_t t) {
      const int64_t r0 = t * plan.task_rows, r1 = std::min(plan.N, r0 + plan.task_rows);
      std::vector<Tile> tiles;
      tiles.reserve(kMaxTilesPerTask);
      int slot = 0;
      for (int64_t n0 = r0; n0 < r1; n0 += plan.tile_rows)
        tiles.push_back(make_tile(n0, std::min(plan.tile_rows, r1 - n0), m0, m1, slot++));
      for (int64_t k0 = 0; k0 < plan.K; k0 += plan.slice) {
        const int64_t len = std::min(plan.slice, plan.K - k0);
        for (Tile& tile : tiles) {
          tile.decode(k0, len);
          tile.multiply(k0, len);
        }
      }
      for (Tile& tile : tiles) tile.finish();
    }));
    m0 = m1;
  } while (m0 < plan.M);
  return Status::OK();
}

// Rows of X per pass of an outer-product prefill over Mpad rows (a multiple of 16) that keeps
// `floats_per_row` floats per row of X in L2 (a K slice of it, and its accumulators in a task's tiles): as
// many as fit in about 3/4 of this core's L2 (at least 32), split evenly into multiples of 16.
// QCOMPILE_PREFILL_PASS_ROWS (a multiple of 16) sets it, for tests of several passes at small M.
inline int64_t x_rows_per_pass(int64_t Mpad, int64_t floats_per_row) {
  const char* env = std::getenv("QCOMPILE_PREFILL_PASS_ROWS");
  if (env && std::atoll(env) >= 16) return std::atoll(env) / 16 * 16;
  const int64_t row_bytes = std::max<int64_t>(floats_per_row, 1) * 4;
  const int64_t cap = std::max<int64_t>(32, l2_cache_bytes() * 3 / 4 / row_bytes / 16 * 16);
  if (Mpad <= cap) return Mpad;
  const int64_t passes = (Mpad + cap - 1) / cap;
  return ((Mpad + passes - 1) / passes + 15) / 16 * 16;
}

// ---- microkernels ---------------------------------------------------------------------------------------

// c[r * ldc + j] (+)= dot(x row r, w row j) over len (a multiple of 8) for R rows of x, 4 rows of w. Eight
// independent lanes per pair keep it vectorisable without reassociation.
template <int R, bool kAccumulate>
void dot_rx4(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t len, float* c, int64_t ldc) {
  float acc[R][4][8] = {};
  for (int64_t k = 0; k < len; k += 8)
    for (int i = 0; i < R; ++i) {
      const float* xr = x + i * ldx + k;
      for (int j = 0; j < 4; ++j) {
        const float* wr = w + j * ldw + k;
        for (int l = 0; l < 8; ++l) acc[i][j][l] += xr[l] * wr[l];
      }
    }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) {
      const float* a = acc[i][j];
      const float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
      c[i * ldc + j] = kAccumulate ? c[i * ldc + j] + s : s;
    }
}

#if QC_X86
// dot_rx4 with AVX2 FMAs: one load of each x row per 8 positions, shared by the 4 rows of w.
// (Accumulators are named variables: GCC keeps an array of them in memory.)
template <int R, bool kAccumulate>
QC_AVX2 void dot_rx4_avx2(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t len, float* c,
                          int64_t ldc) {
  static_assert(R >= 1 && R <= 3, "1..3 rows of x");
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
  __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
  const float *x0 = x, *x1 = x + (R > 1 ? ldx : 0), *x2 = x + (R > 2 ? 2 * ldx : 0);
  const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;
  for (int64_t k = 0; k < len; k += 8) {
    const __m256 xv0 = _mm256_loadu_ps(x0 + k);
    const __m256 xv1 = R > 1 ? _mm256_loadu_ps(x1 + k) : xv0, xv2 = R > 2 ? _mm256_loadu_ps(x2 + k) : xv0;
    __m256 wv;
#define QC_DOT_W(j)                                    \
  wv = _mm256_loadu_ps(w##j + k);                      \
  a0##j = _mm256_fmadd_ps(xv0, wv, a0##j);             \
  if (R > 1) a1##j = _mm256_fmadd_ps(xv1, wv, a1##j); \
  if (R > 2) a2##j = _mm256_fmadd_ps(xv2, wv, a2##j);
    QC_DOT_W(0) QC_DOT_W(1) QC_DOT_W(2) QC_DOT_W(3)
#undef QC_DOT_W
  }
  const __m128 sums[3] = {simd::reduce4(a00, a01, a02, a03), simd::reduce4(a10, a11, a12, a13),
                          simd::reduce4(a20, a21, a22, a23)};
  for (int i = 0; i < R; ++i) {
    float* ci = c + i * ldc;
    _mm_storeu_ps(ci, kAccumulate ? _mm_add_ps(_mm_loadu_ps(ci), sums[i]) : sums[i]);
  }
}

// Outer-product microkernel: c[i * ldc + v] (+)= sum_k a[i][k] * b[k * ldb + v] for MR <= 6 rows of a and
// the first 8 * NV columns of b: one broadcast of a per row and position, 2 * MR accumulators, no transpose.
// `a` holds the MR row pointers; b is k-major (a decoded panel, or activations packed transposed).
template <int MR, int NV, bool kAccumulate>
QC_AVX2 void outer_product(const float* const* a, const float* b, int64_t ldb, int64_t len, float* c,
                           int64_t ldc) {
  static_assert(MR >= 1 && MR <= 6 && (NV == 1 || NV == 2), "1..6 rows, 8 or 16 columns");
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float* a0 = a[0];
  const float* a1 = a[MR > 1 ? 1 : 0];
  const float* a2 = a[MR > 2 ? 2 : 0];
  const float* a3 = a[MR > 3 ? 3 : 0];
  const float* a4 = a[MR > 4 ? 4 : 0];
  const float* a5 = a[MR > 5 ? 5 : 0];
  for (int64_t k = 0; k < len; ++k, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = NV == 2 ? _mm256_loadu_ps(b + 8) : b0;
    __m256 s;
#define QC_OUTER_ROW(i)                                           \
  if (MR > i) {                                                   \
    s = _mm256_broadcast_ss(a##i + k);                            \
    c##i##0 = _mm256_fmadd_ps(s, b0, c##i##0);                    \
    if (NV == 2) c##i##1 = _mm256_fmadd_ps(s, b1, c##i##1);       \
  }
    QC_OUTER_ROW(0) QC_OUTER_ROW(1) QC_OUTER_ROW(2) QC_OUTER_ROW(3) QC_OUTER_ROW(4) QC_OUTER_ROW(5)
#undef QC_OUTER_ROW
  }
  const __m256 rows[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) {
      float* ci = c + i * ldc + 8 * v;
      _mm256_storeu_ps(ci, kAccumulate ? _mm256_add_ps(_mm256_loadu_ps(ci), rows[i][v]) : rows[i][v]);
    }
}

// The prefill tiles multiply with outer_product_x16 (AVX-512, 16 columns per register): the CPU has AVX-512F/BW
// and QCOMPILE_PREFILL_AVX2 (the tests' and benchmarks' switch to the 8-wide kernel) is not set. CPUs with two
// 512-bit FMA units (Intel server cores) do twice the work per cycle of the AVX2 kernel, which left prefill at
// half of onnxruntime's fp32 MatMul there; Zen 4 splits 512-bit FMAs and runs both at the same rate. Callers
// ask once per op call: the switch is an environment read.
inline bool prefill_avx512() { return cpu_has_avx2() && cpu_has_avx512bw() && !env_flag("QCOMPILE_PREFILL_AVX2"); }

// outer_product with 16-float registers: c[i * ldc + v] (+)= sum_k w[i * LDW + k] * b[k * ldb + v] for MR (6
// or 12) rows of the decoded tile and 16 columns of b, and with NB = 2 also the next 16 columns, which lie in
// another block at b1 (c + 16 onwards). With NB = 2 one broadcast feeds two FMAs (24 accumulators), which
// halves the loads per FMA. The tile's row stride LDW is a compile-time constant: each row's broadcast is then
// one pointer plus a fixed displacement. With a run-time stride the compiler kept 12 row pointers, spilled
// some, and the kernel ran at 1.25-1.5 FMAs per cycle on a Golden Cove core instead of 1.85 (of 1.9 for
// FMAs alone).
template <int MR, int NB, bool kAccumulate, int64_t LDW>
QC_AVX512F void outer_product_x16(const float* w, const float* b, const float* b1, int64_t ldb, int64_t len,
                                  float* c, int64_t ldc) {
  static_assert((MR == 6 || MR == 12) && (NB == 1 || NB == 2), "6 or 12 rows, 16 or 32 columns");
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  __m512 c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  __m512 d0 = c0, d1 = c0, d2 = c0, d3 = c0, d4 = c0, d5 = c0;
  __m512 d6 = c0, d7 = c0, d8 = c0, d9 = c0, d10 = c0, d11 = c0;
  for (int64_t k = 0; k < len; ++k, b += ldb, b1 += NB == 2 ? ldb : 0, ++w) {
    const __m512 bv = _mm512_loadu_ps(b);
    const __m512 bw = NB == 2 ? _mm512_loadu_ps(b1) : bv;
    __m512 s;
#define QC_OUTER16(i)                                        \
  s = _mm512_set1_ps(w[(i) * LDW]);                          \
  c##i = _mm512_fmadd_ps(s, bv, c##i);                       \
  if (NB == 2) d##i = _mm512_fmadd_ps(s, bw, d##i);
    QC_OUTER16(0) QC_OUTER16(1) QC_OUTER16(2) QC_OUTER16(3) QC_OUTER16(4) QC_OUTER16(5)
    if (MR > 6) { QC_OUTER16(6) QC_OUTER16(7) QC_OUTER16(8) QC_OUTER16(9) QC_OUTER16(10) QC_OUTER16(11) }
#undef QC_OUTER16
  }
  const __m512 rows[2][12] = {{c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11},
                              {d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11}};
  for (int v = 0; v < NB; ++v)
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * ldc + 16 * v;
      _mm512_storeu_ps(ci, kAccumulate ? _mm512_add_ps(_mm512_loadu_ps(ci), rows[v][i]) : rows[v][i]);
    }
}

// outer_product_x16 with its two choices made at run time: `two` blocks of 16 columns (b and b1) or one (b),
// accumulating into c or storing (the first K slice).
template <int MR, int64_t LDW>
QC_AVX512F void outer_x16(const float* w, const float* b, const float* b1, bool two, bool accumulate, int64_t ldb,
                          int64_t len, float* c, int64_t ldc) {
  if (two && accumulate) outer_product_x16<MR, 2, true, LDW>(w, b, b1, ldb, len, c, ldc);
  else if (two) outer_product_x16<MR, 2, false, LDW>(w, b, b1, ldb, len, c, ldc);
  else if (accumulate) outer_product_x16<MR, 1, true, LDW>(w, b, b, ldb, len, c, ldc);
  else outer_product_x16<MR, 1, false, LDW>(w, b, b, ldb, len, c, ldc);
}
#endif  // QC_X86

}  // namespace tile
}  // namespace qcompile
