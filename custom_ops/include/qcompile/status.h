// Error reporting shared by every kernel: a Status is "ok" or carries one message naming the problem.
// Kernels never throw or abort on bad input; the runtime adapter (ORT, TensorRT) turns a failed Status
// into its own error type.
#pragma once
#include <string>
#include <utility>

namespace qcompile {

class Status {
 public:
  Status() = default;
  static Status OK() { return Status(); }
  static Status Error(std::string message) { return Status(std::move(message), true); }
  bool ok() const { return !failed_; }
  const std::string& message() const { return message_; }

 private:
  Status(std::string m, bool failed) : message_(std::move(m)), failed_(failed) {}
  std::string message_;
  bool failed_ = false;
};

}  // namespace qcompile

// Return early from a function returning Status when `expr` (a Status) failed.
#define QCOMPILE_RETURN_IF_ERROR(expr)          \
  do {                                          \
    ::qcompile::Status _qc_st = (expr);         \
    if (!_qc_st.ok()) return _qc_st;            \
  } while (0)
