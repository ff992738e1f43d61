// The int8 walk of SpQRMatMul at batch 1 (see spqr_int8.h): the prepared layout, the AVX-512 VNNI walk and
// its driver.
#include "spqr_int8.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "qcompile/cpu_features.h"
#include "simd.h"
#include "spqr_matmul_internal.h"
#include "tile_gemm.h"

// GCC 12 reports its own AVX-512 intrinsics' deliberately undefined pass-through operands (_mm512_undefined_*)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace qcompile {
namespace spqr {
namespace int8_walk {

namespace {
int64_t row_blocks16(const Attrs& a) { return (a.N + kRows - 1) / kRows; }
constexpr int64_t kBatchesPerTask = 4;  // 256 rows
// Bytes prefetched (into L2) ahead of the walk, which streams its layout once. It pays off with the layout on
// huge pages (HugePageAllocator): on a 2-core Zen 4 VM, 4096 x 4096 3-bit, cold caches, the walk alone took
// 0.32-0.33 ms with both, 0.35-0.38 ms with either alone, 0.37-0.41 ms with neither (0.30 ms from cache).
constexpr int64_t kCodeAhead = 8192;
}  // namespace

bool available() { return cpu_has_avx512vnni() && !env_flag("QCOMPILE_SPQR_NO_AVX512"); }

bool supports(const Attrs& a) { return a.group_size == 16 && a.stat_bits <= 4 && a.stat_group % kRows == 0; }

int64_t prepared_bytes(const Attrs& a) { return row_blocks16(a) * a.groups() * group_bytes(a.bits); }

void pack(const Attrs& a, const uint32_t* codes, const uint32_t* stat_codes, uint8_t* dst) {
  const int64_t G = a.groups(), RB = row_blocks16(a), GB = group_bytes(a.bits);
  for (int64_t b0 = 0; b0 < RB; b0 += kBatch) {
    const int64_t J = std::min<int64_t>(kBatch, RB - b0);
    uint8_t* batch = dst + b0 * G * GB;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < J; ++j) {
        uint8_t* out = batch + (g * J + j) * GB;
        std::memset(out, 0, static_cast<size_t>(GB));
        for (int r = 0; r < kRows; ++r) {
          const int64_t n = (b0 + j) * kRows + r;
          if (n >= a.N) break;  // padding rows: code 0, never stored back
          const uint32_t* row = codes + n * a.code_words();
          for (int i = 0; i < 4; ++i)
            for (int k = 0; k < 4; ++k) {
              const int64_t p = 16 * g + 4 * i + k;  // < 16 G <= 32 chunks: inside the packed row
              const uint32_t c = code_at(row, p, a.bits);
              const int byte = 4 * r + k;
              if (a.bits == 4) {
                out[64 * (i / 2) + byte] |= (uint8_t)(c << (4 * (i % 2)));
              } else {
                out[byte] |= (uint8_t)((c & 3) << (2 * i));
                out[64 + 8 * i + byte / 8] |= (uint8_t)((c >> 2) << (byte % 8));
              }
            }
          uint32_t sc, zc;
          stat_codes_at(a, stat_codes + n * 2 * a.stat_words(), g, &sc, &zc);
          out[GB - kRows + r] = (uint8_t)(sc | zc << 4);
        }
      }
  }
}

#if QC_X86

namespace {

// The GFNI form of the walk: the CPU has GFNI and QCOMPILE_SPQR_NO_GFNI (the tests' switch) is not set.
bool use_gfni() { return cpu_has_gfni() && !env_flag("QCOMPILE_SPQR_NO_GFNI"); }

// The matrix of vgf2p8affineqb that moves a byte's bits [k, k + w) to [0, w): output bit b of a byte is the
// parity of (matrix byte 7 - b) & input, so byte 7 - b holds 1 << (k + b).
constexpr uint64_t affine_field(int k, int w) {
  uint64_t m = 0;
  for (int b = 0; b < w; ++b) m |= (uint64_t)(1u << (k + b)) << (8 * (7 - b));
  return m;
}

// The walk, acc[j] += the dense part of row block j of a batch of J (spqr_int8_walk.inc), compiled twice:
// with GFNI (a code field is one affine instruction from its byte) and without (a shift and a mask).
#define QC_WALK_NAME walk_batch
#define QC_WALK_ATTR QC_AVX512VNNI
#define QC_WALK_GFNI 0
#include "spqr_int8_walk.inc"
#define QC_WALK_NAME walk_batch_gfni
#define QC_WALK_ATTR QC_AVX512VNNI_GFNI
#define QC_WALK_GFNI 1
#include "spqr_int8_walk.inc"

// The row blocks [b0, b0 + J) of one batch: parameters, walk, then outliers and bias.
QC_AVX512VNNI void run_batch(const Attrs& a, const Weights& w, const int8_t* q, const float* s, const float* xsum,
                             const float* xhat, const float* bias, float* y, const uint8_t* prepared, int64_t b0,
                             int64_t J) {
  const int64_t G = a.groups();
  thread_local std::vector<float> P;
  P.resize(static_cast<size_t>(J * G * 4));
  for (int64_t j = 0; j < J; ++j) {
    const int64_t rb = (b0 + j) * kRows / a.stat_group;  // this block's row block of second-level parameters
    float* pj = P.data() + j * 4 * G;
    simd::half_to_float_avx2(w.stat_params + rb * 4 * G, pj, 4 * G);
    for (int64_t g = 0; g < G; ++g) {
      pj[2 * G + g] *= xsum[g];
      pj[3 * G + g] *= xsum[g];
    }
  }
  __m512 acc[kBatch];
  for (int j = 0; j < kBatch; ++j) acc[j] = _mm512_setzero_ps();
  const uint8_t* c = prepared + b0 * G * group_bytes(a.bits);
  const bool three = a.bits == 3;
  if (use_gfni()) {
    switch (J) {
      case 4: (three ? walk_batch_gfni<3, 4> : walk_batch_gfni<4, 4>)(c, G, q, s, P.data(), acc); break;
      case 3: (three ? walk_batch_gfni<3, 3> : walk_batch_gfni<4, 3>)(c, G, q, s, P.data(), acc); break;
      case 2: (three ? walk_batch_gfni<3, 2> : walk_batch_gfni<4, 2>)(c, G, q, s, P.data(), acc); break;
      default: (three ? walk_batch_gfni<3, 1> : walk_batch_gfni<4, 1>)(c, G, q, s, P.data(), acc); break;
    }
  } else {
    switch (J) {
      case 4: (three ? walk_batch<3, 4> : walk_batch<4, 4>)(c, G, q, s, P.data(), acc); break;
      case 3: (three ? walk_batch<3, 3> : walk_batch<4, 3>)(c, G, q, s, P.data(), acc); break;
      case 2: (three ? walk_batch<3, 2> : walk_batch<4, 2>)(c, G, q, s, P.data(), acc); break;
      default: (three ? walk_batch<3, 1> : walk_batch<4, 1>)(c, G, q, s, P.data(), acc); break;
    }
  }
  alignas(64) float dense[kBatch * kRows];
  for (int j = 0; j < kBatch; ++j) _mm512_store_ps(dense + kRows * j, acc[j]);
  const detail::Call call{&a, &w, 1, nullptr, 0, xhat, nullptr, 0, bias, y, nullptr, nullptr, nullptr};
  for (int64_t r = 0; r < J * kRows; ++r) {
    const int64_t n = b0 * kRows + r;
    if (n >= a.N) break;
    float v = dense[r] + detail::outliers_avx2(call, n, 0);
    if (bias) v += bias[n];
    y[n] = v;
  }
}

}  // namespace

Status run(const Attrs& a, const Weights& w, const int8_t* q, const float* s, const float* xhat, const float* bias,
           float* y, const uint8_t* prepared, const Parallel& par) {
  const int64_t G = a.groups(), RB = row_blocks16(a);
  thread_local std::vector<float> xsum_buf;  // X_g = s_g · Σ_{p∈g} q_p
  xsum_buf.resize(static_cast<size_t>(G));
  for (int64_t g = 0; g < G; ++g) {
    int32_t sum = 0;
    for (int i = 0; i < 16; ++i) sum += q[16 * g + i];
    xsum_buf[g] = s[g] * static_cast<float>(sum);
  }
  const float* xsum = xsum_buf.data();
  const int64_t batches = (RB + kBatch - 1) / kBatch;
  const int64_t tasks = (batches + kBatchesPerTask - 1) / kBatchesPerTask;
  return tile::run_tasks(par, tasks, detail::kOp, [&](int64_t t) {
    for (int64_t bt = t * kBatchesPerTask; bt < std::min(batches, (t + 1) * kBatchesPerTask); ++bt) {
      const int64_t b0 = bt * kBatch;
      run_batch(a, w, q, s, xsum, xhat, bias, y, prepared, b0, std::min<int64_t>(kBatch, RB - b0));
    }
  });
}

#else  // not x86: the fp32 paths serve every call

Status run(const Attrs&, const Weights&, const int8_t*, const float*, const float*, const float*, float*,
           const uint8_t*, const Parallel&) {
  return Status::Error("SpQRMatMul: int8 walk without AVX-512");
}

#endif

}  // namespace int8_walk
}  // namespace spqr
}  // namespace qcompile
