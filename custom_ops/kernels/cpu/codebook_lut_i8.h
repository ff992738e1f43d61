// CodebookMatMul at accuracy_level 4, one X row, byte codes over 256-entry tables: the lookup walk with the
// table rounded to int8, looked up 64 output rows at a time by AVX-512 VBMI byte permutes (vpermi2b).
// Internal to the CPU kernel (codebook_matmul.cpp); numerics in docs/ops.md ("int8 table").
//
// Numerics: per slice s of 16 consecutive tables, with max_s the slice's largest |entry|, each table t gets
// the step max_s / (127 * 2^e_t), e_t the largest of 0..4 with 2^e_t * max_t <= max_s (a table far below
// the slice's largest, e.g. next to an outlier activation, keeps its own precision), and its entries are
// rounded to multiples of it (int8). The integers, in units of max_s / (127 * 16), are summed exactly in
// 16 bits and each slice's sum is scaled by that unit in fp32: a row is off the fp32 table by at most
// |scale| * sum_s sum_t step_t / 2.
#pragma once
#include <cstdint>

namespace qcompile {
namespace codebook {
namespace lut_i8 {

constexpr int kRowGroup = 64;        // output rows per permute (64 byte lanes)
constexpr int kTablesPerSlice = 16;  // tables sharing one step
constexpr float kLutI8Max = 127.0f;
constexpr int kMaxFiner = 4;  // a table's step is at most 2^4 times finer than its slice's

// AVX-512 VBMI on this CPU, and neither QCOMPILE_CODEBOOK_LUT_FP32 nor QCOMPILE_CODEBOOK_NO_INT8 set.
bool available();

// Bytes of the walk's code layout for R rows of one block and T16 codes per row (rows padded to 64).
int64_t block_bytes(int64_t R, int64_t T16);

// Copies codes[n0 .. n0+R-1][0 .. T16-1] (row stride T) into the walk's layout at dst: for each slice q of
// 16 codes, for each group of 64 rows, the 16 codes of the slice as 16 runs of 64 rows' bytes (rows past R
// are code 0 and never read back).
void pack_block(const uint8_t* codes, int64_t T, int64_t T16, int64_t n0, int64_t R, uint8_t* dst);

// Rounds one slice of the fp32 table (16 tables of 256 finite entries, `tables`; tmax: each table's largest
// |entry|) to int8, stored offset by 128 as bytes in q[0..4096); shift[t] = 4 - e_t, *unit the slice's unit.
void quantize_slice(const float* tables, const float* tmax, uint8_t* q, uint8_t* shift, float* unit);

// acc[slot(r)] += sum over the first `slices` slices of row r's entries, for the ceil(R/64) row groups of
// one block packed by pack_block. acc holds round_up(R, 64) floats in walk order: slot(r) = 64 * (r / 64) +
// 32 * (r % 2) + (r % 64) / 2.
void walk_block(const uint8_t* blk, const uint8_t* q, const uint8_t* shift, const float* unit, int64_t slices,
                int64_t R, float* acc);

inline int64_t slot(int64_t r) { return r / kRowGroup * kRowGroup + 32 * (r & 1) + (r % kRowGroup) / 2; }

}  // namespace lut_i8
}  // namespace codebook
}  // namespace qcompile
