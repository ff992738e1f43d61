// The ops' accuracy_level attribute (docs/ops.md, "Conventions"): the least accuracy of the activation-side
// arithmetic a model accepts, on MatMulNBits' scale. 0 (unset), 2 (fp16) and 3 (bf16) keep the default
// kernels, whose fixed-point tables are more accurate than fp16; 1 (fp32) keeps fp32 arithmetic everywhere;
// 4 (int8) lets the CPU kernels quantize activations (or lookup tables) to int8.
#pragma once
#include <cstdint>
#include <string>

#include "qcompile/status.h"

namespace qcompile {

constexpr int64_t kAccuracyFp32 = 1;
constexpr int64_t kAccuracyInt8 = 4;

inline Status validate_accuracy_level(const char* op, int64_t level) {
  if (level >= 0 && level <= 4) return Status::OK();
  return Status::Error(std::string(op) + ": accuracy_level must be in 0..4, got " + std::to_string(level));
}

}  // namespace qcompile
