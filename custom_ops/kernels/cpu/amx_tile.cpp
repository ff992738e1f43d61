// AMX-BF16 multiplication of the prefill tiles (amx_tile.h).
#include "amx_tile.h"

#include <algorithm>
#include <cstring>
#include <new>

#include "qcompile/cpu_features.h"

#if QC_X86 && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define QC_AMX_BUILD 1
#define QC_AMX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))
#else
#define QC_AMX_BUILD 0
#endif

namespace qcompile {
namespace tile {
namespace amx {

#if QC_AMX_BUILD
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an extended state component
constexpr int kXfeatureXtileData = 18;     // the tile data component
// Largest magnitude split into bf16 parts: far from FLT_MAX, so rounding up to bf16 never overflows.
constexpr float kSplitLimit = 1.329228e36f;  // 2^120

uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

// The palette-1 tile configuration (64 bytes, the layout LDTILECFG reads).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// bf16 bits (in the low 16 bits of each lane) of finite fp32 values, rounded to nearest even.
QC_AMX inline __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
}

// v − float(bf16 bits h): the exact remainder the bf16 high part leaves.
QC_AMX inline __m512 remainder(__m512 v, __m512i h) {
  return _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
}

// Lanes that must not be split (NaN, ±Inf, |v| ≥ 2^120).
QC_AMX inline __mmask16 unsplittable(__m512 v) {
  return _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(kSplitLimit), _CMP_NLT_UQ);
}

// The tile's rows as bf16 high parts and remainders (vcvtne2ps2bf16: 32 weights per conversion), each row
// 32-position steps of 16 words (pairs) at a stride of `ld` words; positions past len are zero. False when a
// weight cannot be split; *any_lo: a remainder is not zero (otherwise every weight is exact in bf16 and the
// lo·hi product can be skipped).
QC_AMX bool split_tile(const float* tile, int64_t ldw, int64_t nc, int64_t len, int64_t lenpad, uint32_t* hi,
                       uint32_t* lo, int64_t ld, bool* any_lo) {
  __mmask16 bad = 0;
  __m512i lo_bits = _mm512_setzero_si512();
  for (int64_t r = 0; r < nc; ++r) {
    const float* src = tile + r * ldw;
    uint32_t* h32 = hi + r * ld;
    uint32_t* l32 = lo + r * ld;
    for (int64_t k = 0; k < lenpad; k += 32) {
      __m512 v0, v1;
      if (k + 32 <= len) {
        v0 = _mm512_loadu_ps(src + k);
        v1 = _mm512_loadu_ps(src + k + 16);
      } else {
        const int64_t left0 = std::clamp<int64_t>(len - k, 0, 16), left1 = std::clamp<int64_t>(len - k - 16, 0, 16);
        v0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << left0) - 1), src + k);
        v1 = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << left1) - 1), src + k + 16);
      }
      bad |= unsplittable(v0) | unsplittable(v1);
      const __m512i h = (__m512i)(_mm512_cvtne2ps_pbh(v1, v0));
      const __m512 h0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
      const __m512 h1 =
          _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
      const __m512i l =
          (__m512i)(_mm512_cvtne2ps_pbh(_mm512_sub_ps(v1, h1), _mm512_sub_ps(v0, h0)));
      lo_bits = _mm512_or_si512(lo_bits, l);
      _mm512_store_si512(h32 + k / 2, h);
      _mm512_store_si512(l32 + k / 2, l);
    }
  }
  // a remainder of −0 (bits 0x8000) is still zero
  *any_lo = _mm512_test_epi16_mask(lo_bits, _mm512_set1_epi16(0x7fff)) != 0;
  return bad == 0;
}

// Where in x.data the B tile of X at block mb (16 rows), step `step` (32 positions) starts: its high parts;
// the remainders follow 256 words later (XPack's layout).
inline int64_t x_tile(const XPack& x, int64_t mb, int64_t step) {
  return ((mb / 2 * (x.Kpad / 32) + step) * 2 + mb % 2) * 512;
}
constexpr int64_t kXStep = 1024;  // words from a block's tiles at one step to the next step's (two blocks × hi, lo)

