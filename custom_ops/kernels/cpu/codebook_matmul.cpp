// CPU kernel for qcompile.CodebookMatMul (AQLM additive codebooks): the plan, the portable kernels, the
// drivers and the dispatch. AVX2 kernels are in codebook_matmul_avx2.cpp, the batch-1 byte walk in
// codebook_byte_walk.cpp (AVX-512BW fixed-point form: codebook_lut_i16.cpp).
//
// Three paths, chosen per call (dispatch):
//  * LUT GEMV (few rows; codewords long and codebooks small, or one row of aqlm-2x8 byte codes over many
//    output rows): for one X row, the dot product of every input group with every codeword,
//    lut[g][m][s] = x_g . C[m][s] (G*M*S floats; built vectorised over s from a codeword-transposed copy
//    of the codebooks). Then y[n] = scale[n] * sum_{g,m} lut[g][m][code[n,g,m]]: M table lookups per group
//    instead of 8 multiply-adds, and W is never materialised. Tasks own blocks of output rows.
//  * fused decode-dot (up to 8 rows): each group's codewords are summed (codebooks stay in L1) and dotted
//    with every X row.
//  * decode + GEMM (prefill, tile::tile_gemm): a tile of 16 output channels is decoded for all of K into a
//    row-major float tile [16][Kp]; 3x4 dot-product microkernels reuse it for every block of 3 X rows.
// Scales and bias are applied once per output.
//
// Codes are validated on the fly: every index is clamped to S-1 before it is used (so no read is ever out
// of bounds) and the largest code seen is recorded; a code >= S fails the call with an error naming it.
// When S is the full range of the code type (256 for uint8, 65536 for uint16) no check is needed.
// The library is compiled for x86-64-v2; AVX2/FMA/F16C code is selected at run time
// (QCOMPILE_CODEBOOK_NO_AVX2=1 forces the portable path, which the tests also exercise).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "codebook_lut_i16.h"
#include "codebook_lut_i8.h"
#include "codebook_matmul_internal.h"
#include "qcompile/codebook_matmul.h"
#include "qcompile/cpu_features.h"
#include "qcompile/half.h"
#include "simd.h"
#include "tile_gemm.h"

