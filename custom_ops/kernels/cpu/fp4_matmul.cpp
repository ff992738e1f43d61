// CPU kernel for qcompile.FP4MatMul: activation preparation, the portable kernels, the tiled prefill driver
// and the dispatch. The AVX2 path is in fp4_matmul_avx2.cpp, shared internals in fp4_matmul_internal.h.
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
// The library is compiled for x86-64-v2; the AVX2/FMA/F16C code is selected at run time
// (QCOMPILE_FP4_NO_AVX2=1 forces the portable path, which the tests also exercise).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "act_quant.h"
#include "fp4_matmul_internal.h"
#include "qcompile/cpu_features.h"
#include "qcompile/fp4_matmul.h"
#include "qcompile/half.h"
#include "simd.h"
#include "tile_gemm.h"

namespace qcompile {
namespace fp4 {
using namespace detail;
namespace {

// ---- activations -----------------------------------------------------------------------------------------

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

// Row m of X as floats.
void row_to_float(const Problem& p, int64_t m, bool avx2, float* out) {
  const int64_t K = p.attrs.K;
  if (p.dtype == DType::kFloat32) {
    std::memcpy(out, static_cast<const float*>(p.x) + m * K, K * sizeof(float));
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(p.x) + m * K;
  int64_t k = 0;
#if QC_X86
  if (avx2) {
    simd::half_to_float_avx2(h, out, K);
    return;
  }
#endif
  for (; k < K; ++k) out[k] = half_to_float(h[k]);
}

// One activation row: float, rotated, zero-padded to Kx and (AVX2) block-permuted into out[0..Kx).
void prepare_row(const Problem& p, const Geometry& g, bool avx2, int64_t m, float* tmp, float* out) {
  if (m >= p.M) {
    std::fill(out, out + g.Kx, 0.0f);
    return;
  }
  float* row = avx2 ? tmp : out;
  row_to_float(p, m, avx2, row);
  std::fill(row + g.K, row + g.Kx, 0.0f);
  if (p.attrs.hadamard_block > 1) {
#if QC_X86
    if (avx2 && p.attrs.hadamard_block >= 8) fwht_avx2(row, g.K, p.attrs.hadamard_block);
    else
#endif
      fwht(row, g.K, p.attrs.hadamard_block);
  }
  // accuracy_level 4: the op multiplies with the rotated row quantized to int8 (a non-finite row stays as is)
  if (p.attrs.accuracy_level == kAccuracyInt8) act_quant::round_trip(row, g.Kx);
#if QC_X86
  if (avx2) {
    for (int64_t b = 0; b < g.Kx; b += kBlock) permute_block_avx2(tmp + b, out + b);
  }
#endif
}

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

}  // namespace

namespace detail {

// ---- tables and geometry -------------------------------------------------------------------------------

Tables::Tables() {
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

// ---- scales and outputs --------------------------------------------------------------------------------

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

// Y[m, n0 + r] = acc[r * ldc + m] (+ bias) for r < count, m in [m0, min(m1, M)): the prefill path's C^T tile.
void store_transposed(const Problem& p, int64_t n0, int64_t count, const float* acc, int64_t ldc, int64_t m0,
                      int64_t m1) {
  constexpr int64_t kMaxRows = std::max({kOuterRows, kTileRows, tile::amx::kTileRows});
  const int64_t N = p.attrs.N;
  float bias[kMaxRows] = {};
  count = std::min(count, kMaxRows);  // (tiles never hold more rows)
  for (int64_t r = 0; r < count && p.bias; ++r)
    bias[r] = p.dtype == DType::kFloat32 ? static_cast<const float*>(p.bias)[n0 + r]
                                         : half_to_float(static_cast<const uint16_t*>(p.bias)[n0 + r]);
  for (int64_t m = m0; m < std::min(m1, p.M); ++m) {
    if (p.dtype == DType::kFloat32) {
      float* y = static_cast<float*>(p.y) + m * N + n0;
      for (int64_t r = 0; r < count; ++r) y[r] = acc[r * ldc + m] + bias[r];
    } else {
      uint16_t* y = static_cast<uint16_t*>(p.y) + m * N + n0;
      for (int64_t r = 0; r < count; ++r) y[r] = float_to_half(acc[r * ldc + m] + bias[r]);
    }
  }
}

// ---- tiles -----------------------------------------------------------------------------------------

TaskScratch& task_scratch(int slot) {
  thread_local std::array<TaskScratch, tile::kMaxTilesPerTask> s;
  return s[static_cast<size_t>(slot)];
}

// The calling thread's scratch for a tile of `rows` W rows: the decoded scales of rows [n0, n0 + nc), a tile
// of row stride ld and `out` accumulator floats (left as they are: a tile zeroes or overwrites them).
TaskScratch& tile_scratch(const Problem& p, const Geometry& g, bool avx2, int64_t n0, int64_t nc, int64_t rows,
                          int64_t ld, int64_t out, int slot) {
  TaskScratch& s = task_scratch(slot);
  s.scales.resize(rows * g.scale_len);
  s.tile.resize(rows * ld);
  s.out.resize(out);
  for (int64_t r = 0; r < nc; ++r) decode_scales(p, g, n0 + r, s.scales.data() + r * g.scale_len, avx2);
  return s;
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

}  // namespace detail

namespace {

bool use_avx2() { return tables().perm_ok && avx2_enabled("QCOMPILE_FP4_NO_AVX2"); }

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
      gemv_rows_avx2(p, g, n0, n1, x, s.scales.data(), s.out.data());
    } else
#endif
    {
      for (int64_t n = n0; n < n1; ++n) {
        decode_scales(p, g, n, s.scales.data(), false);
        s.out[n - n0] = gemv_row_generic(p.w + n * g.row_bytes, s.scales.data(), x, g);
      }
    }
    store_row(p, 0, n0, n1 - n0, s.out.data());
  });
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
      const float* tile = s.tile.data();
      float* out = s.out.data();
      const int64_t ldx = g.ldx;
      for (int64_t m = 0; m < Mpad; m += kMR)
        for (int64_t r = 0; r < nc; r += kNR) {
          const float* xs = x + m * ldx + k0;
          const float* ws = tile + r * kTileLd;
          float* cs = out + m * kTileRows + r;
#if QC_X86
          if (avx2) {
            tile::dot_rx4_avx2<kMR, true>(xs, ldx, ws, kTileLd, len, cs, kTileRows);
            continue;
          }
#endif
          tile::dot_rx4<kMR, true>(xs, ldx, ws, kTileLd, len, cs, kTileRows);
        }
    }
    void finish() {
      for (int64_t m = 0; m < p.M; ++m) store_row(p, m, n0, nc, s.out.data() + m * kTileRows);
    }
  };
  const tile::Plan plan{g.N, kTileRows, kTileRows, g.Kx, kKC};
  return tile::tile_gemm(par, kOp, plan, [&](int64_t n0, int64_t nc, int64_t, int64_t, int slot) {
    TaskScratch& s = tile_scratch(p, g, avx2, n0, nc, kTileRows, kTileLd, Mpad * kTileRows, slot);
    std::fill(s.out.begin(), s.out.end(), 0.0f);
    return Tile{p, g, avx2, x, Mpad, n0, nc, s, consts};
  });
}

}  // namespace

