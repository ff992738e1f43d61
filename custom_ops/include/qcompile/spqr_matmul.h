// qcompile.SpQRMatMul kernels (docs/ops.md "SpQRMatMul", numpy reference qcompile/reference/spqr.py):
// plain functions over raw pointers, no ONNX Runtime types, so ORT adapters and TensorRT plugins share them.
//
//   stored position p of row n has code c (bits 3|4), group g = p / group_size, row block rb = n / stat_group
//   (ss, sm, zs, zm) = stat_params[rb, 0..3, g] (fp16)
//   scale = sc * ss + sm, zero = zc * zs + zm        (sc, zc: the stat codes of (n, g))
//   W[perm[p], n] = scale * (c - zero);  W[col_indices[o], n] += values[o] for o in row n's CSR range
//   Y = X @ W (+ bias)
// The layout helpers below are __host__ __device__, so the CPU tests exercise the decoding the GPU uses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "qcompile/accuracy_level.h"
#include "qcompile/dtype.h"
#include "qcompile/huge_pages.h"
#include "qcompile/parallel.h"
#include "qcompile/status.h"

#if defined(__CUDACC__)
#define QC_SPQR_HD __host__ __device__ __forceinline__
#else
#define QC_SPQR_HD inline
#endif

namespace qcompile {
namespace spqr {

constexpr int kChunk = 32;  // stored positions per packing chunk

struct Attrs {
  int64_t K = 0, N = 0;
  int bits = 3, group_size = 16, stat_bits = 3, stat_group = 16;
  int accuracy_level = 0;  // 0..4 (qcompile/accuracy_level.h); 4: int8 activations on CPU

