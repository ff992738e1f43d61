// Activations quantized to int8 in blocks of 16 consecutive positions (accuracy_level 4; docs/ops.md,
// "int8 activations"): s_b = max_{i in b} |x_i| / 127 and q_i = clamp(rint(x_i / s_b), -127, 127) in fp32
// (round half to even; s_b = 0 gives q = 0), and the op computes with x̂_i = s_b · q_i. The kernels use q and
// s directly (integer dot products); the other paths multiply with x̂.
#pragma once

#include <cstdint>

namespace qcompile {
namespace act_quant {

constexpr int64_t kBlock = 16;

// q[0..n) and scale[0..n/16) from x[0..n) (n a multiple of 16). Returns false, writing nothing defined, when
// x holds a NaN or an Inf: such a row is used unquantized, so they propagate as in fp32.
bool quantize(const float* x, int64_t n, int8_t* q, float* scale);

// x[i] = x̂_i in place (n a multiple of 16); false, x unchanged, when x is not all finite.
bool round_trip(float* x, int64_t n);

}  // namespace act_quant
}  // namespace qcompile
