// Internals of the FP4MatMul CPU kernel shared by its two files: fp4_matmul.cpp (activation preparation,
// the portable kernels, the tiled prefill driver and the dispatch) and fp4_matmul_avx2.cpp (the AVX2
// decoder, GEMV and outer-product prefill). Not part of the kernel API (include/qcompile/fp4_matmul.h).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "qcompile/cpu_features.h"
#include "qcompile/fp4_matmul.h"
#include "tile_gemm.h"

namespace qcompile {
namespace fp4 {
namespace detail {

constexpr const char* kOp = "FP4MatMul";  // error messages

constexpr int64_t kBlock = 64;   // weights per decode block (32 bytes of W)
constexpr int64_t kTileRows = 16;  // W rows per task in the dot-product M > 1 path (multiple of kNR)
constexpr int64_t kKC = 256;     // K slice of the decoded tile (multiple of kBlock)
constexpr int64_t kTileLd = kKC + 16;  // tile row stride (padded against cache-set aliasing)
constexpr int64_t kMR = 3;       // dot-product microkernel: rows of X
constexpr int64_t kNR = 4;       // dot-product microkernel: rows of W
constexpr int64_t kOuterRows = 12;  // AVX2 outer-product path: W rows per task (multiple of 6)
constexpr int64_t kOuterKC = 256;   // its K slice (multiple of kBlock; 128 and 24 rows measured the same)
constexpr int64_t kOuterLd = kOuterKC + 16;  // its tile row stride
constexpr int64_t kXtLd = 16;      // columns (rows of X) per block of the transposed activations
constexpr int64_t kOuterMinM = 6;  // use the outer-product kernel from this many rows of X

// ---- tables and geometry -------------------------------------------------------------------------------

struct Tables {
  float e2m1[16];
  float e8m0[256];
  float e4m3[256];
  float pair[256][2];      // byte -> (value of low nibble, value of high nibble)
  int perm[kBlock];        // AVX2 decode order: decoded element q of a block is weight k = perm[q]
  uint8_t bf16_top[16];    // E2M1 code -> top byte of its float bits
  uint8_t bf16_second[16]; // E2M1 code -> second byte
  bool perm_ok = false;