namespace qcompile {
namespace codebook {
namespace detail {

void pack_xt(const float* x, int64_t rows, int64_t Kp, float* xt) {
  const int64_t blocks = (rows + kXtLd - 1) / kXtLd;
  for (int64_t b = 0; b < blocks; ++b) {
    float* dst = xt + b * Kp * kXtLd;
    for (int64_t i = 0; i < kXtLd; ++i) {
      const int64_t r = b * kXtLd + i;
      if (r >= rows) {
        for (int64_t k = 0; k < Kp; ++k) dst[k * kXtLd + i] = 0.0f;
        continue;
      }
      const float* src = x + r * Kp;
      for (int64_t k = 0; k < Kp; ++k) dst[k * kXtLd + i] = src[k];
    }
  }
}

Geometry geometry(const Attrs& a) {
  Geometry g;
  g.K = a.K;
  g.N = a.N;
  g.d = a.in_group_size;
  g.G = a.K / a.in_group_size;
  g.M = a.num_codebooks;
  g.S = a.codebook_size;
  g.T = g.G * g.M;
  g.LS = (g.S + 7) / 8 * 8;
  return g;
}

}  // namespace detail

using namespace detail;
namespace {

constexpr int64_t kMR = 3;           // X rows per microkernel call (3 x 4 dot-product blocks)
constexpr int64_t kLutMaxRows = 4;   // up to this many X rows use the LUT path
constexpr int64_t kGemvRowsPerTask = 64;
constexpr int64_t kFusedRows = 4;     // X rows sharing one decode in the fused path
constexpr int64_t kFusedMaxRows = 8;  // up to this many X rows use the fused path

bool use_avx2() { return avx2_enabled("QCOMPILE_CODEBOOK_NO_AVX2"); }

// The table the batch-1 byte walk reads on this CPU for this layer: int8 (codebook_lut_i8.h) at accuracy_level
// 4 with AVX-512 VBMI, 16-bit fixed point (codebook_lut_i16.h) with AVX-512BW unless accuracy_level is 1
// (fp32), else fp32. What prepare_constant_codes lays the codes out for, and what run_lut checks it against.
enum class WalkTable { kFp32, kInt16, kInt8 };
WalkTable walk_table(const Attrs& a) {
  if (!use_avx2() || a.accuracy_level == kAccuracyFp32) return WalkTable::kFp32;
  if (a.accuracy_level == kAccuracyInt8 && lut_i8::available()) return WalkTable::kInt8;
  return lut_i16::available() ? WalkTable::kInt16 : WalkTable::kFp32;
}

double max_abs(const float* v, int64_t n) {
  float m = 0.f;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(v[i]));
  return m;
}

float load_elem(const void* base, DType t, int64_t i) {
  return t == DType::kFloat16 ? half_to_float(static_cast<const uint16_t*>(base)[i])
                              : static_cast<const float*>(base)[i];
}

void store_elem(void* base, DType t, int64_t i, float v) {
  if (t == DType::kFloat16) {
    static_cast<uint16_t*>(base)[i] = float_to_half(v);
  } else {
    static_cast<float*>(base)[i] = v;
  }
}

// ---- LUT build: lut[(g*M+m)*LS + s] = sum_j x[g*d+j] * C[m][s][j] ------------------------------------
// cbt is the codeword-transposed codebook: cbt[(m*d + j)*LS + s] = C[m][s][j] (zero for s >= S).

void lut_build_ref(const float* x, const float* cbt, const Geometry& g, int64_t g0, int64_t g1, float* lut) {
  for (int64_t gi = g0; gi < g1; ++gi) {
    const float* xg = x + gi * g.d;
    for (int64_t m = 0; m < g.M; ++m) {
      float* out = lut + (gi * g.M + m) * g.LS;
      for (int64_t s = 0; s < g.LS; ++s) out[s] = 0.0f;
      for (int64_t j = 0; j < g.d; ++j) {
        const float xv = xg[j];
        const float* c = cbt + (m * g.d + j) * g.LS;
        for (int64_t s = 0; s < g.LS; ++s) out[s] += xv * c[s];
      }
    }
  }
}

// ---- decode: up to 16 output channels into a row-major tile wt[i*Kp + k] (zero-padded) -------------------

// w[0..d) += the group's M codewords (codes: its M codes). With kCheck, a code past the codebook is
// clamped for the read and recorded in *mx, so the caller can report it after the pass.
template <typename C, bool kCheck>
inline void add_codewords(const C* codes, const float* cb, const Geometry& g, uint32_t last, float* w, uint32_t* mx) {
  for (int64_t m = 0; m < g.M; ++m) {
    uint32_t c = codes[m];
    if (kCheck) {
      *mx = std::max(*mx, c);
      c = std::min(c, last);
    }
    const float* cw = cb + (m * g.S + c) * g.d;
    for (int64_t j = 0; j < g.d; ++j) w[j] += cw[j];
  }
}

template <typename C, bool kCheck>
void decode_tile_ref(const C* codes, const float* cb, const Geometry& g, int64_t n0, int64_t nb, int64_t Kp,
                     float* wt, uint32_t* maxc) {
  const uint32_t last = static_cast<uint32_t>(g.S - 1);
  uint32_t mx = 0;
  for (int64_t i = 0; i < kNR; ++i) {
    float* dst = wt + i * Kp;
    std::fill(dst, dst + Kp, 0.0f);
    if (i >= nb) continue;  // padding channel of a partial tile
    const C* row = codes + (n0 + i) * g.T;
    for (int64_t gi = 0; gi < g.G; ++gi) add_codewords<C, kCheck>(row + gi * g.M, cb, g, last, dst + gi * g.d, &mx);
  }
  if (kCheck) *maxc = std::max(*maxc, mx);
}

// ---- GEMM microkernel: c[r][j] = dot(x[r], w[j]) over Kp (a multiple of 8), R x rows, 4 W rows ----------

// c[r][0..4) for R = 1..3 rows of x against 4 rows of w.
void micro(bool avx2, int R, const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t Kp, float* c,
           int64_t ldc) {
#if QC_X86
  if (avx2) {
    if (R == 1) tile::dot_rx4_avx2<1, false>(x, ldx, w, ldw, Kp, c, ldc);
    else if (R == 2) tile::dot_rx4_avx2<2, false>(x, ldx, w, ldw, Kp, c, ldc);
    else tile::dot_rx4_avx2<3, false>(x, ldx, w, ldw, Kp, c, ldc);
    return;
  }
#endif
  if (R == 1) tile::dot_rx4<1, false>(x, ldx, w, ldw, Kp, c, ldc);
  else if (R == 2) tile::dot_rx4<2, false>(x, ldx, w, ldw, Kp, c, ldc);
  else tile::dot_rx4<3, false>(x, ldx, w, ldw, Kp, c, ldc);
}

// ---- fused decode-dot (GEMV, few rows): y[r][n] = sum_g dot(x[r]_g, sum_m C[m][code]) ------------------
// The 2x8 codebooks are 8 KB, so every codeword read hits L1; each group costs M loads + adds and one FMA
// per X row, and W is never materialised.

template <typename C, bool kCheck, int R>
void fused_rows_ref(const C* codes, const float* cb, const Geometry& g, const float* x, int64_t ldx, int64_t n0,
                    int64_t n1, float* out /* [R][n1-n0] */, uint32_t* maxc) {
  const uint32_t last = static_cast<uint32_t>(g.S - 1);
  uint32_t mx = 0;
  float w[32];
  for (int64_t n = n0; n < n1; ++n) {
    const C* row = codes + n * g.T;
    float acc[R] = {};
    for (int64_t gi = 0; gi < g.G; ++gi) {
      for (int64_t j = 0; j < g.d; ++j) w[j] = 0.0f;
      add_codewords<C, kCheck>(row + gi * g.M, cb, g, last, w, &mx);
      for (int r = 0; r < R; ++r) {
        const float* xg = x + r * ldx + gi * g.d;
        float dot = 0.0f;
        for (int64_t j = 0; j < g.d; ++j) dot += w[j] * xg[j];
        acc[r] += dot;
      }
    }
    for (int r = 0; r < R; ++r) out[r * (n1 - n0) + (n - n0)] = acc[r];
  }
  if (kCheck) *maxc = std::max(*maxc, mx);
}

template <typename C, bool kCheck, int R>
void fused_rows(bool avx2, const C* codes, const float* cb, const Geometry& g, const float* x, int64_t ldx,
                int64_t n0, int64_t n1, float* out, uint32_t* maxc) {
#if QC_X86
  if (avx2 && g.d == 8) {
    fused_rows_avx2_d8<C, kCheck, R>(codes, cb, g, x, ldx, n0, n1, out, maxc);
    return;
  }
#endif
  fused_rows_ref<C, kCheck, R>(codes, cb, g, x, ldx, n0, n1, out, maxc);
}

// ---- drivers ---------------------------------------------------------------------------------------------

struct Prepared {
  int64_t Kp = 0;             // K rounded up to 8 (GEMM rows are zero-padded to it)
  std::vector<float> x;       // [rows, Kp] fp32
  std::vector<float> scales;  // [N]
  std::vector<float> bias;    // [N] or empty
  std::vector<float> cb;      // [M, S, d] fp32
};

// sum_{t < cnt} lut[t*LS + code[t]] with four independent chains; ls advances by one table per entry,
// so each lookup is a byte load plus a load-add at a constant displacement.
template <typename C, bool kCheck>
inline float lut_slice(const C* codes, const float* lut, int64_t cnt, int64_t LS, int64_t S, uint32_t* maxc) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  uint32_t mx = 0;
  const uint32_t last = static_cast<uint32_t>(S - 1);
  auto idx = [&](uint32_t c) {
    if (kCheck) {
      mx = std::max(mx, c);
      c = std::min(c, last);
    }
    return c;
  };
  int64_t t = 0;
  for (; t + 4 <= cnt; t += 4, lut += 4 * LS) {
    s0 += lut[idx(codes[t])];
    s1 += lut[LS + idx(codes[t + 1])];
    s2 += lut[2 * LS + idx(codes[t + 2])];
    s3 += lut[3 * LS + idx(codes[t + 3])];
  }
  for (; t < cnt; ++t, lut += LS) s0 += lut[idx(codes[t])];
  if (kCheck) *maxc = std::max(*maxc, mx);
  return (s0 + s1) + (s2 + s3);
}

template <typename C, bool kCheck>
Status run_lut(const Problem& p, const Geometry& g, const Prepared& in, bool avx2, const Parallel& par,
               std::vector<uint32_t>& maxc) {
  // Codeword-transposed codebooks: cbt[(m*d + j)*LS + s].
  // Buffers are per calling thread and reused across calls (no page faults for a fresh 1 MB every token).
  thread_local std::vector<float> cbt_buf, lut_buf;
  float* cbt = scratch(cbt_buf, static_cast<size_t>(g.M * g.d * g.LS));
  std::fill(cbt, cbt + g.M * g.d * g.LS, 0.0f);
  for (int64_t m = 0; m < g.M; ++m)
    for (int64_t s = 0; s < g.S; ++s)
      for (int64_t j = 0; j < g.d; ++j) cbt[(m * g.d + j) * g.LS + s] = in.cb[(m * g.S + s) * g.d + j];
  float* lut = scratch(lut_buf, static_cast<size_t>(g.T * g.LS));
  const C* codes = static_cast<const C*>(p.codes);
  const int64_t build_chunk = std::max<int64_t>(1, 16384 / (g.M * g.LS));  // ~64 KB of LUT per task
  const int64_t build_tasks = (g.G + build_chunk - 1) / build_chunk;
  const bool fast_u8 = sizeof(C) == 1 && !kCheck && g.LS == 256;
  const int64_t rows_per_task = fast_u8 ? kLutRowsPerTask : kGemvRowsPerTask;
  // codes prepared in slice order for exactly this walk (same row blocks), when the call's codes match
  const bool prepared = fast_u8 && p.prepared && p.prepared->source == p.codes && !p.prepared->sliced.empty() &&
                        p.prepared->block_rows == kLutRowsPerTask;
  const uint8_t* sliced =
      prepared && p.prepared->layout == WalkLayout::kRowSlices ? p.prepared->sliced.data() : nullptr;
  // the fixed-point walks (codebook_lut_i16.h, codebook_lut_i8.h) over codes prepared in their layouts
  const WalkTable table = walk_table(p.attrs);
  const bool int8_walk = prepared && p.prepared->layout == WalkLayout::kTableMajor64 && table == WalkTable::kInt8;
  const uint8_t* table_major = (prepared && p.prepared->layout == WalkLayout::kTableMajor32 &&
                                table == WalkTable::kInt16) || int8_walk
                                   ? p.prepared->sliced.data()
                                   : nullptr;
  const int64_t slices = g.T / 16;
  const int64_t code_bytes = table_major ? static_cast<int64_t>(p.prepared->sliced.size()) : 0;
  // largest |codeword value| (NaN: the fixed-point walks are not used)
  const double max_abs_cb = table_major && simd::all_finite(in.cb.data(), static_cast<int64_t>(in.cb.size()))
                                ? max_abs(in.cb.data(), static_cast<int64_t>(in.cb.size()))
                                : std::numeric_limits<double>::infinity();
  // (the calling thread's buffers, shared with the tasks through these pointers)
  thread_local std::vector<int16_t> qlut_buf;
  thread_local std::vector<uint8_t> q8lut_buf;
  thread_local std::vector<float> qstep_buf;
  thread_local std::vector<uint8_t> qshift_buf;  // int8 walk: per table
  int16_t* qlut = scratch(qlut_buf, table_major && !int8_walk ? static_cast<size_t>(slices * 16 * 256) : 0);
  uint8_t* q8lut = scratch(q8lut_buf, int8_walk ? static_cast<size_t>(slices * 16 * 256) : 0);
  float* qstep = scratch(qstep_buf, table_major ? static_cast<size_t>(slices) : 0);
  uint8_t* qshift = scratch(qshift_buf, int8_walk ? static_cast<size_t>(slices * 16) : 0);
  const int64_t gather_tasks = (g.N + rows_per_task - 1) / rows_per_task;
  static const int64_t slice_bytes = [] {
    const char* e = std::getenv("QCOMPILE_CODEBOOK_LUT_SLICE_KB");
    return (e && std::atoi(e) > 0 ? std::atoi(e) : 16) * int64_t{1024};
  }();
  const int64_t slice = std::max<int64_t>(4, slice_bytes / (4 * g.LS) / 4 * 4);
  const auto build_groups = [&](const float* x) {
    par.for_each(static_cast<size_t>(build_tasks), [&](size_t t) {
      const int64_t g0 = static_cast<int64_t>(t) * build_chunk, g1 = std::min(g.G, g0 + build_chunk);
#if QC_X86
      if (avx2) {
        lut_build_avx2(x, cbt, g, g0, g1, lut);
        return;
      }
#endif
      lut_build_ref(x, cbt, g, g0, g1, lut);
    });
  };
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* x = in.x.data() + r * in.Kp;
    // A NaN or Inf in the table (from X or the codebooks, or a product past FLT_MAX) takes the fp32 walk
    // over the file-order codes, which carries it as the reference does; no table entry can be one when
    // every term |x| |c| times d stays finite, which one scan of X and the codebooks tells.
    bool fixed_point = table_major != nullptr && simd::all_finite(x, g.K) &&
                       max_abs(x, g.K) * max_abs_cb * static_cast<double>(g.d) < 3.0e38;
    if (fixed_point) {
      // Each slice of 16 tables is built in L1 and rounded at once: the fp32 table (1 MB at K = 4096) is
      // never written, only its last T mod 16 tables, which stay fp32.
      constexpr int64_t kSlicesPerTask = 8;
      par.for_each(static_cast<size_t>((slices + kSlicesPerTask - 1) / kSlicesPerTask), [&](size_t t) {
        thread_local std::vector<float> tables;
        float* buf = scratch(tables, static_cast<size_t>(16 * g.LS));
        float tmax[16];
        const int64_t s0 = static_cast<int64_t>(t) * kSlicesPerTask, s1 = std::min(slices, s0 + kSlicesPerTask);
        for (int64_t s = s0; s < s1; ++s) {
          // Building reads no weights: meanwhile the head of the walk's codes streams into L2, a share per slice
          // (the walk's own prefetch takes over from there).
          const int64_t ahead = std::min(kBuildPrefetchBytes, code_bytes);
          for (int64_t b = ahead * s / slices; b < ahead * (s + 1) / slices; b += 64)
            __builtin_prefetch(table_major + b, 0, 2);
#if QC_X86
          lut_build_tables_avx2(x, cbt, g, 16 * s, 16 * s + 16, buf, tmax);
#endif
          if (int8_walk) lut_i8::quantize_slice(buf, tmax, q8lut + s * 16 * 256, qshift + s * 16, qstep + s);
          else lut_i16::quantize_slice(buf, tmax, qlut + s * 16 * 256, qstep + s);
        }
      });
      if (slices * 16 < g.T) {
#if QC_X86
        lut_build_tables_avx2(x, cbt, g, slices * 16, g.T, lut + slices * 16 * g.LS, nullptr);
#endif
      }
    }
    if (!fixed_point) build_groups(x);
    const Status st = tile::run_tasks(par, gather_tasks, kOp, [&](int64_t t) {
      // Walk the LUT in L1-sized slices of (group, codebook) entries, all of this task's rows per slice:
      // two loads per lookup (code, table entry), no gathers, and the table slice never leaves L1.
      thread_local std::vector<float> acc_buf;
      const int64_t n0 = t * rows_per_task, n1 = std::min(g.N, n0 + rows_per_task);
      const int64_t padded = (n1 - n0 + lut_i8::kRowGroup - 1) / lut_i8::kRowGroup * lut_i8::kRowGroup;
      float* acc = scratch(acc_buf, static_cast<size_t>(2 * padded));
      std::fill(acc, acc + padded, 0.0f);
      uint32_t mx = 0;
      if (fixed_point && int8_walk) {
        float* walk = acc + padded;  // the walk's row order, then back to rows
        std::fill(walk, walk + padded, 0.0f);
        lut_i8::walk_block(table_major + n0 * (slices * 16), q8lut, qshift, qstep, slices, n1 - n0, walk);
        for (int64_t r = 0; r < n1 - n0; ++r) acc[r] = walk[lut_i8::slot(r)];
        lut_rows_u8_tail(reinterpret_cast<const uint8_t*>(codes), lut, g.T, slices * 16, n0, n1, acc);
      } else if (fixed_point) {
        lut_i16::walk_block(table_major + n0 * (slices * 16), qlut, qstep, slices, n1 - n0, acc);
        lut_rows_u8_tail(reinterpret_cast<const uint8_t*>(codes), lut, g.T, slices * 16, n0, n1, acc);
      } else if (fast_u8) {
        const uint8_t* blk = sliced ? sliced + n0 * (g.T / 16 * 16) : nullptr;
#if QC_X86
        if (avx2)
          lut_rows_u8_avx2(reinterpret_cast<const uint8_t*>(codes), blk, lut, g.T, n0, n1, acc);
        else
#endif
          lut_rows_u8(reinterpret_cast<const uint8_t*>(codes), blk, lut, g.T, n0, n1, acc);
      } else {
        for (int64_t t0 = 0; t0 < g.T; t0 += slice) {
          const int64_t cnt = std::min(slice, g.T - t0);
          const float* ls = lut + t0 * g.LS;
          for (int64_t n = n0; n < n1; ++n)
            acc[n - n0] += lut_slice<C, kCheck>(codes + n * g.T + t0, ls, cnt, g.LS, g.S, &mx);
        }
      }
      for (int64_t n = n0; n < n1; ++n) {
        float v = acc[n - n0] * in.scales[n];
        if (!in.bias.empty()) v += in.bias[n];
        store_elem(p.y, p.dtype, r * g.N + n, v);
      }
      if (kCheck) maxc[t] = std::max(maxc[t], mx);
    });
    QCOMPILE_RETURN_IF_ERROR(st);
  }
  return Status::OK();
}

