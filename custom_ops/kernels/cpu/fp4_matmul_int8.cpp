// FP4MatMul at accuracy_level 4, one row of X: integer dot products of the E2M1 codes with the activation
// quantized to int8 (act_quant.h), AVX-512 VNNI (vpdpbusd) or AVX2 (vpmaddubsw) forms.
//
// Why: the fp32 GEMV spends ~20 vector instructions per 64 weights turning nibbles into floats and
// multiplying them; here a 16-entry byte table in a register (vpshufb) turns a nibble straight into an
// integer weight and one dot-product instruction multiplies 64 (AVX-512) of them.
//
// Arithmetic: w = e2m1(code) is a multiple of 1/2, so 2w + 12 is an integer in 0..24, looked up as an
// unsigned byte (u8 x s8 is what the dot-product instructions take). Over a block b of 16 positions,
// D_b = sum (2w + 12) q is exact in int32 and sum_b w x̂ = s_b (D_b - 12 Q_b) / 2 with Q_b = sum_b q; the
// 12 Q_b term depends on X only (AVX-512: the dot products start from it; AVX2: folded in once per group
// scale). Each int32 lane covers 8 positions of one block, so a block's (group scale) x s_b / 2 multiplies
// whole lanes: one conversion and FMA per 64 or 128 weights.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "act_quant.h"
#include "fp4_matmul_internal.h"
#include "qcompile/cpu_features.h"
#include "qcompile/half.h"
#include "simd.h"
#include "tile_gemm.h"

// GCC 12 reports its own AVX-512 intrinsics' deliberately undefined pass-through operands (_mm512_undefined_*)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace qcompile {
namespace fp4 {
namespace detail {
namespace {

// 2 * e2m1(code) + 12 for the 16 codes (code 8 is -0).
alignas(16) constexpr uint8_t kWeightBytes[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

enum class Isa { kNone, kAvx2, kAvx512 };

Isa int8_isa() {
  if (!avx2_enabled("QCOMPILE_FP4_NO_AVX2")) return Isa::kNone;
  if (cpu_has_avx512vnni() && !env_flag("QCOMPILE_FP4_NO_AVX512")) return Isa::kAvx512;
  return Isa::kAvx2;
}

// The quantized activation row as the kernels read it.
struct Int8Row {
  int64_t chunk = 0;       // positions per W load: 128 (AVX-512) or 64 (AVX2); a span is two chunks
  int64_t Kq = 0;          // positions covered, a multiple of the span
  std::vector<int8_t> q;   // per chunk: q of its even positions, then of its odd ones
  std::vector<float> hs;   // per block of 16: s_b / 2 (zero past Kq / 16)
  std::vector<float> q12;  // per block: 12 * Q_b (AVX2 form)
  std::vector<int32_t> unit12;  // per 8 positions: -12 * their sum of q (AVX-512 form: the dot products' start)
  std::vector<float> xhat; // x̂ in natural order (outputs recomputed the reference's way)
};

#if QC_X86

// 16 scale codes -> floats (tensor_scale not applied), codes past `count` read as 0 (masked load).
QC_AVX512VNNI inline __m512 decode_scales16(const uint8_t* s, int64_t count, ScaleFormat fmt) {
  const __mmask16 live = count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
  const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, s));
  if (fmt == ScaleFormat::kE8M0) {  // 2^(c-127): exponent field c; c = 0 is 2^-127 (subnormal), 255 NaN
    __m512i bits = _mm512_slli_epi32(c, 23);
    bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(c, _mm512_setzero_si512()),
                                 _mm512_set1_epi32(0x00400000));
    bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(255)),
                                 _mm512_set1_epi32(0x7FC00000));
    return _mm512_castsi512_ps(bits);
  }
  // E4M3: |c| = eeee mmm; normal -> exponent e + 120, mantissa m << 20; e = 0 -> m * 2^-9; 0x7F -> NaN
  const __m512i mag = _mm512_and_si512(c, _mm512_set1_epi32(0x7F));
  __m512i bits = _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23));
  const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(1.0f / 512.0f));
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8)), _mm512_castps_si512(sub));
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F)),
                               _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(_mm512_or_si512(bits, _mm512_slli_epi32(_mm512_srli_epi32(c, 7), 31)));
}

