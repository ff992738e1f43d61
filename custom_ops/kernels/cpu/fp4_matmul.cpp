// CPU kernel for qcompile.FP4MatMul.
//
// Work plan (both paths read every byte of W exactly once):
//  1. Activations: X rows -> float, Hadamard (in-place fast Walsh-Hadamard on a scratch copy), zero-padded
//     to Kx = round_up(Kp, 64) and, for the AVX2 path, permuted within each 64-block into the order the
//     SIMD decoder produces weights in (a dot product does not care about order, as long as both sides
//     agree), so decoding never has to re-interleave nibbles.
//  2. M == 1 (GEMV): tasks own contiguous row ranges of W; each row is streamed once, decoded 64 weights
//     at a time into 8 float vectors and multiplied with X; the per-group scales (decoded 8 at a time with
//     bit arithmetic) are applied to partial sums, not to every weight.
//  3. M > 1 with AVX2 (M >= 6): X is also packed transposed, in blocks of 16 rows ([Kx][16], once per
//     call). A task owns 12 rows of W; for each K slice of 256 it decodes them (scale applied) into a
//     row-major float tile in L1 and runs a 6x16 outer-product microkernel (12 accumulators, one broadcast
//     per decoded weight, two vector loads of X^T) over every 16-row block of X^T; the next slice's W bytes
//     are prefetched meanwhile. No per-tile transpose is needed, the tile is read as decoded.
//  4. Otherwise (portable path, or M < 6): a task owns 16 rows of W, decodes each K slice into a tile and
//     reuses it for all M rows with a 3x4 dot-product microkernel.
//     Buffer strides are padded so no power-of-two stride aliases cache sets.
//
// SIMD decode (AVX2): E2M1 values are exactly representable in bfloat16, i.e. each one is a float whose
// low 16 bits are zero. Two pshufb lookups per nibble vector give the top and second byte of that float,
// one byte-unpack forms the bf16 pairs, and a shift / mask turns a dword holding two bf16 into two floats.
// The library is compiled for x86-64-v2; the AVX2/FMA/F16C code is selected at run time
// (QCOMPILE_FP4_NO_AVX2=1 forces the portable path, which the tests also exercise).
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "qcompile/cpu_features.h"
#include "qcompile/fp4_matmul.h"
#include "qcompile/half.h"
#include "simd.h"
#include "tile_gemm.h"

namespace qcompile {
namespace fp4 {
namespace {

constexpr int64_t kBlock = 64;   // weights per decode block (32 bytes of W)
constexpr int64_t kTileRows = 16;  // W rows per task in the dot-product M > 1 path (multiple of kNR)
constexpr int64_t kKC = 256;     // K slice of the decoded tile (multiple of kBlock)
constexpr int64_t kTileLd = kKC + 16;  // tile row stride (padded against cache-set aliasing)
constexpr int64_t kMR = 3;       // dot-product microkernel: rows of X
constexpr int64_t kNR = 4;       // dot-product microkernel: rows of W
constexpr int64_t kOuterRows = 12;  // AVX2 outer-product path: W rows per task (multiple of 6)
constexpr int64_t kOuterKC = 256;   // its K slice (multiple of kBlock; 128 and 24 rows measured the same)
constexpr int64_t kOuterLd = kOuterKC + 16;  // its tile row stride
constexpr int64_t kXtLd = 16;      // columns (rows of X) per block of the transposed activations
constexpr int64_t kOuterMinM = 6;  // use the outer-product kernel from this many rows of X

// ---- tables --------------------------------------------------------------------------------------------

struct Tables {
  float e2m1[16];
  float e8m0[256];
  float e4m3[256];
  float pair[256][2];      // byte -> (value of low nibble, value of high nibble)
  int perm[kBlock];        // AVX2 decode order: decoded element q of a block is weight k = perm[q]
  int sidx[2][8];          // AVX2: group offset (in groups) of each lane for vectors 0-3 / 4-7, per G<64
  uint8_t bf16_top[16];    // E2M1 code -> top byte of its float bits
  uint8_t bf16_second[16]; // E2M1 code -> second byte
  bool perm_ok = false;