// Prefill (tile::tile_gemm): tiles of 16 output channels, decoded once for all of K into a row-major tile
// [16][Kp], which 3x4 dot-product microkernels reuse for every block of 3 X rows; scales and bias are applied
// once per output.
template <typename C, bool kCheck>
Status run_gemm(const Problem& p, const Geometry& g, const Prepared& in, bool avx2, const Parallel& par,
                std::vector<uint32_t>& maxc) {
#if QC_X86
  if (avx2 && g.d == 8) {  // outer products over X packed transposed (codebook_matmul_avx2.cpp)
    thread_local std::vector<float> xt_buf;
    const int64_t Mpad = (p.rows + kXtLd - 1) / kXtLd * kXtLd;
    float* xt = scratch(xt_buf, static_cast<size_t>(Mpad * in.Kp));
    pack_xt(in.x.data(), p.rows, in.Kp, xt);
    const Status st = run_outer_avx2_d8<C, kCheck>(static_cast<const C*>(p.codes), in.cb.data(), g, xt, p.rows,
                                                   in.Kp, in.scales.data(), in.bias.empty() ? nullptr : in.bias.data(),
                                                   p.dtype, p.y, par, maxc.data(), p.attrs.accuracy_level);
    if (xt_buf.capacity() > (size_t{16} << 20)) std::vector<float>().swap(xt_buf);  // do not pin >64 MB per thread
    return st;
  }
#endif
  struct Tile {
    const Problem& p;
    const Geometry& g;
    const Prepared& in;
    bool avx2;
    int64_t n0, nb;
    float* wt;
    uint32_t* maxc;
    void decode(int64_t, int64_t) {
      const C* codes = static_cast<const C*>(p.codes);
      uint32_t mx = 0;
#if QC_X86
      if (avx2 && g.d == 8) {
        decode_tile_avx2_d8<C, kCheck>(codes, in.cb.data(), g, n0, nb, in.Kp, wt, &mx);
      } else {
        decode_tile_ref<C, kCheck>(codes, in.cb.data(), g, n0, nb, in.Kp, wt, &mx);
      }
#else
      decode_tile_ref<C, kCheck>(codes, in.cb.data(), g, n0, nb, in.Kp, wt, &mx);
#endif
      if (kCheck) *maxc = mx;
    }
    void multiply(int64_t, int64_t) {
      const int64_t Kp = in.Kp;
      float c[kMR * kNR];
      for (int64_t r0 = 0; r0 < p.rows; r0 += kMR) {
        const int rr = static_cast<int>(std::min(kMR, p.rows - r0));
        for (int64_t j0 = 0; j0 < kNR; j0 += 4)
          micro(avx2, rr, in.x.data() + r0 * Kp, Kp, wt + j0 * Kp, Kp, Kp, c + j0, kNR);
        for (int r = 0; r < rr; ++r) {
          for (int64_t i = 0; i < nb; ++i) {
            float v = c[r * kNR + i] * in.scales[n0 + i];
            if (!in.bias.empty()) v += in.bias[n0 + i];
            store_elem(p.y, p.dtype, (r0 + r) * g.N + n0 + i, v);
          }
        }
      }
    }
    void finish() {}
  };
  const tile::Plan plan{g.N, kNR, kNR, in.Kp, in.Kp};
  return tile::tile_gemm(par, kOp, plan, [&](int64_t n0, int64_t nb, int64_t, int64_t, int) {
    thread_local std::vector<float> wbuf;
    float* wt = scratch(wbuf, static_cast<size_t>(in.Kp * kNR));
    return Tile{p, g, in, avx2, n0, nb, wt, &maxc[static_cast<size_t>(n0 / kNR)]};
  });
}

