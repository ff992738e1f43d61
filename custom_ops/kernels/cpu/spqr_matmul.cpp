// CPU kernel for qcompile.SpQRMatMul (contract: include/qcompile/spqr_matmul.h, docs/ops.md): activation
// preparation, the portable scalar path, the dispatch and the layouts prepared at session creation. The
// AVX2 walks are in spqr_matmul_avx2.cpp, the AVX-512BW fixed-point pair tables in spqr_lut_i16.cpp.
//
// Per call, activations are converted to fp32, gathered into stored (permuted) order once (K gathers per
// row of X; the weight is never un-permuted) and zero-padded to whole 32-position chunks. Per row of W:
//   pass 1 decodes the row's group statistics (8 groups per vector step: the stat codes are bitstreams
//          and the fp16 second-level parameters are stored structure-of-arrays);
//   pass 2 streams the packed codes: any 8 codes are one unaligned 32-bit load, one broadcast, one
//          variable shift and one mask away from an integer vector. With M == 1 they go straight into
//          FMAs, y = sum_g scale_g * (dot(x_g, codes_g) - zero_g * sum(x_g)) with per-group sums of x
//          precomputed; with M > 1 a 16-row panel is dequantized K-slice by K-slice into a transposed,
//          cache-resident buffer that an outer-product micro-kernel (6 rows of X x 16 rows of W) reuses.
//   then the row's CSR outliers add value * x[col] (original feature order).
// With M == 1 and constant codes, pass 2 (and pass 1 for 3-bit stats) read the lane layout prepared once
// at session creation (PreparedCodes): 8 codes are a mask and a conversion away, no broadcast or shift.
// Rows are split into tasks for the caller's Parallel (ORT's intra-op pool). A portable scalar path (no
// SIMD) serves other CPUs and the tests (QCOMPILE_SPQR_SCALAR=1 forces it).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "qcompile/cpu_features.h"
#include "qcompile/spqr_matmul.h"
#include "simd.h"
#include "act_quant.h"
#include "spqr_int8.h"
#include "spqr_lut_i16.h"
#include "spqr_matmul_internal.h"
#include "tile_gemm.h"

namespace qcompile {
namespace spqr {
namespace detail {

float scale_down_large_activations(float* x, int64_t n) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    amax = a > amax ? a : amax;  // (a NaN is skipped; it propagates through the walk anyway)
  }
  constexpr int kLargest = 64;  // exponent the largest activation is brought down to
  if (!(amax > 0x1p64f) || !std::isfinite(amax)) return 1.0f;
  const int e = std::ilogb(amax) - kLargest;
  const float down = std::ldexp(1.0f, -e);
  for (int64_t i = 0; i < n; ++i) x[i] *= down;
  return std::ldexp(1.0f, e);
}

// Scalar statistics of groups [g0, G) of row n into scale/zero.
void stats_scalar(const Call& c, int64_t n, int64_t g0, float* scale, float* zero) {
  const Attrs& s = *c.s;
  const int64_t G = s.groups();
  const uint32_t* srow = c.w->stat_codes + n * 2 * s.stat_words();
  const uint16_t* sp = row_params(c, n);
  for (int64_t g = g0; g < G; ++g) {
    uint32_t sc, zc;
    stat_codes_at(s, srow, g, &sc, &zc);
    scale[g] = (float)sc * half_to_float(sp[g]) + half_to_float(sp[G + g]);
    zero[g] = (float)zc * half_to_float(sp[2 * G + g]) + half_to_float(sp[3 * G + g]);
  }
}

}  // namespace detail