// C tile t: the accumulators at c (row stride cs bytes), or zeros for the first K slice. (A macro: the tile
// intrinsics take the register number as a literal.)
#define QC_TILE_C_BEGIN(t, c, cs, accumulate) \
  do {                                        \
    if (accumulate) _tile_loadd(t, c, cs);    \
    else _tile_zero(t);                       \
  } while (0)

// The kernels below walk `steps` steps of 32 positions. Tile registers: C accumulators, A the split weights
// (rows of W; hi and lo parts), B the activations (hi at x, lo at x + 256). Each B tile is loaded once per
// step and feeds every A tile in registers: loads from L2, not the tile instructions, bound these loops, so
// the kernels hold as many weight rows as the eight registers allow.

// Up to 16 rows of W, one or two blocks of X (c0, c1): C 0, 1; A 2 (hi), 3 (lo); B 4, 5 (first block),
// 6, 7 (second block).
template <bool kTwo, bool kLo>
QC_AMX void rows16(const uint32_t* wh, const uint32_t* wl, int64_t ld, const uint32_t* x0, const uint32_t* x1,
                   int64_t steps, float* c0, float* c1, int64_t ldc, bool accumulate) {
  const int64_t cs = ldc * 4, ws = ld * 4;
  QC_TILE_C_BEGIN(0, c0, cs, accumulate);
  if (kTwo) QC_TILE_C_BEGIN(1, c1, cs, accumulate);
  for (int64_t s = 0; s < steps; ++s, x0 += kXStep, x1 += kXStep) {
    _tile_loadd(2, wh + 16 * s, ws);
    if (kLo) _tile_loadd(3, wl + 16 * s, ws);
    _tile_loadd(4, x0, 64);
    _tile_loadd(5, x0 + 256, 64);
    _tile_dpbf16ps(0, 2, 4);
    _tile_dpbf16ps(0, 2, 5);
    if (kLo) _tile_dpbf16ps(0, 3, 4);
    if (kTwo) {
      _tile_loadd(6, x1, 64);
      _tile_loadd(7, x1 + 256, 64);
      _tile_dpbf16ps(1, 2, 6);
      _tile_dpbf16ps(1, 2, 7);
      if (kLo) _tile_dpbf16ps(1, 3, 6);
    }
  }
  _tile_stored(0, c0, cs);
  if (kTwo) _tile_stored(1, c1, cs);
}