template <typename C, bool kCheck>
Status run_fused(const Problem& p, const Geometry& g, const Prepared& in, bool avx2, const Parallel& par,
                 std::vector<uint32_t>& maxc) {
  const C* codes = static_cast<const C*>(p.codes);
  const int64_t tasks = (g.N + kGemvRowsPerTask - 1) / kGemvRowsPerTask;
  return tile::run_tasks(par, tasks, kOp, [&](int64_t t) {
    const int64_t n0 = t * kGemvRowsPerTask, n1 = std::min(g.N, n0 + kGemvRowsPerTask);
    float out[kFusedRows * kGemvRowsPerTask];
    uint32_t mx = 0;
    for (int64_t r0 = 0; r0 < p.rows; r0 += kFusedRows) {
      const int64_t rr = std::min(kFusedRows, p.rows - r0);
      const float* x = in.x.data() + r0 * in.Kp;
      switch (rr) {
        case 1: fused_rows<C, kCheck, 1>(avx2, codes, in.cb.data(), g, x, in.Kp, n0, n1, out, &mx); break;
        case 2: fused_rows<C, kCheck, 2>(avx2, codes, in.cb.data(), g, x, in.Kp, n0, n1, out, &mx); break;
        case 3: fused_rows<C, kCheck, 3>(avx2, codes, in.cb.data(), g, x, in.Kp, n0, n1, out, &mx); break;
        default: fused_rows<C, kCheck, 4>(avx2, codes, in.cb.data(), g, x, in.Kp, n0, n1, out, &mx); break;
      }
      for (int64_t r = 0; r < rr; ++r) {
        for (int64_t n = n0; n < n1; ++n) {
          float v = out[r * (n1 - n0) + (n - n0)] * in.scales[n];
          if (!in.bias.empty()) v += in.bias[n];
          store_elem(p.y, p.dtype, (r0 + r) * g.N + n, v);
        }
      }
    }
    if (kCheck) maxc[t] = std::max(maxc[t], mx);
  });
}