using namespace detail;
namespace {

template <typename Idx>
inline float outlier_sum(const Call& c, const Idx* cols, int64_t n, int64_t m) {
  const float* xo = c.xorig + m * c.s->K;
  float acc = 0.f;
  for (int64_t o = row_offset(*c.w, n), end = row_offset(*c.w, n + 1); o < end; ++o)
    acc += half_to_float(c.w->values[o]) * xo[cols[o]];
  return acc;
}

inline float outliers(const Call& c, int64_t n, int64_t m) {
  return c.w->col_int16 ? outlier_sum(c, (const int16_t*)c.w->col_indices, n, m)
                        : outlier_sum(c, (const int32_t*)c.w->col_indices, n, m);
}

// ---- portable scalar path ----

void rows_scalar(const Call& c, int64_t r0, int64_t r1) {
  const Attrs& s = *c.s;
  const int64_t G = s.groups();
  thread_local std::vector<float> wrow_buf, scale_buf, zero_buf;  // reached once, not per row
  wrow_buf.assign((size_t)c.Kc, 0.f);
  scale_buf.assign((size_t)G, 0.f);
  zero_buf.assign((size_t)G, 0.f);
  float* const wrow = wrow_buf.data();
  float* const scale = scale_buf.data();
  float* const zero = zero_buf.data();
  for (int64_t n = r0; n < r1; ++n) {
    stats_scalar(c, n, 0, scale, zero);
    const uint32_t* row = c.w->codes + n * s.code_words();
    for (int64_t p = 0; p < s.K; ++p) {
      const int64_t g = p / s.group_size;
      wrow[p] = scale[g] * ((float)code_at(row, p, s.bits) - zero[g]);
    }
    for (int64_t m = 0; m < c.M; ++m) {
      const float* x = c.xk + m * c.x_stride();
      float acc = 0.f;
      for (int64_t p = 0; p < s.K; ++p) acc += x[p] * wrow[p];
      acc = acc * c.dense_scale + outliers(c, n, m);
      if (c.bias) acc += c.bias[n];
      c.y[m * s.N + n] = acc;
    }
  }
}

bool force_scalar() { return env_flag("QCOMPILE_SPQR_SCALAR"); }
[[maybe_unused]] bool use_avx2() { return avx2_enabled("QCOMPILE_SPQR_SCALAR"); }

// The batch-1 walk over constant codes runs on fixed-point pair tables (spqr_lut_i16.h) for this layer on
// this CPU: what prepare_constant_codes lays the codes out for, and what matmul_cpu checks it against.
bool use_pairs_walk(const Attrs& a) {
  return a.accuracy_level != kAccuracyFp32 && cpu_has_avx2() && lut_i16::available() && lut_i16::supports(a);
}

// The batch-1 walk over constant codes is the int8 one (spqr_int8.h): accuracy_level 4 and the CPU for it.
bool use_int8_walk(const Attrs& a) {
  return a.accuracy_level == kAccuracyInt8 && int8_walk::available() && int8_walk::supports(a);
}

// Rows per task: whole 16-row panels, about 256K weight-ops per task so the pool's per-task cost
// stays small while every thread still gets several tasks.
int64_t rows_per_task(const Attrs& a, int64_t M) {
  const int64_t ops = a.K * std::max<int64_t>(1, std::min<int64_t>(M, 8));
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, ops));
  return round_up(rows, 16);
}

// dst[p] = src[idx[p]]: activations into stored order (indices were validated).
template <typename Idx>
void gather(const float* src, const Idx* idx, int64_t K, float* dst) {
  for (int64_t p = 0; p < K; ++p) dst[p] = src[idx[p]];
}

// y[m, n] the way the reference computes it (qcompile/reference/spqr.py): row n of W dequantized in fp32,
// scale · (code − zero) per position, outliers added to it, then the dot product with X in float64.
// For outputs the fast paths leave non-finite: their rearranged sums lose the NaN of +inf and −inf terms
// (an Inf in stat_params makes scale · (Σ x·code − zero · Σ x) ±inf where the reference's per-position
// products are ±inf of both signs), or overflow where the reference does not.
void recompute_non_finite(const float* xf, int64_t M, const Attrs& s, const Weights& w, const float* bias, float* y) {
  std::vector<float> wcol, scale, zero;  // allocated only when an output needs it
  const Call c{&s, &w, M, nullptr, 0, xf, nullptr, 0, bias, y, nullptr, nullptr, nullptr};
  for (int64_t n = 0; n < s.N; ++n) {
    bool any = false;
    for (int64_t m = 0; m < M; ++m) any = any || !std::isfinite(y[m * s.N + n]);
    if (!any) continue;
    const int64_t G = s.groups();
    wcol.assign((size_t)s.K, 0.f);
    scale.resize((size_t)G);
    zero.resize((size_t)G);
    stats_scalar(c, n, 0, scale.data(), zero.data());
    const uint32_t* row = w.codes + n * s.code_words();
    for (int64_t p = 0; p < s.K; ++p) {
      const int64_t g = p / s.group_size;
      const float dense = scale[(size_t)g] * ((float)code_at(row, p, s.bits) - zero[(size_t)g]);
      wcol[(size_t)(w.perm ? perm_at(w, p) : p)] = dense;
    }
    for (int64_t o = row_offset(w, n), end = row_offset(w, n + 1); o < end; ++o)
      wcol[(size_t)col_at(w, o)] += half_to_float(w.values[o]);
    for (int64_t m = 0; m < M; ++m) {
      float& out = y[m * s.N + n];
      if (std::isfinite(out)) continue;
      double acc = 0.0;
      for (int64_t k = 0; k < s.K; ++k) acc += (double)xf[m * s.K + k] * (double)wcol[(size_t)k];
      if (bias) acc += (double)bias[n];
      out = (float)acc;
    }
  }
}

