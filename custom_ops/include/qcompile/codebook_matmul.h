// qcompile.CodebookMatMul kernels (AQLM additive codebooks, see docs/ops.md):
//   W[n, g*d + j] = scales[n] * sum_m codebooks[m, codes[n, g, m], j],   Y = X @ W^T (+ bias).
// Independent of ONNX Runtime so the ORT adapter and a TensorRT plugin share them.
#pragma once
#include <cstdint>
#include <vector>

#include "qcompile/accuracy_level.h"
#include "qcompile/dtype.h"
#include "qcompile/huge_pages.h"
#include "qcompile/parallel.h"
#include "qcompile/status.h"

namespace qcompile {
namespace codebook {

enum class CodeType { kUint8 = 0, kUint16 = 1 };

struct Attrs {
  int64_t K = 0;              // input features (X last dim), a multiple of in_group_size
  int64_t N = 0;              // output features
  int64_t num_codebooks = 0;  // M: codewords summed per group (1..16)
  int64_t codebook_size = 0;  // S: codewords per codebook (1..65536)
  int64_t in_group_size = 0;  // d: consecutive inputs per codeword (1..32)
  int64_t accuracy_level = 0; // 0..4 (qcompile/accuracy_level.h); 1: fp32 tables; 4: int8 tables on CPU
};

// The code dtype the op requires: uint8 when S <= 256, else uint16.
inline CodeType required_code_type(int64_t codebook_size) {
  return codebook_size <= 256 ? CodeType::kUint8 : CodeType::kUint16;
}

Status validate_attrs(const Attrs& a);

// Shape rules for one call. bias null = absent. On success *rows = product of X's leading dims.
Status validate_shapes(const Attrs& a, const std::vector<int64_t>& x, const std::vector<int64_t>& codes,
                       const std::vector<int64_t>& codebooks, const std::vector<int64_t>& scales,
                       const std::vector<int64_t>* bias, int64_t* rows);

// Constant codes prepared once (at session creation) by prepare_constant_codes for the CPU kernel.
// `sliced`, when not empty, holds the codes in the order the batch-1 lookup walk reads them: output rows
// in blocks of `block_rows`, block b at byte offset b * block_rows * T16, where T16 = (K/d*M) / 16 * 16
// (only the first T16 codes of a row are there; the kernel reads the rest from the original tensor).
// Inside a block, for each slice q of 16 codes (codes[n, 16q .. 16q+15] in the flattened [K/d * M] row):
//  * kRowSlices (the fp32 walk): the block's rows one after another, 16 bytes each;
//  * kTableMajor32 (the fixed-point AVX-512 walk): the rows in groups of 32 (the block padded to a
//    multiple of 32 with code 0), each group as 16 runs, one per code of the slice, of its 32 rows' bytes;
//  * kTableMajor64 (the int8 walk of accuracy_level 4): the same with groups of 64 rows.
enum class WalkLayout { kNone = 0, kRowSlices = 1, kTableMajor32 = 2, kTableMajor64 = 3 };
struct PreparedCodes {
  const void* source = nullptr;  // the codes this was prepared from (used only while the call's match)
  bool checked = false;          // every code of `source` is < codebook_size
  int64_t block_rows = 0;
  WalkLayout layout = WalkLayout::kNone;
  std::vector<uint8_t, HugePageAllocator<uint8_t>> sliced;  // streamed every call: on huge pages
};

// One call's operands; all pointers are in the kernel's device memory. fp16 values are raw bits.
struct Problem {
  Attrs attrs;
  int64_t rows = 0;                      // rows of X (leading dims flattened)
  DType dtype = DType::kFloat32;         // X, bias and Y
  const void* x = nullptr;               // [rows, K]
  const void* codes = nullptr;           // [N, K/d, M] of code_type
  CodeType code_type = CodeType::kUint8;
  const uint16_t* codebooks = nullptr;   // [M, S, d] fp16
  const void* scales = nullptr;          // [N] of scale_type
  DType scale_type = DType::kFloat16;
  const void* bias = nullptr;            // [N] of dtype, or null
  void* y = nullptr;                     // [rows, N]
  const PreparedCodes* prepared = nullptr;  // CPU: used when prepared->source == codes, else ignored
};

// CPU kernel. Every code is checked against S: indices are clamped before any read (never out of
// bounds) and a code >= S makes the call fail with an error naming it. Picks the lookup-table GEMV for a
// few rows and decode + blocked GEMM otherwise.
Status matmul_cpu(const Problem& p, const Parallel& parallel);

// Host-side check of every code (for adapters that validate constant codes once at load time).
Status check_codes_host(const Attrs& a, const void* codes, CodeType code_type);

// For constant codes (host memory, shape [N, K/d, M] of code_type already checked): checks every code
// against S (the error names the first bad one) and, when the CPU batch-1 lookup walk serves this layer,
// copies the codes into its slice order (N * T16 extra bytes). On success out->source = codes.
Status prepare_constant_codes(const Attrs& a, const void* codes, CodeType code_type, PreparedCodes* out);

#if QCOMPILE_WITH_CUDA
// CUDA kernel, enqueued on `stream` (cudaStream_t; null = legacy default). Indices are clamped in the
// kernel (never out of bounds); call check_codes_cuda first to turn a bad code into an error.
Status matmul_cuda(const Problem& p, void* stream);
// Device-side check of every code < S; synchronizes `stream` to read the verdict.
Status check_codes_cuda(const Attrs& a, const void* codes, CodeType code_type, void* stream);
#endif

}  // namespace codebook
}  // namespace qcompile