// One row, byte codes over full 256-entry tables (aqlm-2x8) and many output rows: the slice-ordered
// walk (lut_rows_u8) is the automatic choice (see dispatch). The int8 walk pays for its table from fewer rows:
// Zen 4 VM, one thread, cold, fused -> int8 walk: 576 x 192 0.017 -> 0.028 ms, 576 x 384 0.025 -> 0.034,
// 576 x 576 0.040 -> 0.034, 1536 x 448 0.081 -> 0.071, 576 x 1536 0.085 -> 0.045.
bool byte_walk_wins(const Geometry& g, WalkTable table) {
  const int64_t min_rows = table == WalkTable::kInt8 ? 512 : 8 * g.S;
  return g.LS == 256 && g.M >= 2 && g.N >= min_rows && g.T * g.LS < (int64_t{1} << 30);
}

enum class Path { kAuto, kLut, kFused, kGemm };

Path forced_path() {
  const char* e = std::getenv("QCOMPILE_CODEBOOK_PATH");  // tests pin each path; unset = automatic
  if (!e) return Path::kAuto;
  if (!std::strcmp(e, "lut")) return Path::kLut;
  if (!std::strcmp(e, "fused")) return Path::kFused;
  if (!std::strcmp(e, "gemm")) return Path::kGemm;
  return Path::kAuto;
}