// xf fp32 [M, K] in original order -> y fp32 [M, N], through the fastest path this CPU and layer allow.
Status run_paths(const float* xf, int64_t M, const Attrs& s, const Weights& w, const float* bias, float* y,
                 const PreparedCodes* prep, const Parallel& par) {
  const int64_t Kc = s.chunks() * kChunk, G = s.groups(), Gp = round_up(G, 8);
  const int64_t ldx = M > 1 ? Kc + 16 : Kc;  // (Call::ldx)
  // Kept per calling thread: no allocation (nor page faults) per call.
  thread_local std::vector<float> xk, xsum;
  xk.assign((size_t)(M * ldx), 0.f);
  xsum.assign((size_t)(M * Gp), 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const float* src = xf + m * s.K;
    float* dst = xk.data() + m * ldx;
    if (w.perm && w.perm_int16) {
      gather(src, (const int16_t*)w.perm, s.K, dst);
    } else if (w.perm) {
      gather(src, (const int32_t*)w.perm, s.K, dst);
    } else {
      std::memcpy(dst, src, sizeof(float) * (size_t)s.K);
    }
  }
  const float dense_scale = M == 1 ? scale_down_large_activations(xk.data(), s.K) : 1.0f;
  for (int64_t m = 0; m < M; ++m) {
    // one register accumulator per group, summed in order: the same sums as adding into xsum element by
    // element, without a store-to-load chain through memory per element (0.7 ms at M = 128, K = 4096)
    const float* xs = xk.data() + m * ldx;
    float* xm = xsum.data() + m * Gp;
    for (int64_t g = 0; g * s.group_size < s.K; ++g) {
      float acc = 0.f;
      for (int64_t p = g * s.group_size, end = std::min(s.K, p + s.group_size); p < end; ++p) acc += xs[p];
      xm[g] = acc;
    }
  }
  thread_local std::vector<int32_t> inv;
  inv.clear();
  if (w.perm && M > 1) {
    inv.resize((size_t)s.K);
    for (int64_t p = 0; p < s.K; ++p) inv[(size_t)perm_at(w, p)] = (int32_t)p;
  }
#if QC_X86
  if (prep && !prep->pairs.empty()) {
    bool ran = false;
    QCOMPILE_RETURN_IF_ERROR(
        lut_i16::run(s, w, xk.data(), xf, xsum.data(), Gp, dense_scale, bias, y, *prep, par, &ran));
    if (ran) return Status::OK();
    prep = nullptr;  // a non-finite activation: the fp32 walk over the packed codes carries it
  }
#endif
  thread_local std::vector<float> xl;
  if (prep) {  // M == 1
    const int64_t L = prep->per_lane;
    float f[16];  // 2^-(bits·i), exact
    for (int64_t i = 0; i < L; ++i) f[i] = std::ldexp(1.0f, -slot_exponent(s.bits, (int)i));
    xl.resize((size_t)(prep->blocks * 8 * L));
    for (int64_t b = 0; b < prep->blocks; ++b)
      for (int64_t i = 0; i < L; ++i)
        for (int64_t j = 0; j < 8; ++j) {
          const size_t p = (size_t)((b * L + i) * 8 + j);
          xl[p] = xk[p] * f[i];
        }
  }
  const Call c{&s, &w, M, xk.data(), Kc, xf, xsum.data(), Gp, bias, y, inv.empty() ? nullptr : inv.data(),
               prep, prep ? xl.data() : nullptr, dense_scale, ldx};
  const int64_t rpt = rows_per_task(s, M);
  void (*rows)(const Call&, int64_t, int64_t) = rows_scalar;
#if QC_X86
  if (use_avx2()) {
    if (M > 1) return s.bits == 4 ? run_panels<4>(c, par) : run_panels<3>(c, par);
    rows = s.bits == 4 ? rows_avx2_m1<4> : rows_avx2_m1<3>;
  }
#endif
  return tile::run_tasks(par, (s.N + rpt - 1) / rpt, kOp, [&](int64_t t) {
    const int64_t r0 = t * rpt;
    rows(c, r0, std::min(s.N, r0 + rpt));
  });
}