// Bytes of W prefetched ahead of the dot product: the rows are one sequential stream, read once.
constexpr int64_t kPrefetchAhead = 4096;

// (2w + 12) of the low / high nibbles of 64 bytes of W. With VBMI, vpermb ignores index bits 6-7 and the
// table repeats every 16 bytes, so the nibbles need no masking.
template <bool kVbmi>
QC_AVX512VNNI inline __m512i low_weights(__m512i v, __m512i lut, __m512i low4) {
  return kVbmi ? _mm512_permutexvar_epi8(v, lut) : _mm512_shuffle_epi8(lut, _mm512_and_si512(v, low4));
}
template <bool kVbmi>
QC_AVX512VNNI inline __m512i high_weights(__m512i v, __m512i lut, __m512i low4) {
  const __m512i h = _mm512_srli_epi16(v, 4);
  return kVbmi ? _mm512_permutexvar_epi8(h, lut) : _mm512_shuffle_epi8(lut, _mm512_and_si512(h, low4));
}

// sum over the row of w * x̂: the row's codes, its scale codes sc[0..ng), xr.hs with tensor_scale folded in.
template <bool kVbmi>
QC_AVX512VNNI float row_dot_avx512(const uint8_t* row, int64_t row_bytes, const uint8_t* sc, int64_t ng,
                                   ScaleFormat fmt, int gshift16, const Int8Row& xr) {
  const __m512i lut = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kWeightBytes)));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lidx0 = _mm512_srli_epi32(lane, 1);                     // lane of chunk 0 -> its block
  const __m512i lidx1 = _mm512_add_epi32(lidx0, _mm512_set1_epi32(8));  // chunk 1
  const __m512i gidx0 = _mm512_srli_epi32(lane, gshift16);              // block -> group, first span
  const int64_t spans_per_vec = int64_t{1} << gshift16;                 // 16 groups cover G / 16 spans
  const __m512i gstep = _mm512_set1_epi32(16 >> gshift16);              // groups per span
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
  const int8_t* q = xr.q.data();
  const int64_t spans = xr.Kq / 256;
  __m512 sw = _mm512_setzero_ps();
  __m512i gidx = gidx0;
  for (int64_t s = 0, off = 0; s < spans; ++s, off += 128, q += 256) {
    if ((s & (spans_per_vec - 1)) == 0) {
      const int64_t g0 = (s * 16) >> gshift16;
      sw = decode_scales16(sc + g0, ng - g0, fmt);
      gidx = gidx0;
    } else {
      gidx = _mm512_add_epi32(gidx, gstep);
    }
    const __m512 comb = _mm512_mul_ps(_mm512_permutexvar_ps(gidx, sw), _mm512_loadu_ps(xr.hs.data() + 16 * s));
    const int32_t* corr = xr.unit12.data() + 32 * s;  // -12 Q per 8 positions: the sums start from it
    _mm_prefetch(reinterpret_cast<const char*>(row + off + kPrefetchAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(row + off + kPrefetchAhead + 64), _MM_HINT_T0);
    __m512i v0, v1;
    if (off + 128 <= row_bytes) {
      v0 = _mm512_loadu_si512(row + off);
      v1 = _mm512_loadu_si512(row + off + 64);
    } else {  // the row's last bytes: masked loads, zero past its end
      const int64_t n0 = std::max<int64_t>(0, std::min<int64_t>(64, row_bytes - off));
      const int64_t n1 = std::max<int64_t>(0, std::min<int64_t>(64, row_bytes - off - 64));
      v0 = _mm512_maskz_loadu_epi8(n0 == 64 ? ~__mmask64{0} : (__mmask64{1} << n0) - 1, row + off);
      v1 = _mm512_maskz_loadu_epi8(n1 == 64 ? ~__mmask64{0} : (__mmask64{1} << n1) - 1, row + off + 64);
    }
    __m512i d0 = _mm512_dpbusd_epi32(_mm512_loadu_si512(corr), low_weights<kVbmi>(v0, lut, low4), _mm512_loadu_si512(q));
    d0 = _mm512_dpbusd_epi32(d0, high_weights<kVbmi>(v0, lut, low4), _mm512_loadu_si512(q + 64));
    __m512i d1 = _mm512_dpbusd_epi32(_mm512_loadu_si512(corr + 16), low_weights<kVbmi>(v1, lut, low4),
                                     _mm512_loadu_si512(q + 128));
    d1 = _mm512_dpbusd_epi32(d1, high_weights<kVbmi>(v1, lut, low4), _mm512_loadu_si512(q + 192));
    acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_permutexvar_ps(lidx0, comb), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_permutexvar_ps(lidx1, comb), acc1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

QC_AVX2 float row_dot_avx2(const uint8_t* row, int64_t row_bytes, const float* sw, int gshift16, const Int8Row& xr) {
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kWeightBytes)));
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i gidx = _mm256_srli_epi32(lane, gshift16);
  const __m256i lidx0 = _mm256_srli_epi32(lane, 1), lidx1 = _mm256_add_epi32(lidx0, _mm256_set1_epi32(4));
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, corr = acc0;
  const int8_t* q = xr.q.data();
  alignas(32) uint8_t pad[64];
  for (int64_t s = 0, off = 0; s < xr.Kq / 128; ++s, off += 64, q += 128) {
    const __m256 comb = _mm256_mul_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(sw + ((s * 8) >> gshift16)), gidx),
                                      _mm256_loadu_ps(xr.hs.data() + 8 * s));
    corr = _mm256_fmadd_ps(comb, _mm256_loadu_ps(xr.q12.data() + 8 * s), corr);
    _mm_prefetch(reinterpret_cast<const char*>(row + off + kPrefetchAhead), _MM_HINT_T0);
    const uint8_t* src = row + off;
    if (off + 64 > row_bytes) {  // the row's last bytes through a zero-padded copy
      std::memset(pad, 0, sizeof pad);
      if (row_bytes > off) std::memcpy(pad, row + off, static_cast<size_t>(row_bytes - off));
      src = pad;
    }
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
    const __m256i* qv = reinterpret_cast<const __m256i*>(q);
    // pairs of (2w + 12) q: at most 2 * 24 * 127, so the int16 sums of vpmaddubsw never saturate
    const __m256i p0 = _mm256_add_epi16(
        _mm256_maddubs_epi16(_mm256_shuffle_epi8(lut, _mm256_and_si256(v0, low4)), _mm256_loadu_si256(qv)),
        _mm256_maddubs_epi16(_mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4)),
                             _mm256_loadu_si256(qv + 1)));
    const __m256i p1 = _mm256_add_epi16(
        _mm256_maddubs_epi16(_mm256_shuffle_epi8(lut, _mm256_and_si256(v1, low4)), _mm256_loadu_si256(qv + 2)),
        _mm256_maddubs_epi16(_mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4)),
                             _mm256_loadu_si256(qv + 3)));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p0, ones)), _mm256_permutevar8x32_ps(comb, lidx0),
                           acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p1, ones)), _mm256_permutevar8x32_ps(comb, lidx1),
                           acc1);
  }
  return simd::hsum(_mm256_add_ps(acc0, acc1)) - simd::hsum(corr);
}

