// CodebookMatMul attribute, shape and code rules, shared by the CPU and CUDA adapters (mirrored by
// qcompile/reference/codebook.py:validate). Messages name the input and the expected value.
#include <sstream>

#include "qcompile/codebook_matmul.h"
#include "qcompile/shape_check.h"

namespace qcompile {
namespace codebook {
namespace {


template <typename C>
Status check_codes_typed(const Attrs& a, const C* codes) {
  const int64_t total = a.N * (a.K / a.in_group_size) * a.num_codebooks;
  const uint32_t limit = static_cast<uint32_t>(a.codebook_size);
  for (int64_t i = 0; i < total; ++i) {
    if (static_cast<uint32_t>(codes[i]) >= limit) {
      const int64_t per_row = (a.K / a.in_group_size) * a.num_codebooks;
      std::ostringstream o;
      o << "CodebookMatMul: code " << static_cast<uint32_t>(codes[i]) << " at [" << i / per_row << ", "
        << (i % per_row) / a.num_codebooks << ", " << i % a.num_codebooks << "] is out of range for codebook_size="
        << a.codebook_size;
      return Status::Error(o.str());
    }
  }
  return Status::OK();
}

}  // namespace

Status validate_attrs(const Attrs& a) {
  std::ostringstream o;
  if (a.K <= 0 || a.N <= 0) {
    o << "CodebookMatMul: K and N must be positive, got K=" << a.K << " N=" << a.N;
  } else if (a.K > (int64_t{1} << 31) || a.N > (int64_t{1} << 31)) {
    o << "CodebookMatMul: K/N too large (K=" << a.K << " N=" << a.N << ")";
  } else if (a.num_codebooks < 1 || a.num_codebooks > 16) {
    o << "CodebookMatMul: num_codebooks must be in 1..16, got " << a.num_codebooks;
  } else if (a.codebook_size < 1 || a.codebook_size > 65536) {
    o << "CodebookMatMul: codebook_size must be in 1..65536, got " << a.codebook_size;
  } else if (a.in_group_size < 1 || a.in_group_size > 32) {
    o << "CodebookMatMul: in_group_size must be in 1..32, got " << a.in_group_size;
  } else if (a.K % a.in_group_size != 0) {
    o << "CodebookMatMul: K=" << a.K << " must be a multiple of in_group_size=" << a.in_group_size;
  } else {
    return validate_accuracy_level("CodebookMatMul", a.accuracy_level);
  }
  return Status::Error(o.str());
}

Status validate_shapes(const Attrs& a, const std::vector<int64_t>& x, const std::vector<int64_t>& codes,
                       const std::vector<int64_t>& codebooks, const std::vector<int64_t>& scales,
                       const std::vector<int64_t>* bias, int64_t* rows) {
  QCOMPILE_RETURN_IF_ERROR(validate_attrs(a));
  int64_t m = 0;
  QCOMPILE_RETURN_IF_ERROR(activation_rows("CodebookMatMul", x, a.K, &m));
  std::ostringstream o;
  const int64_t g = a.K / a.in_group_size;
  if (codes.size() != 3 || codes[0] != a.N || codes[1] != g || codes[2] != a.num_codebooks) {
    o << "CodebookMatMul: codes shape must be [N, K/in_group_size, num_codebooks] = [" << a.N << ", " << g << ", "
      << a.num_codebooks << "], got " << shape_str(codes);
    return Status::Error(o.str());
  }
  if (codebooks.size() != 3 || codebooks[0] != a.num_codebooks || codebooks[1] != a.codebook_size ||
      codebooks[2] != a.in_group_size) {
    o << "CodebookMatMul: codebooks shape must be [num_codebooks, codebook_size, in_group_size] = ["
      << a.num_codebooks << ", " << a.codebook_size << ", " << a.in_group_size << "], got " << shape_str(codebooks);
    return Status::Error(o.str());
  }
  if (scales.size() != 1 || scales[0] != a.N) {
    o << "CodebookMatMul: scales shape must be [N] = [" << a.N << "], got " << shape_str(scales);
    return Status::Error(o.str());
  }
  if (bias && (bias->size() != 1 || (*bias)[0] != a.N)) {
    o << "CodebookMatMul: bias shape must be [N] = [" << a.N << "], got " << shape_str(*bias);
    return Status::Error(o.str());
  }
  *rows = m;
  return Status::OK();
}

Status check_codes_host(const Attrs& a, const void* codes, CodeType code_type) {
  if (code_type == CodeType::kUint8) {
    if (a.codebook_size >= 256) return Status::OK();  // every uint8 is a valid index
    return check_codes_typed(a, static_cast<const uint8_t*>(codes));
  }
  if (a.codebook_size >= 65536) return Status::OK();
  return check_codes_typed(a, static_cast<const uint16_t*>(codes));
}

}  // namespace codebook
}  // namespace qcompile
