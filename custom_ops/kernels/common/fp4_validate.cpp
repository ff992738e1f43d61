// FP4MatMul attribute and shape rules, shared by the CPU and CUDA adapters (and mirrored by
// qcompile/reference/fp4.py:validate_fp4_inputs). Messages name the input and the expected shape.
#include <sstream>

#include "qcompile/fp4_matmul.h"
#include "qcompile/shape_check.h"

namespace qcompile {
namespace fp4 {
namespace {

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }


}  // namespace

Status parse_scale_format(const std::string& s, ScaleFormat* out) {
  if (s == "e8m0") {
    *out = ScaleFormat::kE8M0;
  } else if (s == "e4m3") {
    *out = ScaleFormat::kE4M3;
  } else {
    return Status::Error("FP4MatMul: scale_format must be \"e8m0\" or \"e4m3\", got \"" + s + "\"");
  }
  return Status::OK();
}

Status validate_attrs(const Attrs& a) {
  std::ostringstream o;
  if (a.K <= 0 || a.N <= 0) {
    o << "FP4MatMul: K and N must be positive, got K=" << a.K << " N=" << a.N;
  } else if (!is_pow2(a.group_size) || a.group_size < 8 || a.group_size > 256) {
    o << "FP4MatMul: group_size must be a power of two in 8..256, got " << a.group_size;
  } else if (a.hadamard_block != 0 && (!is_pow2(a.hadamard_block) || a.hadamard_block < 2 || a.hadamard_block > 256)) {
    o << "FP4MatMul: hadamard_block must be 0 or a power of two in 2..256, got " << a.hadamard_block;
  } else if (a.hadamard_block != 0 && a.K % a.hadamard_block != 0) {
    o << "FP4MatMul: hadamard_block " << a.hadamard_block << " does not divide K=" << a.K;
  } else if (a.K > (int64_t{1} << 40) || a.N > (int64_t{1} << 40)) {
    o << "FP4MatMul: K/N too large (K=" << a.K << " N=" << a.N << ")";
  } else if (a.scale_format != ScaleFormat::kE8M0 && a.scale_format != ScaleFormat::kE4M3) {
    o << "FP4MatMul: unknown scale_format";
  } else {
    return validate_accuracy_level("FP4MatMul", a.accuracy_level);
  }
  return Status::Error(o.str());
}

Status validate_shapes(const Attrs& a, const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                       const std::vector<int64_t>& scales, const std::vector<int64_t>* tensor_scale,
                       const std::vector<int64_t>* bias, int64_t* M) {
  QCOMPILE_RETURN_IF_ERROR(validate_attrs(a));
  const int64_t kp = padded_k(a.K, a.group_size);
  int64_t m = 0;
  QCOMPILE_RETURN_IF_ERROR(activation_rows("FP4MatMul", x, a.K, &m));
  std::ostringstream o;
  if (w.size() != 2 || w[0] != a.N || w[1] != kp / 2) {
    o << "FP4MatMul: W shape must be [N, Kp/2] = [" << a.N << ", " << kp / 2 << "] (Kp = ceil(K/G)*G = " << kp
      << "), got " << shape_str(w);
    return Status::Error(o.str());
  }
  if (scales.size() != 2 || scales[0] != a.N || scales[1] != kp / a.group_size) {
    o << "FP4MatMul: scales shape must be [N, Kp/G] = [" << a.N << ", " << kp / a.group_size << "], got "
      << shape_str(scales);
    return Status::Error(o.str());
  }
  if (tensor_scale) {
    int64_t n = 1;
    for (int64_t d : *tensor_scale) n *= d;
    if (n != 1) {
      o << "FP4MatMul: tensor_scale must hold exactly 1 element, got shape " << shape_str(*tensor_scale);
      return Status::Error(o.str());
    }
  }
  if (bias && (bias->size() != 1 || (*bias)[0] != a.N)) {
    o << "FP4MatMul: bias shape must be [N] = [" << a.N << "], got " << shape_str(*bias);
    return Status::Error(o.str());
  }
  *M = m;
  return Status::OK();
}

}  // namespace fp4
}  // namespace qcompile