// Row n the reference's way: dequantized weight (float64) times x̂, for outputs the rearranged sum left
// non-finite (an Inf scale times a zero dot product, Inf - Inf in the 12 Q_b correction, an overflow).
double reference_row(const Problem& p, const Geometry& g, int64_t n, const float* xhat) {
  const Tables& t = tables();
  const float* lut = p.attrs.scale_format == ScaleFormat::kE8M0 ? t.e8m0 : t.e4m3;
  const uint8_t* row = p.w + n * g.row_bytes;
  const uint8_t* sc = p.scales + n * g.ng;
  double acc = 0.0;
  for (int64_t k = 0; k < g.K; ++k) {
    const uint8_t b = row[k / 2];
    const double w = static_cast<double>(t.e2m1[k & 1 ? b >> 4 : b & 15]) * static_cast<double>(lut[sc[k >> g.gshift]]) *
                     static_cast<double>(p.tensor_scale);
    acc += w * static_cast<double>(xhat[k]);
  }
  return acc;
}

#endif  // QC_X86

}  // namespace

bool int8_gemv_available(const Attrs& a) {
  return a.accuracy_level == kAccuracyInt8 && a.group_size >= 16 && int8_isa() != Isa::kNone;
}

Status run_gemv_int8(const Problem& p, const Geometry& g, const float* xrot, const Parallel& par, bool* ran) {
  *ran = false;
#if QC_X86
  const Isa isa = int8_isa();
  thread_local Int8Row xr;
  xr.chunk = isa == Isa::kAvx512 ? 128 : 64;
  const int64_t span = 2 * xr.chunk;
  xr.Kq = (g.Kp + span - 1) / span * span;
  const int64_t blocks = xr.Kq / act_quant::kBlock;
  thread_local std::vector<float> xpad;
  thread_local std::vector<int8_t> qnat;
  xpad.assign(static_cast<size_t>(xr.Kq), 0.f);
  std::memcpy(xpad.data(), xrot, static_cast<size_t>(g.K) * sizeof(float));
  qnat.resize(static_cast<size_t>(xr.Kq));
  xr.hs.assign(static_cast<size_t>(blocks + 16), 0.f);
  xr.q12.assign(static_cast<size_t>(blocks + 16), 0.f);
  if (!act_quant::quantize(xpad.data(), xr.Kq, qnat.data(), xr.hs.data())) return Status::OK();  // non-finite
  xr.xhat.resize(static_cast<size_t>(g.K));
  for (int64_t k = 0; k < g.K; ++k) xr.xhat[k] = xr.hs[k / act_quant::kBlock] * static_cast<float>(qnat[k]);
  for (int64_t b = 0; b < blocks; ++b) {
    int32_t sum = 0;
    for (int64_t i = 0; i < act_quant::kBlock; ++i) sum += qnat[b * act_quant::kBlock + i];
    xr.q12[b] = 12.0f * static_cast<float>(sum);
    // the AVX-512 form decodes scale codes in registers, without tensor_scale: fold it in here
    xr.hs[b] *= isa == Isa::kAvx512 ? 0.5f * p.tensor_scale : 0.5f;
  }
  xr.unit12.resize(static_cast<size_t>(xr.Kq / 8));
  for (int64_t u = 0; u < xr.Kq / 8; ++u) {
    int32_t sum = 0;
    for (int64_t i = 0; i < 8; ++i) sum += qnat[u * 8 + i];
    xr.unit12[u] = -12 * sum;
  }
  xr.q.resize(static_cast<size_t>(xr.Kq));
  const int64_t half = xr.chunk / 2;
  for (int64_t c0 = 0; c0 < xr.Kq; c0 += xr.chunk)
    for (int64_t i = 0; i < half; ++i) {
      xr.q[c0 + i] = qnat[c0 + 2 * i];
      xr.q[c0 + half + i] = qnat[c0 + 2 * i + 1];
    }
  int gshift16 = 0;
  while ((int64_t{16} << gshift16) < g.G) ++gshift16;
  const int64_t sw_len = xr.Kq / g.G + 16;
  const bool vbmi = cpu_has_avx512vbmi();
  const int64_t rows_per_task = std::max<int64_t>(1, std::min(65536 / g.Kx, (g.N + 15) / 16));
  const int64_t tasks = (g.N + rows_per_task - 1) / rows_per_task;
  const Int8Row& x = xr;  // the calling thread's buffers, shared with the tasks
  *ran = true;
  return tile::run_tasks(par, tasks, kOp, [&](int64_t task) {
    TaskScratch& s = task_scratch();
    s.scales.assign(static_cast<size_t>(std::max(sw_len, g.scale_len)), 0.f);
    const int64_t n0 = task * rows_per_task, n1 = std::min(g.N, n0 + rows_per_task);
    s.out.resize(static_cast<size_t>(n1 - n0));
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = p.w + n * g.row_bytes;
      float v;
      if (isa == Isa::kAvx512) {
        v = (vbmi ? row_dot_avx512<true> : row_dot_avx512<false>)(row, g.row_bytes, p.scales + n * g.ng, g.ng, p.attrs.scale_format, gshift16, x);
      } else {
        decode_scales(p, g, n, s.scales.data(), true);
        v = row_dot_avx2(row, g.row_bytes, s.scales.data(), gshift16, x);
      }
      if (!std::isfinite(v)) v = static_cast<float>(reference_row(p, g, n, x.xhat.data()));
      s.out[n - n0] = v;
    }
    store_row(p, 0, n0, n1 - n0, s.out.data());
  });
#else
  (void)p, (void)g, (void)xrot, (void)par;
  return Status::OK();
#endif
}

}  // namespace detail
}  // namespace fp4
}  // namespace qcompile