  Tables() {
    static const float mag[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    for (int c = 0; c < 16; ++c) {
      e2m1[c] = (c & 8) ? -mag[c & 7] : mag[c & 7];
      uint32_t bits;
      std::memcpy(&bits, &e2m1[c], 4);
      bf16_top[c] = static_cast<uint8_t>(bits >> 24);
      bf16_second[c] = static_cast<uint8_t>(bits >> 16);
    }
    for (int b = 0; b < 256; ++b) {
      pair[b][0] = e2m1[b & 15];
      pair[b][1] = e2m1[b >> 4];
      e8m0[b] = b == 255 ? std::nanf("") : std::ldexp(1.0f, b - 127);
      const int sign = b >> 7, e = (b >> 3) & 15, m = b & 7;
      float v;
      if (e == 15 && m == 7) {
        v = std::nanf("");
      } else if (e == 0) {
        v = std::ldexp(static_cast<float>(m), -9);  // m/8 * 2^-6
      } else {
        v = std::ldexp(1.0f + m / 8.0f, e - 7);
      }
      e4m3[b] = sign ? -v : v;
    }
    // Order produced by decode_block_avx2: vector v (0..7), lane e (0..7).
    for (int v = 0; v < 8; ++v) {
      for (int e = 0; e < 8; ++e) {
        const int lane = e >> 2, d = e & 3;
        const int p = 2 * d + (v & 1);                 // 16-bit element within the unpacked half-lane
        const int j = 16 * lane + (v >= 4 ? 8 : 0) + p;  // byte of the 32-byte block
        const bool high = (v & 2) != 0;                // vectors 2,3,6,7 come from the high nibbles
        perm[v * 8 + e] = 2 * j + (high ? 1 : 0);
      }
    }
    perm_ok = true;
    bool seen[kBlock] = {};
    for (int q = 0; q < kBlock; ++q) {
      if (perm[q] < 0 || perm[q] >= kBlock || seen[perm[q]]) perm_ok = false;
      else seen[perm[q]] = true;
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

// Lane -> group offsets for the two scale vectors of a block, for group size G (< 64; else all 0).
// Returns false if the decode order ever mixes groups inside one lane (it does not; checked anyway).
bool scale_lanes(int64_t G, int idx[2][8]) {
  const Tables& t = tables();
  for (int half = 0; half < 2; ++half) {
    for (int e = 0; e < 8; ++e) {
      const int g = G >= kBlock ? 0 : t.perm[(half * 4) * 8 + e] / static_cast<int>(G);
      for (int v = half * 4; v < half * 4 + 4; ++v) {
        const int gv = G >= kBlock ? 0 : t.perm[v * 8 + e] / static_cast<int>(G);
        if (gv != g) return false;
      }
      idx[half][e] = g;
    }
  }
  return true;
}

bool use_avx2() { return tables().perm_ok && avx2_enabled("QCOMPILE_FP4_NO_AVX2"); }

// ---- shared helpers ------------------------------------------------------------------------------------

struct Geometry {
  int64_t K, N, G, Kp, Kx, ldx, ng, scale_len, row_bytes, nblk;
  int gshift;  // log2(G): group of weight k is k >> gshift (no division in inner loops)
};

Geometry geometry(const Attrs& a) {
  Geometry g;
  g.K = a.K;
  g.N = a.N;
  g.G = a.group_size;
  g.Kp = padded_k(a.K, a.group_size);
  g.Kx = (g.Kp + kBlock - 1) / kBlock * kBlock;
  g.ldx = g.Kx + 16;  // row stride of the X buffer: never a power of two (cache-set aliasing)
  g.ng = g.Kp / g.G;
  g.gshift = 0;
  while ((int64_t{1} << g.gshift) < g.G) ++g.gshift;
  g.scale_len = (g.Kx + g.G - 1) / g.G + 8;  // room for the 8-wide scale loads of the last block
  g.row_bytes = g.Kp / 2;
  g.nblk = g.Kx / kBlock;
  return g;
}

#if QC_X86
QC_AVX2 int64_t decode_scales_avx2(const uint8_t* s, int64_t n, ScaleFormat fmt, float ts, float* out);
#endif

// Per-row float scales (tensor_scale folded in), zero-padded to scale_len.
void decode_scales(const Problem& p, const Geometry& g, int64_t n, float* out, bool avx2) {
  const Tables& t = tables();
  const float* lut = p.attrs.scale_format == ScaleFormat::kE8M0 ? t.e8m0 : t.e4m3;
  const uint8_t* s = p.scales + n * g.ng;
  int64_t i = 0;
#if QC_X86
  if (avx2) i = decode_scales_avx2(s, g.ng, p.attrs.scale_format, p.tensor_scale, out);
#endif
  for (; i < g.ng; ++i) out[i] = lut[s[i]] * p.tensor_scale;
  for (i = g.ng; i < g.scale_len; ++i) out[i] = 0.0f;
}

// In-place normalized Walsh-Hadamard transform of each contiguous block of b in x[0..K).
void fwht(float* x, int64_t K, int64_t b) {
  const float norm = 1.0f / std::sqrt(static_cast<float>(b));
  for (int64_t base = 0; base < K; base += b) {
    float* v = x + base;
    for (int64_t h = 1; h < b; h *= 2) {
      for (int64_t i = 0; i < b; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const float a = v[j], c = v[j + h];
          v[j] = a + c;
          v[j + h] = a - c;
        }
      }
    }
    for (int64_t j = 0; j < b; ++j) v[j] *= norm;
  }
}

#if QC_X86
// fwht for b >= 8, 8 lanes at a time: the butterflies of strides 1, 2, 4 inside each vector (lane swap,
// add / subtract, blend), strides >= 8 between vectors. Same operations in the same order as fwht, so the
// results are identical.
QC_AVX2 void fwht_avx2(float* x, int64_t K, int64_t b) {
  const __m256 norm = _mm256_set1_ps(1.0f / std::sqrt(static_cast<float>(b)));
  for (int64_t i = 0; i < K; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i), t;
    t = _mm256_permute_ps(v, 0xB1);  // stride 1: (a0, a1) -> (a0 + a1, a0 - a1)
    v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xAA);
    t = _mm256_permute_ps(v, 0x4E);  // stride 2
    v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xCC);
    t = _mm256_permute2f128_ps(v, v, 1);  // stride 4
    v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xF0);
    _mm256_storeu_ps(x + i, v);
  }
  for (int64_t base = 0; base < K; base += b) {
    float* v = x + base;
    for (int64_t h = 8; h < b; h *= 2)
      for (int64_t i = 0; i < b; i += 2 * h)
        for (int64_t j = i; j < i + h; j += 8) {
          const __m256 a = _mm256_loadu_ps(v + j), c = _mm256_loadu_ps(v + j + h);
          _mm256_storeu_ps(v + j, _mm256_add_ps(a, c));
          _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a, c));
        }
    for (int64_t j = 0; j < b; j += 8) _mm256_storeu_ps(v + j, _mm256_mul_ps(_mm256_loadu_ps(v + j), norm));
  }
}
#endif