Status matmul_cpu(const Problem& p, const Parallel& par) {
  QCOMPILE_RETURN_IF_ERROR(validate_attrs(p.attrs));
  if (p.M < 0) return Status::Error("FP4MatMul: negative M");
  if (p.M == 0) return Status::OK();
  if (!p.x || !p.w || !p.scales || !p.y) return Status::Error("FP4MatMul: null operand");
  const Geometry g = geometry(p.attrs);
  const bool avx2 = use_avx2();
  if (p.M == 1 && int8_gemv_available(p.attrs)) {
    thread_local std::vector<float> row;
    row.resize(static_cast<size_t>(g.Kx));
    row_to_float(p, 0, avx2, row.data());
    std::fill(row.begin() + g.K, row.end(), 0.0f);
#if QC_X86
    if (p.attrs.hadamard_block >= 8) fwht_avx2(row.data(), g.K, p.attrs.hadamard_block);
    else
#endif
      if (p.attrs.hadamard_block > 1) fwht(row.data(), g.K, p.attrs.hadamard_block);
    bool ran = false;
    QCOMPILE_RETURN_IF_ERROR(run_gemv_int8(p, g, row.data(), par, &ran));
    if (ran) return Status::OK();  // else a NaN or Inf in X: the fp32 path below carries it
  }
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