// 17 to 32 rows of W exact in bf16 (no lo part), one or two blocks of X: C 0, 1 (rows 0-15 × the blocks),
// 2, 3 (rows 16 on); A 4 (rows 0-15), 5 (rows 16 on); B 6 (hi), 7 (lo), reloaded per block.
template <bool kTwo>
QC_AMX void rows32_exact(const uint32_t* wh, int64_t ld, const uint32_t* x0, const uint32_t* x1, int64_t steps,
                         float* c, int64_t ldc, bool accumulate) {
  const int64_t cs = ldc * 4, ws = ld * 4;
  float* c10 = c + 16 * ldc;
  QC_TILE_C_BEGIN(0, c, cs, accumulate);
  QC_TILE_C_BEGIN(2, c10, cs, accumulate);
  if (kTwo) {
    QC_TILE_C_BEGIN(1, c + 16, cs, accumulate);
    QC_TILE_C_BEGIN(3, c10 + 16, cs, accumulate);
  }
  const uint32_t* wh1 = wh + 16 * ld;
  for (int64_t s = 0; s < steps; ++s, x0 += kXStep, x1 += kXStep) {
    _tile_loadd(4, wh + 16 * s, ws);
    _tile_loadd(5, wh1 + 16 * s, ws);
    _tile_loadd(6, x0, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    _tile_loadd(7, x0 + 256, 64);
    _tile_dpbf16ps(0, 4, 7);
    _tile_dpbf16ps(2, 5, 7);
    if (kTwo) {
      _tile_loadd(6, x1, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(3, 5, 6);
      _tile_loadd(7, x1 + 256, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, cs);
  _tile_stored(2, c10, cs);
  if (kTwo) {
    _tile_stored(1, c + 16, cs);
    _tile_stored(3, c10 + 16, cs);
  }
}

// 17 to 32 rows of split W, one block of X: C 0 (rows 0-15), 1 (rows 16 on); A 2, 3 (hi, lo of rows 0-15),
// 4, 5 (rows 16 on); B 6 (hi), 7 (lo).
QC_AMX void rows32_split(const uint32_t* wh, const uint32_t* wl, int64_t ld, const uint32_t* x0, int64_t steps,
                         float* c, int64_t ldc, bool accumulate) {
  const int64_t cs = ldc * 4, ws = ld * 4;
  float* c1 = c + 16 * ldc;
  QC_TILE_C_BEGIN(0, c, cs, accumulate);
  QC_TILE_C_BEGIN(1, c1, cs, accumulate);
  const uint32_t* wh1 = wh + 16 * ld;
  const uint32_t* wl1 = wl + 16 * ld;
  for (int64_t s = 0; s < steps; ++s, x0 += kXStep) {
    _tile_loadd(2, wh + 16 * s, ws);
    _tile_loadd(3, wl + 16 * s, ws);
    _tile_loadd(4, wh1 + 16 * s, ws);
    _tile_loadd(5, wl1 + 16 * s, ws);
    _tile_loadd(6, x0, 64);
    _tile_dpbf16ps(0, 2, 6);
    _tile_dpbf16ps(0, 3, 6);
    _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    _tile_loadd(7, x0 + 256, 64);
    _tile_dpbf16ps(0, 2, 7);
    _tile_dpbf16ps(1, 4, 7);
  }
  _tile_stored(0, c, cs);
  _tile_stored(1, c1, cs);
}

}  // namespace

bool cpu_ready() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
    if (!amx_bf16 || !amx_tile || !cpu_has_avx512bw() || !__builtin_cpu_supports("avx512bf16")) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE
    if ((xcr0() & (uint64_t{3} << 17)) != (uint64_t{3} << 17)) return false;   // XTILECFG, XTILEDATA
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0;
  }();
  return ok;
}

QC_AMX static bool pack_x_amx(const float* xt, int64_t Kx, int64_t Mpad, XPack& out) {
  const int64_t Kpad = (Kx + 31) / 32 * 32, pairs = Kpad / 2, blocks = (Mpad + 15) / 16;
  const int64_t even = (blocks + 1) / 2 * 2;  // whole pairs of blocks; an odd last one pairs with zeros
  out.Kpad = Kpad;
  out.data.resize(static_cast<size_t>(even * pairs * 32));
  __mmask16 bad = 0;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t mb = 0; mb < even; ++mb) {
    const float* src = xt + mb * Kx * 16;
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t k = 2 * p;
      const __m512 v0 = mb < blocks && k < Kx ? _mm512_loadu_ps(src + k * 16) : zero;
      const __m512 v1 = mb < blocks && k + 1 < Kx ? _mm512_loadu_ps(src + (k + 1) * 16) : zero;
      bad |= unsplittable(v0) | unsplittable(v1);
      const __m512i h0 = bf16_bits(v0), h1 = bf16_bits(v1);
      const __m512i l0 = bf16_bits(remainder(v0, h0)), l1 = bf16_bits(remainder(v1, h1));
      uint32_t* hi = out.data.data() + x_tile(out, mb, p / 16) + (p % 16) * 16;
      _mm512_store_si512(hi, _mm512_or_si512(h0, _mm512_slli_epi32(h1, 16)));
      _mm512_store_si512(hi + 256, _mm512_or_si512(l0, _mm512_slli_epi32(l1, 16)));
    }
  }
  return bad == 0;
}

namespace {
thread_local XPack tls_pack;  // prepare_pack's: the calling thread's, read by the op's tasks on other threads
}  // namespace

const XPack* prepare_pack(int64_t accuracy_level, int64_t rows, const float* xt, int64_t Kx, int64_t Mpad) {
  if (!enabled(accuracy_level, rows)) return nullptr;
  try {
    return pack_x_amx(xt, Kx, Mpad, tls_pack) ? &tls_pack : nullptr;
  } catch (const std::bad_alloc&) {  // the FMA kernels need no pack
    return nullptr;
  }
}

void release_pack() {
  if (tls_pack.data.capacity() > (size_t{16} << 20)) CacheLineVector<uint32_t>().swap(tls_pack.data);
}