void row_to_float(const Problem& p, int64_t m, float* out) {
  const int64_t K = p.attrs.K;
  if (p.dtype == DType::kFloat32) {
    std::memcpy(out, static_cast<const float*>(p.x) + m * K, K * sizeof(float));
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(p.x) + m * K;
  int64_t k = 0;
#if QC_X86
  if (use_avx2()) {
    simd::half_to_float_avx2(h, out, K);
    return;
  }
#endif
  for (; k < K; ++k) out[k] = half_to_float(h[k]);
}

#if QC_X86
// 64 activations in natural order -> the decoder's order (Tables::perm). Decoded vector v holds weights
// base_v + {0, 4, 8, 12, 32, 36, 40, 44}: a 4x4 transpose of the 4-float groups in each 128-bit half.
QC_AVX2 void permute_block_avx2(const float* src, float* dst) {
  for (int half = 0; half < 2; ++half) {
    __m256 y[4];
    for (int j = 0; j < 4; ++j) {
      const float* a = src + 16 * half + 4 * j;
      y[j] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(a)), _mm_loadu_ps(a + 32), 1);
    }
    const __m256 t0 = _mm256_unpacklo_ps(y[0], y[1]), t1 = _mm256_unpackhi_ps(y[0], y[1]);
    const __m256 t2 = _mm256_unpacklo_ps(y[2], y[3]), t3 = _mm256_unpackhi_ps(y[2], y[3]);
    float* d = dst + 32 * half;
    _mm256_storeu_ps(d + 0, _mm256_shuffle_ps(t0, t2, 0x44));   // elements 0 of each group
    _mm256_storeu_ps(d + 16, _mm256_shuffle_ps(t0, t2, 0xEE));  // elements 1
    _mm256_storeu_ps(d + 8, _mm256_shuffle_ps(t1, t3, 0x44));   // elements 2
    _mm256_storeu_ps(d + 24, _mm256_shuffle_ps(t1, t3, 0xEE));  // elements 3
  }
}
#endif

// One activation row: float, rotated, zero-padded to Kx and (AVX2) block-permuted into out[0..Kx).
void prepare_row(const Problem& p, const Geometry& g, bool avx2, int64_t m, float* tmp, float* out) {
  if (m >= p.M) {
    std::fill(out, out + g.Kx, 0.0f);
    return;
  }
  float* row = avx2 ? tmp : out;
  row_to_float(p, m, row);
  std::fill(row + g.K, row + g.Kx, 0.0f);
  if (p.attrs.hadamard_block > 1) {
#if QC_X86
    if (avx2 && p.attrs.hadamard_block >= 8) fwht_avx2(row, g.K, p.attrs.hadamard_block);
    else
#endif
      fwht(row, g.K, p.attrs.hadamard_block);
  }
#if QC_X86
  if (avx2) {
    for (int64_t b = 0; b < g.Kx; b += kBlock) permute_block_avx2(tmp + b, out + b);
  }
#endif
}

#if QC_X86
// rows[r][k] (8 rows, stride ld) -> dst[k * kXtLd + r] for k < len (a multiple of 8): 8x8 transposes.
QC_AVX2 void transpose8_store(const float* rows, int64_t ld, int64_t len, float* dst) {
  for (int64_t k = 0; k < len; k += 8) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows + i * ld + k);
    simd::transpose8(r);
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (k + i) * kXtLd, r[i]);
  }
}
#endif

// Activations for rows [m0, m1) (see prepare_row). Layout: row-major with stride ldx, or, for the AVX2
// prefill path (`transposed`; m0 and m1 multiples of 8), blocks of 16 rows stored k-major: element (m, k)
// at xp[(m / 16) * Kx * 16 + k * 16 + m % 16], written 8 rows at a time through 8x8 transposes.
void prepare_rows(const Problem& p, const Geometry& g, bool avx2, int64_t m0, int64_t m1, float* xp, bool transposed,
                  std::vector<float>& tmp) {
#if QC_X86
  if (transposed) {
    tmp.resize(9 * g.Kx);  // scratch row + 8 prepared rows
    float* rows = tmp.data() + g.Kx;
    for (int64_t m = m0; m < m1; m += 8) {
      for (int64_t r = 0; r < 8; ++r) prepare_row(p, g, true, m + r, tmp.data(), rows + r * g.Kx);
      transpose8_store(rows, g.Kx, g.Kx, xp + (m / kXtLd) * g.Kx * kXtLd + m % kXtLd);
    }
    return;
  }
#endif
  tmp.resize(g.Kx);
  for (int64_t m = m0; m < m1; ++m) {
    float* dst = xp + m * g.ldx;
    std::fill(dst + g.Kx, dst + g.ldx, 0.0f);
    prepare_row(p, g, avx2, m, tmp.data(), dst);
  }
}

