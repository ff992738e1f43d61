// Internals of the SpQRMatMul CPU kernel shared by its files: spqr_matmul.cpp (activation preparation,
// the portable scalar path, dispatch, prepared layouts), spqr_matmul_avx2.cpp (the AVX2 walks) and
// spqr_lut_i16.cpp (the AVX-512BW fixed-point pair tables and their driver). Not part of the kernel API.
#pragma once

#include <cstdint>

#include "qcompile/cpu_features.h"
#include "qcompile/parallel.h"
#include "qcompile/spqr_matmul.h"
#include "qcompile/status.h"

namespace qcompile {
namespace spqr {
namespace detail {

constexpr const char* kOp = "SpQRMatMul";  // error messages

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Power of two that slot i of the prepared lanes carries (lane_slot): bits·i, except the slot holding bit 31.
inline int slot_exponent(int bits, int i) { return bits * (i + 1) == 32 ? 0 : bits * i; }

struct Call {
  const Attrs* s;
  const Weights* w;
  int64_t M;
  const float* xk;     // [M, Kc] stored order, zero padded
  int64_t Kc;          // chunks * 32
  const float* xorig;  // [M, K] original order (outliers index the original feature)
  const float* xsum;   // [M, Gp] per-group sums of xk, zero padded to Gp = round_up(G, 8)
  int64_t Gp;
  const float* bias;   // [N] fp32 or nullptr
  float* y;            // [M, N]
  const int32_t* inv_perm;  // [K] stored position of each input feature (M > 1 with perm), else nullptr
  const PreparedCodes* prep;  // lane layout of these codes (M == 1 AVX2 path), else nullptr
  const float* xl;            // with prep: xk over whole blocks, slot i scaled by 2^-(bits·i) (lanes_dot_g16)
  // M == 1: xk and xsum are the activations times 1 / dense_scale (a power of two, see
  // scale_down_large_activations); a row's dense part is computed from them and multiplied by dense_scale
  // before the outliers (read from xorig, unscaled) and the bias are added.
  float dense_scale = 1.0f;
  // Row stride of xk when M > 1 (0: Kc). Kc + 16 there: rows a power of two apart (16 KB at K = 4096) put the
  // prefill kernel's six X rows, read side by side, in the same L1 sets.
  int64_t ldx = 0;
  int64_t x_stride() const { return ldx ? ldx : Kc; }
};

// M == 1 walks sum x·code and x over a group before the group's scale shrinks them, so activations far
// below FLT_MAX (|x| > ~1e36) overflow there while the op's result, and the reference's
// dequantize-then-multiply, stay finite. When max |x[0..n)| > 2^64 this scales x by 2^-e so that the
// largest is about 2^64 and returns 2^e (the caller multiplies the dense part back); otherwise, and for a
// non-finite max, it changes nothing and returns 1. Powers of two are exact: results that did not overflow
// are unchanged.
float scale_down_large_activations(float* x, int64_t n);

// fp16 second-level parameters [4, G] of row n's row block.
inline const uint16_t* row_params(const Call& c, int64_t n) {
  return c.w->stat_params + (n / c.s->stat_group) * 4 * c.s->groups();
}

// Scalar statistics of groups [g0, G) of row n into scale/zero.
void stats_scalar(const Call& c, int64_t n, int64_t g0, float* scale, float* zero);

#if QC_X86
// ---- AVX2 walks (spqr_matmul_avx2.cpp) -------------------------------------------------------------------

// M == 1: rows [r0, r1) of Y, one fused decode + dot pass over each packed row (or its prepared lanes).
template <int BITS>
QC_AVX2 void rows_avx2_m1(const Call& c, int64_t r0, int64_t r1);

// M > 1: 12-row panels dequantized slice by slice and multiplied with every row of X (tile::tile_gemm, up to
// eight panels per task).
template <int BITS>
Status run_panels(const Call& c, const Parallel& par);

// Sum of value * x[col] over row n's outliers, for row m of X.
QC_AVX2 float outliers_avx2(const Call& c, int64_t n, int64_t m);
#endif  // QC_X86

}  // namespace detail
}  // namespace spqr
}  // namespace qcompile
