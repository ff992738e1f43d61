// qcompile.FP4MatMul kernels (see docs/ops.md): Y = Hadamard_b(X) @ Wdeq^T (+ bias), with
// Wdeq[n, k] = e2m1(code[n, k]) * scale(n, k / G) * tensor_scale. Independent of ONNX Runtime so the ORT
// adapter and a TensorRT plugin share them.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "qcompile/accuracy_level.h"
#include "qcompile/dtype.h"
#include "qcompile/parallel.h"
#include "qcompile/status.h"

namespace qcompile {
namespace fp4 {

enum class ScaleFormat { kE8M0 = 0, kE4M3 = 1 };

struct Attrs {
  int64_t K = 0;               // input features (X last dim)
  int64_t N = 0;               // output features
  int64_t group_size = 0;      // G: weights per scale along K (power of two 8..256)
  ScaleFormat scale_format = ScaleFormat::kE8M0;
  int64_t hadamard_block = 0;  // 0 = none, else power of two 2..256 dividing K
  int64_t accuracy_level = 0;  // 0..4 (qcompile/accuracy_level.h); 4: int8 activations on CPU
};

// Kp = ceil(K/G)*G: K padded to whole groups (W holds Kp/2 bytes per row, scales Kp/G per row).
inline int64_t padded_k(int64_t K, int64_t G) { return (K + G - 1) / G * G; }

// "e8m0" / "e4m3" -> ScaleFormat; error names the accepted values.
Status parse_scale_format(const std::string& s, ScaleFormat* out);

// Attribute rules (K, N > 0; G in {8..256} power of two; hadamard_block 0 or power of two 2..256 | K).
Status validate_attrs(const Attrs& a);

// Shape rules for one call. `tensor_scale` / `bias` null = input absent. On success *M = product of X's
// leading dims (the number of rows; 1 for a 1-D X).
Status validate_shapes(const Attrs& a, const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                       const std::vector<int64_t>& scales, const std::vector<int64_t>* tensor_scale,
                       const std::vector<int64_t>* bias, int64_t* M);

// One call's operands. All pointers are to device memory of the kernel's device, except tensor_scale
// which is always a host value (1.0f when the input is absent). bias may be null.
struct Problem {
  Attrs attrs;
  int64_t M = 0;             // rows of X (all leading dims flattened)
  DType dtype = DType::kFloat32;
  const void* x = nullptr;   // [M, K] of dtype
  const uint8_t* w = nullptr;       // [N, Kp/2]
  const uint8_t* scales = nullptr;  // [N, Kp/G]
  float tensor_scale = 1.0f;
  const void* bias = nullptr;  // [N] of dtype, or null
  void* y = nullptr;           // [M, N] of dtype
  // CUDA, hadamard_block > 1: optional device scratch of at least scratch_bytes(attrs, M) bytes for the
  // rotated activation. Null = the kernel allocates it stream-ordered on every call; runtimes that hand
  // out workspace (TensorRT) pass theirs.
  void* scratch = nullptr;
};

// Scratch the CUDA kernel needs for M rows (0 without a rotation).
inline int64_t scratch_bytes(const Attrs& a, int64_t M) {
  return a.hadamard_block > 1 ? M * a.K * static_cast<int64_t>(sizeof(float)) : 0;
}

// CPU kernel. Requires validated attrs/shapes; never reads outside the documented extents.
Status matmul_cpu(const Problem& p, const Parallel& parallel);

// CUDA kernel, enqueued on `stream` (a cudaStream_t, may be null = legacy default stream). Only present
// when the library was built with CUDA (QCOMPILE_WITH_CUDA).
Status matmul_cuda(const Problem& p, void* stream);

}  // namespace fp4
}  // namespace qcompile