void store_row(const Problem& p, int64_t m, int64_t n0, int64_t count, const float* vals) {
  const int64_t N = p.attrs.N;
  if (p.dtype == DType::kFloat32) {
    float* y = static_cast<float*>(p.y) + m * N + n0;
    const float* b = p.bias ? static_cast<const float*>(p.bias) + n0 : nullptr;
    for (int64_t i = 0; i < count; ++i) y[i] = vals[i] + (b ? b[i] : 0.0f);
  } else {
    uint16_t* y = static_cast<uint16_t*>(p.y) + m * N + n0;
    const uint16_t* b = p.bias ? static_cast<const uint16_t*>(p.bias) + n0 : nullptr;
    for (int64_t i = 0; i < count; ++i) y[i] = float_to_half(vals[i] + (b ? half_to_float(b[i]) : 0.0f));
  }
}

// Y[m, n0 + r] = acc[r * ldc + m] (+ bias) for r < count, every m: the prefill path's C^T tile.
void store_transposed(const Problem& p, int64_t n0, int64_t count, const float* acc, int64_t ldc) {
  static_assert(kOuterRows <= kTileRows, "bias buffer");
  const int64_t N = p.attrs.N;
  float bias[kTileRows] = {};
  for (int64_t r = 0; r < count && p.bias; ++r)
    bias[r] = p.dtype == DType::kFloat32 ? static_cast<const float*>(p.bias)[n0 + r]
                                         : half_to_float(static_cast<const uint16_t*>(p.bias)[n0 + r]);
  for (int64_t m = 0; m < p.M; ++m) {
    if (p.dtype == DType::kFloat32) {
      float* y = static_cast<float*>(p.y) + m * N + n0;
      for (int64_t r = 0; r < count; ++r) y[r] = acc[r * ldc + m] + bias[r];
    } else {
      uint16_t* y = static_cast<uint16_t*>(p.y) + m * N + n0;
      for (int64_t r = 0; r < count; ++r) y[r] = float_to_half(acc[r * ldc + m] + bias[r]);
    }
  }
}

// Pointer to the 32 bytes of block `blk` of a W row, or to a zero-padded copy for the ragged last block.
inline const uint8_t* block_bytes(const uint8_t* row, const Geometry& g, int64_t blk, uint8_t* pad32) {
  const int64_t off = blk * (kBlock / 2);
  if (off + kBlock / 2 <= g.row_bytes) return row + off;
  std::memset(pad32, 0, kBlock / 2);
  std::memcpy(pad32, row + off, g.row_bytes - off);
  return pad32;
}

// ---- portable path ---------------------------------------------------------------------------------

float gemv_row_generic(const uint8_t* row, const float* sc, const float* x, const Geometry& g) {
  const Tables& t = tables();
  const int64_t gb = g.G / 2;  // bytes per group
  float acc = 0.0f;
  for (int64_t grp = 0; grp < g.ng; ++grp) {
    const uint8_t* b = row + grp * gb;
    const float* xv = x + grp * g.G;
    float s0 = 0.f, s1 = 0.f;
    for (int64_t j = 0; j < gb; ++j) {
      s0 += t.pair[b[j]][0] * xv[2 * j];
      s1 += t.pair[b[j]][1] * xv[2 * j + 1];
    }
    acc += (s0 + s1) * sc[grp];
  }
  return acc;
}

// Decodes weights [k0, k0+len) of one row (k0, len multiples of 64) with scales applied, natural order.
void decode_row_generic(const uint8_t* row, const float* sc, const Geometry& g, int64_t k0, int64_t len,
                        float* out) {
  const Tables& t = tables();
  for (int64_t k = k0; k < k0 + len; k += 2) {
    if (k >= g.Kp) {
      out[k - k0] = out[k - k0 + 1] = 0.0f;
      continue;
    }
    const uint8_t b = row[k / 2];
    const float s = sc[k >> g.gshift];
    out[k - k0] = t.pair[b][0] * s;
    out[k - k0 + 1] = t.pair[b][1] * s;
  }
}

// ---- AVX2 path -------------------------------------------------------------------------------------------
#if QC_X86

struct Avx2Consts {
  __m256i top, second, low4, hi16;
  __m256i sidx0, sidx1;
};

QC_AVX2 inline Avx2Consts avx2_consts(int64_t G) {
  const Tables& t = tables();
  Avx2Consts c;
  c.top = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.bf16_top)));
  c.second = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.bf16_second)));
  c.low4 = _mm256_set1_epi8(0x0F);
  c.hi16 = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  int idx[2][8];
  scale_lanes(G, idx);
  c.sidx0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx[0]));
  c.sidx1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx[1]));
  return c;
}