// accuracy_level 4: each row of X quantized to int8 in blocks of 16 stored positions (act_quant.h). xhat
// gets x̂ in original order (a non-finite row as it is); q and qs the stored-order codes and scales of the
// first row (Kc and Kc / 16 entries, zero padded). Returns whether that row was finite.
bool quantize_stored(const float* xf, int64_t M, const Attrs& s, const Weights& w, float* xhat, int8_t* q, float* qs) {
  const int64_t Kc = s.chunks() * kChunk;
  thread_local std::vector<float> xs;
  thread_local std::vector<int8_t> qrow;
  thread_local std::vector<float> srow;
  xs.assign((size_t)Kc, 0.f);
  qrow.resize((size_t)Kc);
  srow.resize((size_t)(Kc / act_quant::kBlock));
  bool first_finite = false;
  for (int64_t m = 0; m < M; ++m) {
    const float* src = xf + m * s.K;
    float* dst = xhat + m * s.K;
    for (int64_t p = 0; p < s.K; ++p) xs[(size_t)p] = src[w.perm ? perm_at(w, p) : p];
    const bool ok = act_quant::quantize(xs.data(), Kc, qrow.data(), srow.data());
    if (m == 0) first_finite = ok;
    if (!ok) {
      std::memcpy(dst, src, sizeof(float) * (size_t)s.K);
      continue;
    }
    for (int64_t p = 0; p < s.K; ++p)
      dst[w.perm ? perm_at(w, p) : p] = srow[(size_t)(p / act_quant::kBlock)] * (float)qrow[(size_t)p];
    if (m == 0) {
      std::memcpy(q, qrow.data(), (size_t)Kc);
      std::memcpy(qs, srow.data(), sizeof(float) * (size_t)(Kc / act_quant::kBlock));
    }
  }
  return first_finite;
}

// The driver: xf is fp32 [M, K] in original order; y fp32 [M, N].
Status run(const float* xf, int64_t M, const Attrs& s, const Weights& w, const float* bias, float* y,
           const PreparedCodes* prep, const Parallel& par) {
  if (s.accuracy_level == kAccuracyInt8) {  // the op multiplies with x̂
    const int64_t Kc = s.chunks() * kChunk;
    thread_local std::vector<float> xhat, qs;
    thread_local std::vector<int8_t> q;
    xhat.resize((size_t)(M * s.K));
    q.assign((size_t)Kc, 0);
    qs.assign((size_t)(Kc / act_quant::kBlock), 0.f);
    const bool finite = quantize_stored(xf, M, s, w, xhat.data(), q.data(), qs.data());
    xf = xhat.data();
    if (M == 1 && finite && prep && !prep->int8.empty()) {
      QCOMPILE_RETURN_IF_ERROR(int8_walk::run(s, w, q.data(), qs.data(), xf, bias, y, prep->int8.data(), par));
      if (!simd::all_finite(y, s.N)) recompute_non_finite(xf, M, s, w, bias, y);
      return Status::OK();
    }
    if (prep && !prep->int8.empty()) prep = nullptr;  // the other batch-1 walks have no layout prepared
  }
  QCOMPILE_RETURN_IF_ERROR(run_paths(xf, M, s, w, bias, y, prep, par));
  if (!simd::all_finite(y, M * s.N)) recompute_non_finite(xf, M, s, w, bias, y);
  return Status::OK();
}

}  // namespace

