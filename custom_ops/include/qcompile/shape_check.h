// Shape checks every op's validator shares: printing a shape, and X's leading dims as a row count.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "qcompile/status.h"

namespace qcompile {

// "[d0, d1, ...]" for error messages.
std::string shape_str(const std::vector<int64_t>& s);

// X must be [..., K]; *rows = the product of its leading dims (no negative dim, at most 2^40 rows).
// Messages start with `op`, e.g. "FP4MatMul: X last dim must be K=576, got shape [2, 7, 512]".
Status activation_rows(const char* op, const std::vector<int64_t>& x, int64_t K, int64_t* rows);

}  // namespace qcompile