// 32 bytes of W -> 64 floats in 8 vectors (order: Tables::perm).
QC_AVX2 inline void decode_block_avx2(const uint8_t* src, const Avx2Consts& c, __m256 f[8]) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i lo = _mm256_and_si256(b, c.low4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), c.low4);
  const __m256i loT = _mm256_shuffle_epi8(c.top, lo), loS = _mm256_shuffle_epi8(c.second, lo);
  const __m256i hiT = _mm256_shuffle_epi8(c.top, hi), hiS = _mm256_shuffle_epi8(c.second, hi);
  const __m256i lo0 = _mm256_unpacklo_epi8(loS, loT), lo1 = _mm256_unpackhi_epi8(loS, loT);
  const __m256i hi0 = _mm256_unpacklo_epi8(hiS, hiT), hi1 = _mm256_unpackhi_epi8(hiS, hiT);
  f[0] = _mm256_castsi256_ps(_mm256_slli_epi32(lo0, 16));
  f[1] = _mm256_castsi256_ps(_mm256_and_si256(lo0, c.hi16));
  f[2] = _mm256_castsi256_ps(_mm256_slli_epi32(hi0, 16));
  f[3] = _mm256_castsi256_ps(_mm256_and_si256(hi0, c.hi16));
  f[4] = _mm256_castsi256_ps(_mm256_slli_epi32(lo1, 16));
  f[5] = _mm256_castsi256_ps(_mm256_and_si256(lo1, c.hi16));
  f[6] = _mm256_castsi256_ps(_mm256_slli_epi32(hi1, 16));
  f[7] = _mm256_castsi256_ps(_mm256_and_si256(hi1, c.hi16));
}

QC_AVX2 inline void block_scales(const float* sc, const Geometry& g, int64_t blk, const Avx2Consts& c, __m256& s0,
                                 __m256& s1) {
  const __m256 raw = _mm256_loadu_ps(sc + ((blk * kBlock) >> g.gshift));
  s0 = _mm256_permutevar8x32_ps(raw, c.sidx0);
  s1 = _mm256_permutevar8x32_ps(raw, c.sidx1);
}

// Scale codes -> floats (times ts) 8 at a time with bit arithmetic instead of the table; returns how many
// were done (the caller finishes the tail with the table). Exact: same values as Tables::e8m0 / e4m3.
QC_AVX2 int64_t decode_scales_avx2(const uint8_t* s, int64_t n, ScaleFormat fmt, float ts, float* out) {
  const __m256 vts = _mm256_set1_ps(ts);
  int64_t i = 0;
  if (fmt == ScaleFormat::kE8M0) {
    // 2^(s-127) is the float with exponent field s; s = 0 is the subnormal 2^-127, s = 255 NaN.
    const __m256i zero = _mm256_setzero_si256(), ff = _mm256_set1_epi32(255);
    const __m256i sub = _mm256_set1_epi32(0x00400000), nan = _mm256_set1_epi32(0x7FC00000);
    for (; i + 8 <= n; i += 8) {
      const __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + i)));
      __m256i bits = _mm256_slli_epi32(u, 23);
      bits = _mm256_blendv_epi8(bits, sub, _mm256_cmpeq_epi32(u, zero));
      bits = _mm256_blendv_epi8(bits, nan, _mm256_cmpeq_epi32(u, ff));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_castsi256_ps(bits), vts));
    }
  } else {
    // E4M3 |code| = eeee mmm: normal (e > 0) -> float exponent e + 120, mantissa m << 20;
    // subnormal (e = 0) -> m * 2^-9 (computed in floats: no subnormal intermediates); 0x7F -> NaN.
    const __m256i m7f = _mm256_set1_epi32(0x7F);
    const __m256i bias = _mm256_set1_epi32(120 << 23), nan = _mm256_set1_epi32(0x7FC00000);
    const __m256 sub_unit = _mm256_set1_ps(1.0f / 512.0f);
    for (; i + 8 <= n; i += 8) {
      const __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + i)));
      const __m256i mag = _mm256_and_si256(u, m7f);
      const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(mag, 20), bias);
      const __m256i subn = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(mag), sub_unit));
      __m256i bits = _mm256_blendv_epi8(normal, subn, _mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag));
      bits = _mm256_blendv_epi8(bits, nan, _mm256_cmpeq_epi32(mag, m7f));
      bits = _mm256_or_si256(bits, _mm256_slli_epi32(_mm256_srli_epi32(u, 7), 31));  // sign
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_castsi256_ps(bits), vts));
    }
  }
  return i;
}

// Dot product of one W row with x over whole blocks [b0, b1); block blk's bytes are at src + 32 * (blk - b0).
// kOneScale: G >= 32, so both halves of a block share one scale vector (lane 0: group g, lane 1: g or g+1)
// and the block needs a single permute and a single scaled accumulate.
// (Measured: interleaving 2 or 4 rows per pass to share the x loads was slower with cold caches: one
// sequential W stream prefetches better than several.)
template <bool kOneScale>
QC_AVX2 __attribute__((always_inline)) inline void gemv_blocks_avx2(const uint8_t* src, const float* sc,
                                                                    const float* x, int gshift, int64_t b0,
                                                                    int64_t b1, const Avx2Consts& c, __m256& acc0,
                                                                    __m256& acc1) {
  const Avx2Consts k = c;  // local copy: lets the compiler keep the constants in registers
  for (int64_t blk = b0; blk < b1; ++blk) {
    const float* xv = x + blk * kBlock;
    // 1 KB ahead in the W stream (measured 2-4% faster than leaving it to the hardware prefetcher; a
    // prefetch past the end of W is harmless: it never faults and nothing is read from it)
    _mm_prefetch(reinterpret_cast<const char*>(src + (blk - b0) * (kBlock / 2) + 1024), _MM_HINT_T0);
    __m256 f[8];
    decode_block_avx2(src + (blk - b0) * (kBlock / 2), k, f);
    __m256 t0 = _mm256_mul_ps(f[0], _mm256_loadu_ps(xv));
    __m256 t1 = _mm256_mul_ps(f[4], _mm256_loadu_ps(xv + 32));
    t0 = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xv + 8), t0);
    t1 = _mm256_fmadd_ps(f[5], _mm256_loadu_ps(xv + 40), t1);
    t0 = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xv + 16), t0);
    t1 = _mm256_fmadd_ps(f[6], _mm256_loadu_ps(xv + 48), t1);
    t0 = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xv + 24), t0);
    t1 = _mm256_fmadd_ps(f[7], _mm256_loadu_ps(xv + 56), t1);
    const __m256 raw = _mm256_loadu_ps(sc + ((blk * kBlock) >> gshift));
    if (kOneScale) {
      acc0 = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_permutevar8x32_ps(raw, k.sidx0), acc0);
    } else {
      acc0 = _mm256_fmadd_ps(t0, _mm256_permutevar8x32_ps(raw, k.sidx0), acc0);
      acc1 = _mm256_fmadd_ps(t1, _mm256_permutevar8x32_ps(raw, k.sidx1), acc1);
    }
  }
}