template <typename C, bool kCheck>
Status dispatch(const Problem& p, const Geometry& g, const Prepared& in, bool avx2, const Parallel& par,
              std::vector<uint32_t>& maxc) {
  const bool lut_ok = g.T * g.LS < (int64_t{1} << 30);
  Path path = forced_path();
  if (path == Path::kLut && !lut_ok) path = Path::kFused;
  if (path == Path::kAuto) {
    // Measured on Zen3: in general the fused decode-dot wins, its codebooks staying in L1 while the LUT
    // (G*M*S floats, 1 MB for 2x8 at K=4096) does not fit L2; the generic LUT wins only when codewords
    // are long and codebooks small. Exception: one row with byte codes over full 256-entry codebooks
    // (aqlm-2x8) and many output rows, where the slice-ordered walk (lut_rows_u8) does 2 scalar lookups
    // per group against the fused path's 2 codeword loads, add and FMA (~1.3-1.5x faster at 4096x4096;
    // slower on small layers, where building the table does not pay off).
    // Past a few rows, decoding each W tile once and reusing it (GEMM) beats re-decoding per row block.
    const bool lut_wins = (g.d > 8 && g.M * g.S <= 2 * g.N && lut_ok) ||
                          (p.rows == 1 && sizeof(C) == 1 && !kCheck && byte_walk_wins(g, walk_table(p.attrs)));
    if (p.rows <= kLutMaxRows && lut_wins) path = Path::kLut;
    else if (p.rows <= kFusedMaxRows) path = Path::kFused;
    else path = Path::kGemm;
  }
  switch (path) {
    case Path::kLut: return run_lut<C, kCheck>(p, g, in, avx2, par, maxc);
    case Path::kFused: return run_fused<C, kCheck>(p, g, in, avx2, par, maxc);
    default: return run_gemm<C, kCheck>(p, g, in, avx2, par, maxc);
  }
}

