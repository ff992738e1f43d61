// Internals of the CodebookMatMul CPU kernel shared by its files: codebook_matmul.cpp (plan, portable
// kernels, drivers, dispatch), codebook_matmul_avx2.cpp (AVX2 table build, decode and fused GEMV),
// codebook_byte_walk.cpp (the batch-1 walk over byte codes) and codebook_lut_i16.cpp (its AVX-512BW
// fixed-point form). Not part of the kernel API (include/qcompile/codebook_matmul.h).
#pragma once

#include <cstdint>
#include <vector>

#include "qcompile/codebook_matmul.h"
#include "qcompile/cpu_features.h"
#include "qcompile/parallel.h"
#include "qcompile/status.h"

namespace qcompile {
namespace codebook {
namespace detail {

constexpr const char* kOp = "CodebookMatMul";  // error messages
constexpr int64_t kNR = 16;               // output channels per GEMM tile (decoded once, reused by all rows)
// Bytes of the fixed-point walks' codes prefetched into L2 while the call builds its tables: what DRAM delivers
// in about the build's time (K = 4096: ~0.03 ms), well inside a 1 MB L2.
constexpr int64_t kBuildPrefetchBytes = 384 * 1024;
constexpr int64_t kLutRowsPerTask = 512;  // byte walk: output rows per task (the table streams once per task)

// Per-thread scratch that survives across calls (ORT pool threads persist), so tasks do not page-fault
// fresh allocations every call.
template <typename T, typename Alloc>
T* scratch(std::vector<T, Alloc>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

struct Geometry {
  int64_t K, N, G, M, S, d;
  int64_t T;   // G*M: codes per output row
  int64_t LS;  // LUT row stride: S rounded up to 8
};

Geometry geometry(const Attrs& a);

// ---- the byte walk (codebook_byte_walk.cpp) --------------------------------------------------------------

// acc[n - n0] += sum_t lut[t][codes[n, t]] for rows [n0, n1): byte codes (row stride T) into 256-entry
// tables. blk: this block's codes prepared in slice order (PreparedCodes::kRowSlices), or null to read the
// file-order codes.
void lut_rows_u8(const uint8_t* codes, const uint8_t* blk, const float* lut, int64_t T, int64_t n0, int64_t n1,
                 float* acc);
// Tables T16..T-1 (fewer than a slice of 16) for rows n0..n1-1, from the file-order codes.
void lut_rows_u8_tail(const uint8_t* codes, const float* lut, int64_t T, int64_t T16, int64_t n0, int64_t n1,
                      float* acc);

// ---- prefill with outer products (d == 8) --------------------------------------

constexpr int64_t kOuterRows = 12;  // W rows per task (two 6-row AVX2 or one 12-row AVX-512 microkernel call)
constexpr int64_t kOuterKC = 256;   // K slice of the decoded tile (whole groups)
constexpr int64_t kXtLd = 16;       // rows of X per block of the transposed activations

// X [rows, Kp] (row stride Kp) -> blocks of 16 rows stored k-major, [ceil(rows/16)][Kp][16], zero padded.
void pack_xt(const float* x, int64_t rows, int64_t Kp, float* xt);

#if QC_X86
// lut_rows_u8 with BMI2 byte extraction and FMA-pipe adds.
QC_AVX2_BMI2 void lut_rows_u8_avx2(const uint8_t* codes, const uint8_t* blk, const float* lut, int64_t T,
                                   int64_t n0, int64_t n1, float* acc);

// ---- AVX2 kernels (codebook_matmul_avx2.cpp) --------------------------------------------------------------

// lut[(g*M + m)*LS + s] = sum_j x[g*d + j] * C[m][s][j] for groups [g0, g1); cbt: codeword-transposed books.
QC_AVX2 void lut_build_avx2(const float* x, const float* cbt, const Geometry& g, int64_t g0, int64_t g1, float* lut);
// The same for tables [t0, t1) (t = g*M + m) into out[(t - t0)*LS + s], and (tmax not null) each table's
// largest |entry| into tmax[t - t0].
QC_AVX2 void lut_build_tables_avx2(const float* x, const float* cbt, const Geometry& g, int64_t t0, int64_t t1,
                                   float* out, float* tmax);

// d == 8: output channels [n0, n0 + nb) decoded into the row-major tile wt [kNR][Kp] (rows past nb zero).
// kCheck: codes are clamped for the read and the largest is recorded in *maxc.
template <typename C, bool kCheck>
QC_AVX2 void decode_tile_avx2_d8(const C* codes, const float* cb, const Geometry& g, int64_t n0, int64_t nb,
                                 int64_t Kp, float* wt, uint32_t* maxc);


// y[r, n] = scales[n] * dot(x row r, sum of row n's codewords) (+ bias[n]) for every row of X, from xt
// (pack_xt, Mpad = rows rounded up to 16): tiles of 12 W rows decoded a K slice at a time and multiplied by
// 6 x 16 outer products. kCheck: codes clamped and the largest per task recorded in maxc[task].
template <typename C, bool kCheck>
Status run_outer_avx2_d8(const C* codes, const float* cb, const Geometry& g, const float* xt, int64_t rows,
                         int64_t Kp, const float* scales, const float* bias, DType dtype, void* y, const Parallel& par,
                         uint32_t* maxc, int64_t accuracy_level);

// d == 8: out[r * (n1 - n0) + n - n0] = dot(x row r, W row n) for R rows of x (stride ldx), rows [n0, n1).
template <typename C, bool kCheck, int R>
QC_AVX2 void fused_rows_avx2_d8(const C* codes, const float* cb, const Geometry& g, const float* x, int64_t ldx,
                                int64_t n0, int64_t n1, float* out, uint32_t* maxc);
#endif  // QC_X86

}  // namespace detail
}  // namespace codebook
}  // namespace qcompile