// dot(W row, x). Whole blocks are read in place; only the ragged last block (Kp not a multiple of 64) goes
// through a zero-padded copy, so the hot loop has no bounds check.
template <bool kOneScale>
QC_AVX2 float gemv_row_avx2(const uint8_t* row, const float* sc, const float* x, const Geometry& g,
                            const Avx2Consts& c) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const int64_t full = g.row_bytes / (kBlock / 2);
  gemv_blocks_avx2<kOneScale>(row, sc, x, g.gshift, 0, full, c, acc0, acc1);
  if (full < g.nblk) {  // at most one ragged block
    alignas(32) uint8_t pad[kBlock / 2];
    const uint8_t* tail = block_bytes(row, g, full, pad);
    gemv_blocks_avx2<kOneScale>(tail, sc, x, g.gshift, full, full + 1, c, acc0, acc1);
  }
  return simd::hsum(_mm256_add_ps(acc0, acc1));
}

// Decodes blocks [b0, b1) of one row, scales applied, into out (permuted order, 64 floats per block).
QC_AVX2 void decode_row_avx2(const uint8_t* row, const float* sc, const Geometry& g, int64_t b0, int64_t b1,
                             const Avx2Consts& c, float* out) {
  alignas(32) uint8_t pad[kBlock / 2];
  __m256 f[8];
  for (int64_t blk = b0; blk < b1; ++blk, out += kBlock) {
    decode_block_avx2(block_bytes(row, g, blk, pad), c, f);
    __m256 s0, s1;
    block_scales(sc, g, blk, c, s0, s1);
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + 8 * v, _mm256_mul_ps(f[v], s0));
    for (int v = 4; v < 8; ++v) _mm256_storeu_ps(out + 8 * v, _mm256_mul_ps(f[v], s1));
  }
}

#else
struct Avx2Consts {};  // no AVX2 path: only the portable decoder runs
#endif  // QC_X86

// ---- drivers ---------------------------------------------------------------------------------------

constexpr const char* kOp = "FP4MatMul";

struct TaskScratch {
  std::vector<float> scales, tile, out;
};

TaskScratch& task_scratch() {
  thread_local TaskScratch s;
  return s;
}

// The calling thread's scratch for a tile of `rows` W rows: the decoded scales of rows [n0, n0 + nc), a tile
// of row stride ld and `out` accumulator floats (left as they are: a tile zeroes or overwrites them).
TaskScratch& tile_scratch(const Problem& p, const Geometry& g, bool avx2, int64_t n0, int64_t nc, int64_t rows,
                          int64_t ld, int64_t out) {
  TaskScratch& s = task_scratch();
  s.scales.resize(rows * g.scale_len);
  s.tile.resize(rows * ld);
  s.out.resize(out);
  for (int64_t r = 0; r < nc; ++r) decode_scales(p, g, n0 + r, s.scales.data() + r * g.scale_len, avx2);
  return s;
}

Status run_gemv(const Problem& p, const Geometry& g, bool avx2, const float* x, const Parallel& par) {
  // ~64K weights per task, but at least 16 tasks when N allows (load balance on many-core machines)
  const int64_t rows_per_task = std::max<int64_t>(1, std::min(65536 / g.Kx, (g.N + 15) / 16));
  const int64_t tasks = (g.N + rows_per_task - 1) / rows_per_task;
  return tile::run_tasks(par, tasks, kOp, [&](int64_t task) {
    TaskScratch& s = task_scratch();
    s.scales.resize(g.scale_len);
    const int64_t n0 = static_cast<int64_t>(task) * rows_per_task;
    const int64_t n1 = std::min(g.N, n0 + rows_per_task);
    s.out.resize(n1 - n0);
#if QC_X86
    if (avx2) {
      const Avx2Consts c = avx2_consts(g.G);
      for (int64_t n = n0; n < n1; ++n) {
        decode_scales(p, g, n, s.scales.data(), true);
        const uint8_t* row = p.w + n * g.row_bytes;
        s.out[n - n0] = g.G >= 32 ? gemv_row_avx2<true>(row, s.scales.data(), x, g, c)
                                  : gemv_row_avx2<false>(row, s.scales.data(), x, g, c);
      }
      store_row(p, 0, n0, n1 - n0, s.out.data());
      return;
    }
#endif
    for (int64_t n = n0; n < n1; ++n) {
      decode_scales(p, g, n, s.scales.data(), false);
      s.out[n - n0] = gemv_row_generic(p.w + n * g.row_bytes, s.scales.data(), x, g);
    }
    store_row(p, 0, n0, n1 - n0, s.out.data());
  });
}