// Outputs the paths left non-finite, recomputed the way the reference computes them
// (qcompile/reference/codebook.py): row n of W = (sum of its codewords) · scales[n] in fp32, then the dot
// product with X in fp32, plus the bias. The paths scale the finished dot product instead, which turns the
// reference's NaN (an Inf scale times a zero codeword sum, or ±Inf terms of both signs) into ±Inf.
void recompute_non_finite(const Problem& p, const Geometry& g, const Prepared& in) {
  std::vector<float> wrow;  // allocated only when an output needs it
  const uint32_t last = static_cast<uint32_t>(g.S - 1);
  for (int64_t n = 0; n < g.N; ++n) {
    bool any = false;
    for (int64_t r = 0; r < p.rows; ++r) any = any || !std::isfinite(load_elem(p.y, p.dtype, r * g.N + n));
    if (!any) continue;
    wrow.assign(static_cast<size_t>(g.K), 0.0f);
    for (int64_t gi = 0; gi < g.G; ++gi)
      for (int64_t m = 0; m < g.M; ++m) {
        const int64_t i = (n * g.G + gi) * g.M + m;
        const uint32_t code = p.code_type == CodeType::kUint8 ? static_cast<const uint8_t*>(p.codes)[i]
                                                                : static_cast<const uint16_t*>(p.codes)[i];
        const float* cw = in.cb.data() + (m * g.S + std::min(code, last)) * g.d;
        for (int64_t j = 0; j < g.d; ++j) wrow[gi * g.d + j] += cw[j];
      }
    for (float& v : wrow) v *= in.scales[n];
    for (int64_t r = 0; r < p.rows; ++r) {
      if (std::isfinite(load_elem(p.y, p.dtype, r * g.N + n))) continue;
      float acc = 0.0f;
      for (int64_t k = 0; k < g.K; ++k) acc += in.x[r * in.Kp + k] * wrow[k];
      if (!in.bias.empty()) acc += in.bias[n];
      store_elem(p.y, p.dtype, r * g.N + n, acc);
    }
  }
}

}  // namespace

