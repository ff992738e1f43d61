// SpQRMatMul, one X row, 3-bit codes in groups of 16: the dense part as lookups in 16-bit fixed-point
// tables of code pairs, 32 output rows per AVX-512BW word permute (vpermi2w). Internal to the CPU kernel
// (spqr_matmul.cpp); the numerics are in docs/ops.md ("Fixed-point pair tables").
//
// Why: the fp32 walk spends a mask, a conversion and an FMA per 8 weights on the FP pipes and was bound by
// them. A pair of 3-bit codes has 64 values, so the table T_p[ca + 8·cb] = (ca-4)·x_a + (cb-4)·x_b of
// positions (a, b) = (2p, 2p+1) fits two zmm registers and one permute serves 64 weights of 32 rows.
//
// Numerics: per group g the 8 pair tables are rounded to multiples of step_g = bound_g / kPairMax with
// bound_g = max over the group's pairs of 4·(|x_a| + |x_b|) (>= every |entry|); each looked-up entry is off
// by at most step_g / 2, the 8 pairs of a group add exactly in int16, and the group's sum D is scaled by
// step_g in fp32. Then y[n] = sum_g scale[n,g] · (D[n,g] - (zero[n,g] - 4) · xsum_g) + outliers + bias, so
// the dense part of row n is off by at most sum_g |scale[n,g]| · 4 · step_g.
#pragma once
#include <cstdint>

#include "qcompile/parallel.h"
#include "qcompile/spqr_matmul.h"
#include "qcompile/status.h"

namespace qcompile {
namespace spqr {
namespace lut_i16 {

constexpr int kRowGroup = 32;       // output rows per permute (32 int16 lanes)
constexpr int kPairs = 8;           // code pairs per 16-position group
constexpr int kEntries = 64;        // entries per 3-bit pair table
constexpr int64_t kBlockRows = 256; // output rows per task (and per prepared block)
constexpr int kSliceGroups = 8;     // groups whose tables (8 KB) stay in L1 while a block's rows pass
constexpr float kPairMax = 4095.0f; // |entry| bound: a group's 8 entries add without int16 overflow
constexpr int kGroupBytes = kPairs * kRowGroup + kRowGroup;  // a row group's pair codes, then its stat codes

// AVX-512F + BW on this CPU (and OS), and QCOMPILE_SPQR_LUT_FP32 not set.
bool available();

// The layouts this walk serves: 3-bit codes, groups of 16, stat codes of at most 4 bits, stat_group a
// multiple of 16 (each half of a 32-row group shares its second-level parameters).
bool supports(const Attrs& a);

// Bytes of the prepared layout: blocks of kBlockRows rows (the last one partial), rows padded to 32; per
// block, per slice of kSliceGroups groups, per row group of 32, per group: 8 runs (pair p) of the 32 rows'
// pair codes ca | cb << 3, then the 32 rows' stat codes sc | zc << 4.
int64_t prepared_bytes(const Attrs& a);

// Fills dst (prepared_bytes(a)) from the packed codes [N, code_words] and stat codes [N, 2 * stat_words].
void pack(const Attrs& a, const uint32_t* codes, const uint32_t* stat_codes, uint8_t* dst);

// Per call: the pair tables lut [G * 8 * 64] and steps [G] from the stored-order activations xk (at least
// 16·G entries, zero padded). Returns false on a non-finite activation (the caller takes the fp32 walk).
bool build_tables(const float* xk, int64_t G, int16_t* lut, float* step);

// acc[r] = dense part of rows n0 + r, r < R (acc holds round_up(R, 32) floats), for the block starting at
// row n0 (a multiple of kBlockRows). params: fp32 [4, G] = (ss, sm, zs, zm - 4) per row block, for the row
// blocks n0 / stat_group .. (n0 + R - 1) / stat_group of this block, in order.
void walk_block(const Attrs& a, const uint8_t* blk, int64_t n0, int64_t R, const int16_t* lut, const float* step,
                const float* xsum, const float* params, float* acc);

// The whole walk for one row of X (spqr_matmul.cpp calls it when the prepared layout is `pairs`): xk the
// stored-order activations (16·G entries, zero padded) divided by dense_scale, xorig the original-order row
// (outliers), xsum the per-group sums of xk (Gp entries); y[n] = dense part · dense_scale + outliers + bias.
// *ran = false, with nothing written, on a non-finite activation: the caller then takes the fp32 walk,
// which propagates it.
Status run(const Attrs& a, const Weights& w, const float* xk, const float* xorig, const float* xsum, int64_t Gp,
           float dense_scale, const float* bias, float* y, const PreparedCodes& prep, const Parallel& par,
           bool* ran);

}  // namespace lut_i16
}  // namespace spqr
}  // namespace qcompile