// Weights [k0, k0 + len) of W rows [n0, n0 + nc), scales applied (`scales`: a row's decode_scales every
// scale_len floats), into the first `rows` rows of a tile with row stride ld; rows past nc are zero.
void decode_tile(const Problem& p, const Geometry& g, bool avx2, const Avx2Consts& c, int64_t n0, int64_t nc,
                 int64_t rows, const float* scales, int64_t k0, int64_t len, float* tile, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = tile + r * ld;
    if (r >= nc) {
      std::fill(dst, dst + len, 0.0f);
      continue;
    }
    const uint8_t* row = p.w + (n0 + r) * g.row_bytes;
    const float* sc = scales + r * g.scale_len;
#if QC_X86
    if (avx2) {
      decode_row_avx2(row, sc, g, k0 / kBlock, (k0 + len) / kBlock, c, dst);
      continue;
    }
#endif
    decode_row_generic(row, sc, g, k0, len, dst);
  }
}

// M > 1 (portable, or AVX2 below kOuterMinM rows): tiles of 16 W rows. Per K slice the tile's rows are
// decoded (scales applied) into a row-major tile, then 3x4 dot-product microkernels run every block of 3
// X rows against it, accumulating into the tile's own [Mpad, 16] buffer.
Status run_tiled(const Problem& p, const Geometry& g, bool avx2, const float* x, int64_t Mpad,
                 const Parallel& par) {
  Avx2Consts consts;
#if QC_X86
  if (avx2) consts = avx2_consts(g.G);
#endif
  struct Tile {
    const Problem& p;
    const Geometry& g;
    bool avx2;
    const float* x;
    int64_t Mpad, n0, nc;
    TaskScratch& s;
    const Avx2Consts& c;
    void decode(int64_t k0, int64_t len) {
      decode_tile(p, g, avx2, c, n0, nc, kTileRows, s.scales.data(), k0, len, s.tile.data(), kTileLd);
    }
    void multiply(int64_t k0, int64_t len) {
      for (int64_t m = 0; m < Mpad; m += kMR)
        for (int64_t r = 0; r < nc; r += kNR) {
          const float* xs = x + m * g.ldx + k0;
          const float* ws = s.tile.data() + r * kTileLd;
          float* cs = s.out.data() + m * kTileRows + r;
#if QC_X86
          if (avx2) {
            tile::dot_rx4_avx2<kMR, true>(xs, g.ldx, ws, kTileLd, len, cs, kTileRows);
            continue;
          }
#endif
          tile::dot_rx4<kMR, true>(xs, g.ldx, ws, kTileLd, len, cs, kTileRows);
        }
    }
    void finish() {
      for (int64_t m = 0; m < p.M; ++m) store_row(p, m, n0, nc, s.out.data() + m * kTileRows);
    }
  };
  return tile::tile_gemm(par, kOp, tile::Plan{g.N, kTileRows, kTileRows, g.Kx, kKC}, [&](int64_t n0, int64_t nc) {
    TaskScratch& s = tile_scratch(p, g, avx2, n0, nc, kTileRows, kTileLd, Mpad * kTileRows);
    std::fill(s.out.begin(), s.out.end(), 0.0f);
    return Tile{p, g, avx2, x, Mpad, n0, nc, s, consts};
  });
}

#if QC_X86
// Prefetches the bytes of W rows [r0, r1) that hold weights [k0, k0 + len): the decoder reads 12 rows
// 2 KB apart 128 bytes at a time, a pattern the hardware prefetcher does not follow far enough ahead.
inline void prefetch_rows(const Problem& p, const Geometry& g, int64_t r0, int64_t r1, int64_t k0, int64_t len) {
  const int64_t b0 = k0 / 2, b1 = std::min(g.row_bytes, (k0 + len) / 2);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = b0; b < b1; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p.w + r * g.row_bytes + b), _MM_HINT_T0);
}

// C^T[12][Mpad] (+)= a 12-row decoded tile times every 16-row block of the transposed activations: 6x16
// (or 6x8 for a last block of 8) outer products, one broadcast per decoded weight.
QC_AVX2 void outer_tile(const float* tile, int64_t ld, int64_t nc, const float* xt, int64_t Kx, int64_t Mpad,
                        int64_t k0, int64_t len, float* acc, int64_t ldc) {
  for (int64_t m = 0; m < Mpad; m += kXtLd) {
    const float* xs = xt + m * Kx + k0 * kXtLd;
    for (int64_t r = 0; r < nc; r += 6) {
      const float* ws = tile + r * ld;
      const float* rows[6] = {ws, ws + ld, ws + 2 * ld, ws + 3 * ld, ws + 4 * ld, ws + 5 * ld};
      float* cs = acc + r * ldc + m;
      if (Mpad - m >= 16) {
        if (k0 == 0) tile::outer_product<6, 2, false>(rows, xs, kXtLd, len, cs, ldc);
        else tile::outer_product<6, 2, true>(rows, xs, kXtLd, len, cs, ldc);
      } else {
        if (k0 == 0) tile::outer_product<6, 1, false>(rows, xs, kXtLd, len, cs, ldc);
        else tile::outer_product<6, 1, true>(rows, xs, kXtLd, len, cs, ldc);
      }
    }
  }
}