Status prepare_constant_codes(const Attrs& a, const void* codes, CodeType code_type, PreparedCodes* out) {
  QCOMPILE_RETURN_IF_ERROR(validate_attrs(a));
  QCOMPILE_RETURN_IF_ERROR(check_codes_host(a, codes, code_type));
  out->source = codes;
  out->checked = true;
  out->block_rows = kLutRowsPerTask;
  out->layout = WalkLayout::kNone;
  out->sliced.clear();
  const Geometry g = geometry(a);
  if (code_type != CodeType::kUint8 || !byte_walk_wins(g, walk_table(a))) return Status::OK();
  const int64_t T16 = g.T / 16 * 16;
  const uint8_t* src = static_cast<const uint8_t*>(codes);
  const WalkTable table = walk_table(a);  // the walk this CPU will run
  if (table == WalkTable::kInt8) {
    out->layout = WalkLayout::kTableMajor64;
    out->sliced.resize(static_cast<size_t>(g.N / kLutRowsPerTask * kLutRowsPerTask * T16 +
                                           lut_i8::block_bytes(g.N % kLutRowsPerTask, T16)));
    for (int64_t n0 = 0; n0 < g.N; n0 += kLutRowsPerTask)
      lut_i8::pack_block(src, g.T, T16, n0, std::min(kLutRowsPerTask, g.N - n0), out->sliced.data() + n0 * T16);
    return Status::OK();
  }
  if (table == WalkTable::kInt16) {
    out->layout = WalkLayout::kTableMajor32;
    out->sliced.resize(static_cast<size_t>(g.N / kLutRowsPerTask * kLutRowsPerTask * T16 +
                                           lut_i16::block_bytes(g.N % kLutRowsPerTask, T16)));
    for (int64_t n0 = 0; n0 < g.N; n0 += kLutRowsPerTask)
      lut_i16::pack_block(src, g.T, T16, n0, std::min(kLutRowsPerTask, g.N - n0), out->sliced.data() + n0 * T16);
    return Status::OK();
  }
  out->layout = WalkLayout::kRowSlices;
  out->sliced.resize(static_cast<size_t>(g.N * T16));
  for (int64_t n0 = 0; n0 < g.N; n0 += kLutRowsPerTask) {
    const int64_t R = std::min(kLutRowsPerTask, g.N - n0);
    uint8_t* blk = out->sliced.data() + n0 * T16;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t q = 0; q < T16 / 16; ++q) std::memcpy(blk + (q * R + r) * 16, src + (n0 + r) * g.T + 16 * q, 16);
  }
  return Status::OK();
}

Status matmul_cpu(const Problem& p, const Parallel& par) {
  QCOMPILE_RETURN_IF_ERROR(validate_attrs(p.attrs));
  if (p.rows == 0) return Status::OK();
  const Geometry g = geometry(p.attrs);
  const bool avx2 = use_avx2();
  thread_local Prepared in;  // kept per calling thread: no allocation (nor page faults) per call
  in.Kp = (g.K + 7) / 8 * 8;
  in.x.assign(static_cast<size_t>(p.rows * in.Kp), 0.0f);
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t k = 0; k < g.K; ++k) in.x[r * in.Kp + k] = load_elem(p.x, p.dtype, r * g.K + k);
  in.scales.resize(static_cast<size_t>(g.N));
  in.cb.resize(static_cast<size_t>(g.M * g.S * g.d));
#if QC_X86
  if (avx2) {  // F16C: the same values, without a branchy conversion per element (4096 codebook values a call)
    if (p.scale_type == DType::kFloat16)
      simd::half_to_float_avx2(static_cast<const uint16_t*>(p.scales), in.scales.data(), g.N);
    else
      std::memcpy(in.scales.data(), p.scales, static_cast<size_t>(g.N) * sizeof(float));
    simd::half_to_float_avx2(p.codebooks, in.cb.data(), static_cast<int64_t>(in.cb.size()));
  } else
#endif
  {
    for (int64_t n = 0; n < g.N; ++n) in.scales[n] = load_elem(p.scales, p.scale_type, n);
    for (size_t i = 0; i < in.cb.size(); ++i) in.cb[i] = half_to_float(p.codebooks[i]);
  }
  in.bias.clear();
  if (p.bias) {
    in.bias.resize(static_cast<size_t>(g.N));
    for (int64_t n = 0; n < g.N; ++n) in.bias[n] = load_elem(p.bias, p.dtype, n);
  }

  const bool u8 = p.code_type == CodeType::kUint8;
  const bool checked_once = p.prepared && p.prepared->checked && p.prepared->source == p.codes;
  const bool check = !checked_once && (u8 ? g.S < 256 : g.S < 65536);
  thread_local std::vector<uint32_t> maxc;
  maxc.assign(static_cast<size_t>(std::max<int64_t>((g.N + kOuterRows - 1) / kOuterRows, 1) + 64), 0);  // >= tasks of any path
  Status st;
  if (u8) {
    st = check ? dispatch<uint8_t, true>(p, g, in, avx2, par, maxc)
               : dispatch<uint8_t, false>(p, g, in, avx2, par, maxc);
  } else {
    st = check ? dispatch<uint16_t, true>(p, g, in, avx2, par, maxc)
               : dispatch<uint16_t, false>(p, g, in, avx2, par, maxc);
  }
  QCOMPILE_RETURN_IF_ERROR(st);
  if (check) {
    const uint32_t mx = *std::max_element(maxc.begin(), maxc.end());
    if (mx >= static_cast<uint32_t>(g.S)) return check_codes_host(p.attrs, p.codes, p.code_type);
  }
  const int64_t outputs = p.rows * g.N;
  const bool finite = p.dtype == DType::kFloat16 ? simd::all_finite(static_cast<const uint16_t*>(p.y), outputs)
                                                 : simd::all_finite(static_cast<const float*>(p.y), outputs);
  if (!finite) recompute_non_finite(p, g, in);
  return Status::OK();
}

}  // namespace codebook
}  // namespace qcompile