  Tables();  // fp4_matmul.cpp
};

const Tables& tables();

// Lane -> group offsets for the two scale vectors of a block, for group size G (< 64; else all 0).
// Returns false if the decode order ever mixes groups inside one lane (it does not; checked anyway).
bool scale_lanes(int64_t G, int idx[2][8]);

struct Geometry {
  int64_t K, N, G, Kp, Kx, ldx, ng, scale_len, row_bytes, nblk;
  int gshift;  // log2(G): group of weight k is k >> gshift (no division in inner loops)
};

Geometry geometry(const Attrs& a);

// ---- helpers of both paths (fp4_matmul.cpp) ------------------------------------------------------------

// Per-row float scales (tensor_scale folded in), zero-padded to scale_len.
void decode_scales(const Problem& p, const Geometry& g, int64_t n, float* out, bool avx2);

// Y[m, n0 .. n0 + count) = vals (+ bias), converted to Y's dtype.
void store_row(const Problem& p, int64_t m, int64_t n0, int64_t count, const float* vals);
// Y[m, n0 + r] = acc[r * ldc + m] (+ bias) for r < count, every m: the prefill path's C^T tile.
void store_transposed(const Problem& p, int64_t n0, int64_t count, const float* acc, int64_t ldc, int64_t m0,
                      int64_t m1);

// Pointer to the 32 bytes of block `blk` of a W row, or to a zero-padded copy for the ragged last block.
inline const uint8_t* block_bytes(const uint8_t* row, const Geometry& g, int64_t blk, uint8_t* pad32) {
  const int64_t off = blk * (kBlock / 2);
  if (off + kBlock / 2 <= g.row_bytes) return row + off;
  std::memset(pad32, 0, kBlock / 2);
  std::memcpy(pad32, row + off, g.row_bytes - off);
  return pad32;
}

struct TaskScratch {
  std::vector<float> scales, tile;
  tile::CacheLineVector<float> out;
};

// The calling thread's scratch, slot `slot` of tile::kMaxTilesPerTask (the tiles of one prefill task are
// alive together; the M = 1 paths use slot 0).
TaskScratch& task_scratch(int slot = 0);
// The calling thread's scratch slot for a tile of `rows` W rows: the decoded scales of rows [n0, n0 + nc), a
// tile of row stride ld and `out` accumulator floats (left as they are: a tile zeroes or overwrites them).
TaskScratch& tile_scratch(const Problem& p, const Geometry& g, bool avx2, int64_t n0, int64_t nc, int64_t rows,
                          int64_t ld, int64_t out, int slot);

#if QC_X86
// ---- the AVX2 path (fp4_matmul_avx2.cpp) ---------------------------------------------------------------

struct Avx2Consts {
  __m256i top, second, low4, hi16;
  __m256i sidx0, sidx1;
};

QC_AVX2 Avx2Consts avx2_consts(int64_t G);

// Scale codes -> floats (times ts) 8 at a time; returns how many were done (the caller finishes the tail).
QC_AVX2 int64_t decode_scales_avx2(const uint8_t* s, int64_t n, ScaleFormat fmt, float ts, float* out);

// fwht for b >= 8, 8 lanes at a time, bit-identical to fwht.
QC_AVX2 void fwht_avx2(float* x, int64_t K, int64_t b);

// 64 activations in natural order -> the decoder's order (Tables::perm).
QC_AVX2 void permute_block_avx2(const float* src, float* dst);

// rows[r][k] (8 rows, stride ld) -> dst[k * kXtLd + r] for k < len (a multiple of 8).
QC_AVX2 void transpose8_store(const float* rows, int64_t ld, int64_t len, float* dst);

// out[n - n0] = dot(W row n, x) for rows [n0, n1) (scales: room for one row's decode_scales).
QC_AVX2 void gemv_rows_avx2(const Problem& p, const Geometry& g, int64_t n0, int64_t n1, const float* x,
                            float* scales, float* out);

// Decodes blocks [b0, b1) of one row, scales applied, into out (permuted order, 64 floats per block).
QC_AVX2 void decode_row_avx2(const uint8_t* row, const float* sc, const Geometry& g, int64_t b0, int64_t b1,
                             const Avx2Consts& c, float* out);

// The prefill path for M >= kOuterMinM: xt is X packed transposed in 16-row blocks ([Mpad/16][Kx][16]).
Status run_outer(const Problem& p, const Geometry& g, const float* xt, int64_t Mpad, const Parallel& par);
#else
struct Avx2Consts {};  // no AVX2 path: only the portable decoder runs
#endif  // QC_X86

// ---- accuracy_level 4, one row (fp4_matmul_int8.cpp) ------------------------------------------------------

// The int8 GEMV serves this layer on this CPU: accuracy_level 4, G >= 16, AVX2 (QCOMPILE_FP4_NO_AVX2 unset;
// the AVX-512 VNNI form unless QCOMPILE_FP4_NO_AVX512 is set).
bool int8_gemv_available(const Attrs& a);

// Y[0, :] from the rotated activation row xrot[0..K): quantized to int8, then integer dot products.
// *ran = false, nothing written, when the row holds a NaN or Inf (the caller then multiplies in fp32).
Status run_gemv_int8(const Problem& p, const Geometry& g, const float* xrot, const Parallel& par, bool* ran);

// Weights [k0, k0 + len) of W rows [n0, n0 + nc), scales applied, into a tile (fp4_matmul.cpp).
void decode_tile(const Problem& p, const Geometry& g, bool avx2, const Avx2Consts& c, int64_t n0, int64_t nc,
                 int64_t rows, const float* scales, int64_t k0, int64_t len, float* tile, int64_t ld);

}  // namespace detail
}  // namespace fp4
}  // namespace qcompile
