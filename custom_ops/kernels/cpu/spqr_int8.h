// SpQRMatMul at accuracy_level 4, one row of X: the dense part as integer dot products of the codes with
// the activation quantized to int8 (act_quant.h), 16 output rows per AVX-512 VNNI vpdpbusd. Internal to the
// CPU kernel (spqr_matmul.cpp); numerics in docs/ops.md ("int8 activations").
//
// Why: the fp32 walks spend a conversion and an FMA per 8 weights; here one instruction multiplies 64 codes
// (4 positions of 16 rows) with the activation bytes, and a group's statistics are applied once per
// (16 rows, 16 positions), where the bi-level decoding already costs what it costs.
//
// Arithmetic, per row n and group g (16 stored positions, one activation block): with D = Σ code·q (exact in
// int32), X_g = s_g·Σ q and the group's scale and zero,
//   dense[n] += scale · (s_g·D − zero·X_g)  =  Σ_{p∈g} scale·(code − zero)·x̂_p   (exact rearrangement).
#pragma once
#include <cstdint>

#include "qcompile/parallel.h"
#include "qcompile/spqr_matmul.h"
#include "qcompile/status.h"

namespace qcompile {
namespace spqr {
namespace int8_walk {

constexpr int kRows = 16;  // output rows per vector (int32 lanes)
constexpr int kBatch = 4;  // row blocks walked together (64 rows share each activation load)

// Bytes of a row block's codes of one group, then its stat codes: 3.5 bits per weight for 3-bit codes, 4.5
// for 4-bit ones.
constexpr int group_bytes(int bits) { return (bits == 3 ? 64 + 32 : 128) + kRows; }

// AVX-512 VNNI on this CPU and QCOMPILE_SPQR_NO_AVX512 not set.
bool available();

// The layouts this walk serves: groups of 16, stat codes of at most 4 bits, stat_group a multiple of 16 (a
// row block of 16 shares its second-level parameters).
bool supports(const Attrs& a);

// Bytes of the prepared layout: rows in blocks of 16 (padded with code 0), blocks in batches of 4; per batch,
// per group, per block the codes of positions 4i + k (i, k < 4) of rows r < 16, then 16 bytes sc | zc << 4.
// 4-bit codes: 64 bytes whose byte 4r + k holds positions k (low nibble) and 4 + k (high) of row r, 64 more
// for positions 8 + k and 12 + k. 3-bit codes: 64 bytes whose byte 4r + k holds the low two bits of
// positions 4i + k in bits 2i, 2i + 1, then four 64-bit masks i whose bit 4r + k is bit 2 of position 4i + k.
int64_t prepared_bytes(const Attrs& a);

// Fills dst (prepared_bytes(a)) from the packed codes [N, code_words] and stat codes [N, 2 * stat_words].
void pack(const Attrs& a, const uint32_t* codes, const uint32_t* stat_codes, uint8_t* dst);

// y[n] = dense part + outliers (from xhat, original order) + bias for every row, from q [16·G] (the stored-order
// activation quantized; zero padded) and its scales s[G].
Status run(const Attrs& a, const Weights& w, const int8_t* q, const float* s, const float* xhat, const float* bias,
           float* y, const uint8_t* prepared, const Parallel& par);

}  // namespace int8_walk
}  // namespace spqr
}  // namespace qcompile