  QC_SPQR_HD int64_t groups() const { return (K + group_size - 1) / group_size; }
  QC_SPQR_HD int64_t chunks() const { return (K + kChunk - 1) / kChunk; }
  QC_SPQR_HD int64_t code_words() const { return chunks() * bits; }  // int32 words per packed row
  // int32 words of ONE stat-code bitstream per row (stat_codes holds the scale stream, then the zero stream)
  QC_SPQR_HD int64_t stat_words() const { return (groups() * stat_bits + 31) / 32; }
  QC_SPQR_HD int64_t row_blocks() const { return (N + stat_group - 1) / stat_group; }
};

// Pointers to one weight's packed tensors, all in the memory of the kernel's device.
struct Weights {
  const uint32_t* codes = nullptr;        // [N, code_words]
  const uint32_t* stat_codes = nullptr;   // [N, 2 * stat_words]
  const uint16_t* stat_params = nullptr;  // fp16 bits [row_blocks, 4, G]
  // Index tensors are int16 or int32 each (the flag says which): read them through row_offset / col_at /
  // perm_at. qcompile writes the narrowest type that holds the values (docs/ops.md).
  const void* row_offsets = nullptr;      // [N + 1]
  bool offsets_int16 = false;
  const void* col_indices = nullptr;      // [nnz]
  bool col_int16 = true;
  const uint16_t* values = nullptr;       // fp16 bits [nnz]
  int64_t nnz = 0;
  const void* perm = nullptr;             // [K] or nullptr
  bool perm_int16 = false;
};

// Constant codes prepared once (at session creation) for the CPU kernel's batch-1 loop by
// prepare_constant_codes. Each row is cut into blocks of 8·L stored positions, L = 32 / bits codes per
// 32-bit lane (10 for 3 bits, 8 for 4 bits); a block is 8 lanes, and position 8·i + j of the block is bits
// [bits·i, bits·(i+1)) of lane j. So one 256-bit load holds 8·L codes and every 8 consecutive positions
// are one immediate shift and a mask away (no straddling words, no broadcast). Only whole blocks are
// stored; positions from blocks·8·L on are read from the original codes.
struct PreparedCodes {
  const uint32_t* source = nullptr;       // the codes and stat codes this was prepared from (used only
  const uint32_t* stat_source = nullptr;  // while a call's match)
  int per_lane = 0;                  // L
  int64_t blocks = 0;                // whole blocks per row
  std::vector<uint32_t, HugePageAllocator<uint32_t>> lanes;  // [N, blocks, 8]
  // stat_bits == 3 only: the scale and zero codes in the same lane layout (10 groups per lane, 80 per
  // block, zero padded): [N, 2 (scale, zero), stat_blocks, 8]. Empty otherwise.
  int64_t stat_blocks = 0;
  std::vector<uint32_t, HugePageAllocator<uint32_t>> stat_lanes;
  // On CPUs with AVX-512BW, for 3-bit codes in groups of 16 (stat_bits <= 4, stat_group a multiple of 16):
  // instead of the lanes, the fixed-point walk's layout (kernels/cpu/spqr_lut_i16.h): per 32-row group and
  // group of 16 positions, 8 bytes of pair codes ca | cb << 3 per row and one byte sc | zc << 4.
  std::vector<uint8_t, HugePageAllocator<uint8_t>> pairs;
  // At accuracy_level 4 on CPUs with AVX-512 VNNI (groups of 16, stat_bits <= 4, stat_group a multiple of 16):
  // instead of all the above, the int8 walk's layout (kernels/cpu/spqr_int8.h): rows in blocks of 16, per
  // group a byte per row and 2 positions (codes as nibbles) and a byte per row for the stat codes.
  std::vector<uint8_t, HugePageAllocator<uint8_t>> int8;  // (every prepared layout is on huge pages, huge_pages.h)
};

struct Problem {
  Attrs attrs;
  int64_t M = 0;  // rows of X (leading dims flattened)
  DType dtype = DType::kFloat32;
  const void* x = nullptr;     // [M, K] of dtype
  Weights w;
  const void* bias = nullptr;  // [N] of dtype, or null
  void* y = nullptr;           // [M, N] of dtype
  const PreparedCodes* prepared = nullptr;  // CPU: used when prepared->source == w.codes, else ignored
};

// ---- validation (kernels/common/spqr_validate.cpp) ----
// K, N > 0; bits 3|4; group_size a positive multiple of 16; stat_bits 1..8; stat_group > 0.
Status validate_attrs(const Attrs& a);
// Shapes of one call. `perm`/`bias` null = input absent. On success *M = product of X's leading dims.
Status validate_shapes(const Attrs& a, const std::vector<int64_t>& x, const std::vector<int64_t>& codes,
                       const std::vector<int64_t>& stat_codes, const std::vector<int64_t>& stat_params,
                       const std::vector<int64_t>& row_offsets, const std::vector<int64_t>& col_indices,
                       const std::vector<int64_t>& values, const std::vector<int64_t>* perm,
                       const std::vector<int64_t>* bias, int64_t* M);
// CSR rules (row_offsets[0] == 0, non-decreasing, row_offsets[N] == nnz, 0 <= col < K) and perm being a
// permutation of 0..K-1. Reads host memory: every index once.
Status validate_indices(const Attrs& a, const Weights& w);

// ---- fp16 <-> fp32 (IEEE binary16, round to nearest even; host and device) ----
QC_SPQR_HD float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  union {
    uint32_t u;
    float f;
  } v{bits};
  return v.f;
}

QC_SPQR_HD uint16_t float_to_half(float f) {
  union {
    float f;
    uint32_t u;
  } v{f};
  const uint32_t x = v.u;
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u);  // inf / nan
  if (ax >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65520: overflow
  if (ax < 0x38800000u) {  // subnormal or zero: value * 2^24 rounded to nearest even
    if (ax < 0x33000000u) return sign;
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | (uint16_t)r;
  }
  uint32_t r = (ax >> 13) - (112u << 10);
  const uint32_t rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return sign | (uint16_t)r;
}

// ---- layout decoding ----
// Value i of a `width`-bit LSB-first bitstream that starts at `words` (width <= 8).
QC_SPQR_HD uint32_t bits_at(const uint32_t* words, int64_t i, int width) {
  const int64_t bit = i * width;
  const int64_t wi = bit >> 5;
  const int off = (int)(bit & 31);
  uint32_t v = words[wi] >> off;
  if (off + width > 32) v |= words[wi + 1] << (32 - off);  // a stream always covers its last value
  return v & ((1u << width) - 1u);
}

// Code of stored position p in a row whose packed words start at `row`.
QC_SPQR_HD uint32_t code_at(const uint32_t* row, int64_t p, int bits) { return bits_at(row, p, bits); }

// Scale and zero codes of group g in a row whose stat words start at `row`.
QC_SPQR_HD void stat_codes_at(const Attrs& a, const uint32_t* row, int64_t g, uint32_t* sc, uint32_t* zc) {
  *sc = bits_at(row, g, a.stat_bits);
  *zc = bits_at(row + a.stat_words(), g, a.stat_bits);
}

// Element i of an int16 (narrow) or int32 index tensor.
QC_SPQR_HD int64_t index_at(const void* t, bool narrow, int64_t i) {
  return narrow ? (int64_t)((const int16_t*)t)[i] : (int64_t)((const int32_t*)t)[i];
}
QC_SPQR_HD int64_t col_at(const Weights& w, int64_t o) { return index_at(w.col_indices, w.col_int16, o); }
QC_SPQR_HD int64_t row_offset(const Weights& w, int64_t n) { return index_at(w.row_offsets, w.offsets_int16, n); }
QC_SPQR_HD int64_t perm_at(const Weights& w, int64_t p) { return index_at(w.perm, w.perm_int16, p); }

// ---- kernels ----
// Fills *out from host codes [N, code_words] and stat_codes [N, 2·stat_words] (shapes already checked)
// when the CPU kernel has a use for it (x86 with AVX2, group_size 16); otherwise leaves out->lanes empty.
// Costs N·blocks·32 (+ N·stat_blocks·64) bytes.
Status prepare_constant_codes(const Attrs& a, const uint32_t* codes, const uint32_t* stat_codes,
                              PreparedCodes* out);

// CPU kernel (kernels/cpu/spqr_matmul.cpp). Requires validated attrs, shapes and indices.
Status matmul_cpu(const Problem& p, const Parallel& parallel);

// CUDA kernel (kernels/cuda/spqr_matmul.cu), enqueued on `stream` (a cudaStream_t). Every index it reads
// is clamped or skipped when out of range, so even unvalidated tensors cannot make it read out of bounds.
Status matmul_cuda(const Problem& p, void* stream);
// Copies row_offsets / col_indices / perm from the device and runs validate_indices on them (synchronises
// `stream`; the adapter calls it once per constant weight).
Status validate_indices_cuda(const Attrs& a, const Weights& device_w, void* stream);

}  // namespace spqr
}  // namespace qcompile