// M >= kOuterMinM with AVX2: tiles of 12 W rows. Per K slice the rows are decoded (scales applied) into a
// row-major tile and multiplied with every 16-row block of the transposed activations xt
// ([Mpad/16][Kx][16]), accumulating C^T [12][Mpad]; the next slice's W bytes are prefetched meanwhile.
Status run_outer(const Problem& p, const Geometry& g, const float* xt, int64_t Mpad, const Parallel& par) {
  const int64_t ldc = Mpad + 8;  // accumulator row stride, off powers of two
  // K slices of at most kOuterKC, as even as whole blocks allow (576 -> 3 x 192, not 256 + 256 + 64: a short
  // slice pays the microkernel's fixed cost for little work)
  const int64_t nslices = (g.Kx + kOuterKC - 1) / kOuterKC;
  const int64_t kc = (g.Kx / kBlock + nslices - 1) / nslices * kBlock;
  const Avx2Consts consts = avx2_consts(g.G);
  struct Tile {
    const Problem& p;
    const Geometry& g;
    const float* xt;
    int64_t Mpad, ldc, kc, n0, nc;
    TaskScratch& s;
    const Avx2Consts& c;
    void decode(int64_t k0, int64_t len) {
      decode_tile(p, g, true, c, n0, nc, kOuterRows, s.scales.data(), k0, len, s.tile.data(), kOuterLd);
      if (k0 + kc < g.Kx) prefetch_rows(p, g, n0, n0 + nc, k0 + kc, kc);
    }
    void multiply(int64_t k0, int64_t len) {
      // the first K slice stores, later ones accumulate: no zeroing
      outer_tile(s.tile.data(), kOuterLd, nc, xt, g.Kx, Mpad, k0, len, s.out.data(), ldc);
    }
    void finish() { store_transposed(p, n0, nc, s.out.data(), ldc); }
  };
  return tile::tile_gemm(par, kOp, tile::Plan{g.N, kOuterRows, kOuterRows, g.Kx, kc}, [&](int64_t n0, int64_t nc) {
    TaskScratch& s = tile_scratch(p, g, true, n0, nc, kOuterRows, kOuterLd, kOuterRows * ldc);
    prefetch_rows(p, g, n0, n0 + nc, 0, kc);
    return Tile{p, g, xt, Mpad, ldc, kc, n0, nc, s, consts};
  });
}

#endif

}  // namespace

Status matmul_cpu(const Problem& p, const Parallel& par) {
  QCOMPILE_RETURN_IF_ERROR(validate_attrs(p.attrs));
  if (p.M < 0) return Status::Error("FP4MatMul: negative M");
  if (p.M == 0) return Status::OK();
  if (!p.x || !p.w || !p.scales || !p.y) return Status::Error("FP4MatMul: null operand");
  const Geometry g = geometry(p.attrs);
  const bool avx2 = use_avx2();
  const bool outer = avx2 && p.M >= kOuterMinM;
  const int64_t mr = outer ? 8 : kMR;
  int64_t Mpad = p.M == 1 ? 1 : (p.M + mr - 1) / mr * mr;
  const int64_t Mrows = outer ? (Mpad + kXtLd - 1) / kXtLd * kXtLd : Mpad;  // rows prepared (zero past M)

  // X prepared once per call: row-major with stride ldx, or transposed in 16-row blocks for the prefill
  // path (buffer reused across calls on this thread)
  const bool transposed = outer;
  thread_local std::vector<float> xbuf;
  try {
    xbuf.resize(static_cast<size_t>(transposed ? Mrows * g.Kx : Mrows * g.ldx));
  } catch (const std::bad_alloc&) {
    return Status::Error("FP4MatMul: out of memory for the activation buffer");
  }
  int64_t rows_per_task = std::max<int64_t>(1, 16384 / g.Kx);
  if (transposed) rows_per_task = (rows_per_task + kXtLd - 1) / kXtLd * kXtLd;  // no cache line shared by tasks
  const int64_t prep_tasks = (Mrows + rows_per_task - 1) / rows_per_task;
  float* xp = xbuf.data();
  Status st = tile::run_tasks(par, prep_tasks, kOp, [&](int64_t t) {
    thread_local std::vector<float> tmp;
    const int64_t m0 = t * rows_per_task;
    prepare_rows(p, g, avx2, m0, std::min(Mrows, m0 + rows_per_task), xp, transposed, tmp);
  });
  if (st.ok()) {
#if QC_X86
    if (outer) st = run_outer(p, g, xp, Mpad, par);
    else
#endif
      st = p.M == 1 ? run_gemv(p, g, avx2, xp, par) : run_tiled(p, g, avx2, xp, Mpad, par);
  }
  if (xbuf.capacity() > (size_t{16} << 20)) std::vector<float>().swap(xbuf);  // do not pin >64 MB per thread
  return st;
}

}  // namespace fp4
}  // namespace qcompile