QC_AMX static bool multiply_amx(const float* tile, int64_t ldw, int64_t nc, const XPack& x, int64_t m0, int64_t m1,
                                int64_t k0, int64_t len, float* acc, int64_t ldc, bool accumulate) {
  const int64_t lenpad = (len + 31) / 32 * 32, steps = lenpad / 32, step0 = k0 / 32;
  const int64_t ld = lenpad / 2 + 16;  // words per split row: 64 bytes past the steps, off powers of two
  thread_local CacheLineVector<uint32_t> hi_buf, lo_buf;
  if (hi_buf.size() < static_cast<size_t>(nc * ld)) {
    hi_buf.resize(static_cast<size_t>(nc * ld));
    lo_buf.resize(hi_buf.size());
  }
  uint32_t* wh = hi_buf.data();
  uint32_t* wl = lo_buf.data();
  bool any_lo = false;
  if (!split_tile(tile, ldw, nc, len, lenpad, wh, wl, ld, &any_lo)) return false;

  // tiles 0-7 as the kernel below uses them (rows of each; every row 64 bytes)
  const int64_t r1 = nc - 16;
  const int64_t rows[3][8] = {{nc, nc, nc, nc, 16, 16, 16, 16},     // rows16
                              {16, r1, 16, 16, r1, r1, 16, 16},     // rows32_split
                              {16, 16, r1, r1, 16, r1, 16, 16}};    // rows32_exact
  const int64_t* kernel_rows = rows[nc <= 16 ? 0 : any_lo ? 1 : 2];
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = static_cast<uint8_t>(kernel_rows[t]);
  }
  _tile_loadconfig(&cfg);
  const uint32_t* xd = x.data.data();
  // blocks of X one at a time, or two where the kernel takes two and there are
  for (int64_t m = m0; m < m1;) {
    const int64_t mb = m / 16;
    const bool two = m1 - m > 16 && (nc <= 16 || !any_lo);  // a last block of fewer rows is zero past M
    const uint32_t* x0 = xd + x_tile(x, mb, step0);
    const uint32_t* x1 = two ? xd + x_tile(x, mb + 1, step0) : x0;
    float* c = acc + m;
    if (nc <= 16) {
      if (two && any_lo) rows16<true, true>(wh, wl, ld, x0, x1, steps, c, c + 16, ldc, accumulate);
      else if (two) rows16<true, false>(wh, wl, ld, x0, x1, steps, c, c + 16, ldc, accumulate);
      else if (any_lo) rows16<false, true>(wh, wl, ld, x0, x1, steps, c, c + 16, ldc, accumulate);
      else rows16<false, false>(wh, wl, ld, x0, x1, steps, c, c + 16, ldc, accumulate);
    } else if (any_lo) {
      rows32_split(wh, wl, ld, x0, steps, c, ldc, accumulate);
    } else if (two) {
      rows32_exact<true>(wh, ld, x0, x1, steps, c, ldc, accumulate);
    } else {
      rows32_exact<false>(wh, ld, x0, x1, steps, c, ldc, accumulate);
    }
    m += two ? 32 : 16;
  }
  _tile_release();
  return true;
}

bool multiply(const float* tile, int64_t ldw, int64_t nc, const XPack& x, int64_t m0, int64_t m1, int64_t k0,
              int64_t len, float* acc, int64_t ldc, bool accumulate) {
  return multiply_amx(tile, ldw, nc, x, m0, m1, k0, len, acc, ldc, accumulate);
}

#else  // no AMX in this build

bool cpu_ready() { return false; }
const XPack* prepare_pack(int64_t, int64_t, const float*, int64_t, int64_t) { return nullptr; }
void release_pack() {}
bool multiply(const float*, int64_t, int64_t, const XPack&, int64_t, int64_t, int64_t, int64_t, float*, int64_t,
              bool) {
  return false;
}

#endif

bool enabled(int64_t accuracy_level, int64_t rows) {
  if (rows < kMinRows || accuracy_level == 1 || !cpu_ready()) return false;
  const char* v = std::getenv("QCOMPILE_PREFILL_AMX");
  return !(v && v[0] == '0');
}

}  // namespace amx
}  // namespace tile
}  // namespace qcompile
