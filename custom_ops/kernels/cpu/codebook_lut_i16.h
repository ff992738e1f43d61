// CodebookMatMul, one X row, byte codes over 256-entry tables: the lookup walk with the table rounded to
// 16-bit fixed point and looked up 32 output rows at a time by AVX-512BW word permutes (vpermi2w), instead
// of one scalar load per code. Internal to the CPU kernel (codebook_matmul.cpp); see docs/ops.md.
//
// Numerics: per slice s of 16 consecutive tables (lut[16s .. 16s+15], 8 groups of aqlm-2x8) every entry is
// rounded to the nearest multiple of step_s = max_s / kLutI16Max (max_s = the slice's largest |entry|), so
// each looked-up value is off by at most step_s / 2. Pairs of tables are summed in int16 and everything
// else exactly in int32, then each slice's integer sum is scaled by step_s in fp32. A row's error is
// therefore at most sum_s 8 * step_s (plus fp32 rounding of the slice sums); the RMS error on the tests'
// random cases is below 2e-4 of |y| RMS (asserted), under the rounding of an fp16 output.
#pragma once
#include <cstdint>

namespace qcompile {
namespace codebook {
namespace lut_i16 {

constexpr int kRowGroup = 32;        // output rows per permute (32 int16 lanes)
constexpr int kTablesPerSlice = 16;  // tables sharing one fixed-point step
constexpr float kLutI16Max = 16383.0f;  // |entry| bound: two entries add without int16 overflow

// AVX-512F + BW on this CPU (and OS), and QCOMPILE_CODEBOOK_LUT_FP32 not set.
bool available();

// Bytes of the walk's code layout for R rows of one block and T16 codes per row (rows padded to 32).
int64_t block_bytes(int64_t R, int64_t T16);

// Copies codes[n0 .. n0+R-1][0 .. T16-1] (row stride T) into the walk's layout at dst: for each slice q
// of 16 codes, for each group of 32 rows, the 16 codes of the slice as 16 runs of 32 rows' bytes (rows
// past R are code 0 and never read back).
void pack_block(const uint8_t* codes, int64_t T, int64_t T16, int64_t n0, int64_t R, uint8_t* dst);

// Rounds one slice of the fp32 table (16 tables of 256 finite entries, `tables`; tmax: each table's largest
// |entry|) to fixed point: q gets its 4096 integers, *step the slice's step.
void quantize_slice(const float* tables, const float* tmax, int16_t* q, float* step);

// acc[r] += sum over the first `slices` slices of the row's table entries, for the RG = ceil(R/32) row
// groups of one block packed by pack_block (acc holds RG * 32 floats).
void walk_block(const uint8_t* blk, const int16_t* q, const float* step, int64_t slices, int64_t R, float* acc);

}  // namespace lut_i16
}  // namespace codebook
}  // namespace qcompile
