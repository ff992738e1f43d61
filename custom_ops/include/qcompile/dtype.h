// Element types the kernels accept for activations. Values are raw: fp16 is passed as uint16_t bits.
#pragma once
#include <cstddef>

namespace qcompile {

enum class DType { kFloat32 = 0, kFloat16 = 1 };

inline std::size_t dtype_size(DType t) { return t == DType::kFloat16 ? 2 : 4; }
inline const char* dtype_name(DType t) { return t == DType::kFloat16 ? "float16" : "float32"; }

}  // namespace qcompile
