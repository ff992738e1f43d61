// SpQRMatMul attribute, shape and index rules, shared by the CPU and CUDA adapters (mirrored by
// qcompile/reference/spqr.py:validate_inputs). Every index a kernel reads is checked here first.
#include <sstream>
#include <string>
#include <vector>

#include "qcompile/shape_check.h"
#include "qcompile/spqr_matmul.h"

namespace qcompile {
namespace spqr {
namespace {


Status err(const std::string& m) { return Status::Error("SpQRMatMul: " + m); }

Status expect(const char* name, const std::vector<int64_t>& got, const std::vector<int64_t>& want, const char* how) {
  if (got == want) return Status::OK();
  return err(std::string(name) + " shape must be " + how + " = " + shape_str(want) + ", got " + shape_str(got));
}

// *lo, *hi = the smallest and largest of n indices, 0 included (a plain loop the compiler vectorises).
template <typename T>
void index_range(const T* c, int64_t n, int64_t* lo, int64_t* hi) {
  T mn = 0, mx = 0;
  for (int64_t o = 0; o < n; ++o) {
    mn = c[o] < mn ? c[o] : mn;
    mx = c[o] > mx ? c[o] : mx;
  }
  *lo = mn, *hi = mx;
}

}  // namespace

Status validate_attrs(const Attrs& a) {
  std::ostringstream o;
  if (a.K <= 0 || a.N <= 0) {
    o << "K and N must be positive, got K=" << a.K << " N=" << a.N;
  } else if (a.K > (int64_t{1} << 31) - 1 || a.N > (int64_t{1} << 31) - 2) {
    o << "K and N must be below 2^31 (int32 indices), got K=" << a.K << " N=" << a.N;
  } else if (a.bits != 3 && a.bits != 4) {
    o << "bits must be 3 or 4, got " << a.bits;
  } else if (a.group_size <= 0 || a.group_size % 16 != 0) {
    o << "group_size must be a positive multiple of 16, got " << a.group_size;
  } else if (a.stat_bits < 1 || a.stat_bits > 8) {
    o << "stat_bits must be in 1..8, got " << a.stat_bits;
  } else if (a.stat_group <= 0) {
    o << "stat_group must be positive, got " << a.stat_group;
  } else {
    return validate_accuracy_level("SpQRMatMul", a.accuracy_level);
  }
  return err(o.str());
}

Status validate_shapes(const Attrs& a, const std::vector<int64_t>& x, const std::vector<int64_t>& codes,
                       const std::vector<int64_t>& stat_codes, const std::vector<int64_t>& stat_params,
                       const std::vector<int64_t>& row_offsets, const std::vector<int64_t>& col_indices,
                       const std::vector<int64_t>& values, const std::vector<int64_t>* perm,
                       const std::vector<int64_t>* bias, int64_t* M) {
  QCOMPILE_RETURN_IF_ERROR(validate_attrs(a));
  int64_t m = 0;
  QCOMPILE_RETURN_IF_ERROR(activation_rows("SpQRMatMul", x, a.K, &m));
  QCOMPILE_RETURN_IF_ERROR(expect("codes", codes, {a.N, a.code_words()}, "[N, ceil(K/32)*bits]"));
  QCOMPILE_RETURN_IF_ERROR(expect("stat_codes", stat_codes, {a.N, 2 * a.stat_words()},
                                  "[N, 2*ceil(ceil(K/group_size)*stat_bits/32)]"));
  QCOMPILE_RETURN_IF_ERROR(expect("stat_params", stat_params, {a.row_blocks(), 4, a.groups()},
                                  "[ceil(N/stat_group), 4, ceil(K/group_size)]"));
  QCOMPILE_RETURN_IF_ERROR(expect("row_offsets", row_offsets, {a.N + 1}, "[N+1]"));
  if (col_indices.size() != 1) return err("col_indices must be 1-D, got " + shape_str(col_indices));
  if (values != col_indices)
    return err("values shape " + shape_str(values) + " must equal col_indices shape " + shape_str(col_indices));
  if (perm) QCOMPILE_RETURN_IF_ERROR(expect("perm", *perm, {a.K}, "[K]"));
  if (bias) QCOMPILE_RETURN_IF_ERROR(expect("bias", *bias, {a.N}, "[N]"));
  *M = m;
  return Status::OK();
}

Status validate_indices(const Attrs& a, const Weights& w) {
  const int64_t first = row_offset(w, 0);
  if (first != 0) return err("row_offsets[0] must be 0, got " + std::to_string(first));
  for (int64_t n = 0; n < a.N; ++n) {
    const int64_t lo = row_offset(w, n), hi = row_offset(w, n + 1);
    if (hi < lo)
      return err("row_offsets must be non-decreasing (row " + std::to_string(n) + ": " + std::to_string(lo) + " > " +
                 std::to_string(hi) + ")");
  }
  const int64_t last = row_offset(w, a.N);
  if (last != w.nnz)
    return err("row_offsets[N] = " + std::to_string(last) + " but col_indices/values hold " + std::to_string(w.nnz) +
               " outliers");
  // min/max first (vectorises); the slow path only runs to name the offender
  int64_t lo = 0, hi = 0;
  if (w.col_int16) {
    index_range((const int16_t*)w.col_indices, w.nnz, &lo, &hi);
  } else {
    index_range((const int32_t*)w.col_indices, w.nnz, &lo, &hi);
  }
  if (lo < 0 || hi >= a.K) {
    for (int64_t o = 0; o < w.nnz; ++o) {
      const int64_t c = col_at(w, o);
      if (c < 0 || c >= a.K)
        return err("col_indices[" + std::to_string(o) + "] = " + std::to_string(c) + " is outside [0, K=" +
                   std::to_string(a.K) + ")");
    }
  }
  if (w.perm) {
    std::vector<unsigned char> seen((size_t)a.K, 0);
    for (int64_t p = 0; p < a.K; ++p) {
      const int64_t v = perm_at(w, p);
      if (v < 0 || v >= a.K)
        return err("perm[" + std::to_string(p) + "] = " + std::to_string(v) + " is outside [0, K=" + std::to_string(a.K) +
                   ")");
      if (seen[(size_t)v]++) return err("perm is not a permutation of 0..K-1 (" + std::to_string(v) + " repeats)");
    }
  }
  return Status::OK();
}

}  // namespace spqr
}  // namespace qcompile