Status prepare_constant_codes(const Attrs& a, const uint32_t* codes, const uint32_t* stat_codes,
                              PreparedCodes* out) {
  QCOMPILE_RETURN_IF_ERROR(validate_attrs(a));
  out->source = codes;
  out->stat_source = stat_codes;
  out->lanes.clear();
  out->stat_lanes.clear();
  out->stat_blocks = 0;
  out->pairs.clear();
  out->int8.clear();
  out->per_lane = 32 / a.bits;
  const int64_t block = 8 * out->per_lane;
  out->blocks = (a.chunks() * kChunk) / block;
#if QC_X86
  const bool useful = cpu_has_avx2() && a.group_size == 16;
#else
  const bool useful = false;
#endif
  if (use_int8_walk(a)) {  // the walk this CPU will run at accuracy_level 4
    out->int8.resize((size_t)int8_walk::prepared_bytes(a));
    int8_walk::pack(a, codes, stat_codes, out->int8.data());
    return Status::OK();
  }
  if (use_pairs_walk(a)) {  // the walk this CPU will run
    out->pairs.resize((size_t)lut_i16::prepared_bytes(a));
    lut_i16::pack(a, codes, stat_codes, out->pairs.data());
    return Status::OK();
  }
  if (!useful || out->blocks == 0) {
    out->source = nullptr;
    return Status::OK();
  }
  if (a.stat_bits == 3) {
    const int64_t G = a.groups();
    out->stat_blocks = (G + 79) / 80;
    const int64_t SB = out->stat_blocks;
    out->stat_lanes.assign((size_t)(a.N * 2 * SB * 8), 0u);
    for (int64_t n = 0; n < a.N; ++n) {
      const uint32_t* srow = stat_codes + n * 2 * a.stat_words();
      uint32_t* dst = out->stat_lanes.data() + n * 2 * SB * 8;
      for (int64_t g = 0; g < G; ++g) {
        uint32_t sc, zc;
        stat_codes_at(a, srow, g, &sc, &zc);
        const int64_t b = g / 80, i = (g % 80) / 8, j = g % 8;
        dst[b * 8 + j] |= sc << (3 * i);
        dst[(SB + b) * 8 + j] |= zc << (3 * i);
      }
    }
  }
  out->lanes.assign((size_t)(a.N * out->blocks * 8), 0u);
  for (int64_t n = 0; n < a.N; ++n) {
    const uint32_t* row = codes + n * a.code_words();
    uint32_t* dst = out->lanes.data() + n * out->blocks * 8;
    for (int64_t b = 0; b < out->blocks; ++b)
      for (int i = 0; i < out->per_lane; ++i)
        for (int j = 0; j < 8; ++j)
          dst[b * 8 + j] |= code_at(row, b * block + 8 * i + j, a.bits) << (a.bits * i);
  }
  return Status::OK();
}

Status matmul_cpu(const Problem& p, const Parallel& par) {
  const Attrs& a = p.attrs;
  if (p.M <= 0) return Status::OK();
  // prepared codes only for the batch-1 SIMD paths (lanes: AVX2; pairs: the fixed-point walk), and only
  // when they were made from these codes
  const bool same = p.prepared && p.prepared->source == p.w.codes && p.prepared->stat_source == p.w.stat_codes &&
                    p.M == 1 && !force_scalar();
  const PreparedCodes* prep =
      same && ((!p.prepared->lanes.empty() && p.prepared->per_lane == 32 / a.bits) ||
               (!p.prepared->pairs.empty() && use_pairs_walk(a)) || (!p.prepared->int8.empty() && use_int8_walk(a)))
          ? p.prepared
          : nullptr;
  if (p.dtype == DType::kFloat32)
    return run((const float*)p.x, p.M, a, p.w, (const float*)p.bias, (float*)p.y, prep, par);
  const uint16_t* x = (const uint16_t*)p.x;
  std::vector<float> xf((size_t)(p.M * a.K)), yf((size_t)(p.M * a.N)), bf;
  for (size_t i = 0; i < xf.size(); ++i) xf[i] = half_to_float(x[i]);
  if (p.bias) {
    bf.resize((size_t)a.N);
    for (int64_t n = 0; n < a.N; ++n) bf[(size_t)n] = half_to_float(((const uint16_t*)p.bias)[n]);
  }
  QCOMPILE_RETURN_IF_ERROR(run(xf.data(), p.M, a, p.w, p.bias ? bf.data() : nullptr, yf.data(), prep, par));
  uint16_t* y = (uint16_t*)p.y;
  for (size_t i = 0; i < yf.size(); ++i) y[i] = float_to_half(yf[i]);
  return Status::OK();
}

}  // namespace spqr
}  // namespace qcompile
