#include "qcompile/shape_check.h"

#include <sstream>

namespace qcompile {

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

Status activation_rows(const char* op, const std::vector<int64_t>& x, int64_t K, int64_t* rows) {
  const std::string who = std::string(op) + ": X ";
  if (x.empty() || x.back() != K)
    return Status::Error(who + "last dim must be K=" + std::to_string(K) + ", got shape " + shape_str(x));
  int64_t m = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) {
    if (x[i] < 0) return Status::Error(who + "has a negative dim " + shape_str(x));
    if (x[i] != 0 && m > (int64_t{1} << 40) / x[i]) return Status::Error(who + "is too large " + shape_str(x));
    m *= x[i];
  }
  *rows = m;
  return Status::OK();
}

}  // namespace qcompile
