// The prefill tiles' multiplication on AMX (Intel Sapphire Rapids and later): the decoded fp32 tile and the
// activations, each split into a bf16 high part and a bf16 remainder, multiplied as three bf16 products
// (hi·hi + hi·lo + lo·hi) with fp32 accumulation by TDPBF16PS, one 16×16×32 multiply-add per instruction.
// At 4096 x 4096, M = 128 on one Xeon core this took the ops from 0.91-0.94x of fp32 MatMul's speed to
// 1.4-1.9x (docs/results.md).
//
// Accuracy (docs/ops.md, "Conventions"; numpy reference qcompile.formats.prefill_amx): each product x·w is
// computed as (xh + xl)(wh + wl) − xl·wl with |x − xh − xl| ≤ 2⁻¹⁶|x| (the same for w) and |xl·wl| about
// 2⁻¹⁶|x·w|, so an output is off its exact value by at most 2⁻¹⁴ Σ|x·w| (about 15 bits, like the batch-1
// fixed-point tables of the default level) plus fp32 accumulation. Weights exact in bf16 (FP4 codes times
// power-of-two or E4M3 scales) have no lo part, and their tiles skip the lo·hi product. Values whose split could
// overflow or is not defined (NaN, ±Inf, |v| ≥ 2¹²⁰) are never split: such activations keep the whole call, and
// such a tile its slice, on the fp32 FMA kernels, so non-finite data propagates exactly as there. AMX reads
// bf16 subnormals (below 2⁻¹²⁶) as zero.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace qcompile {
namespace tile {

// std::allocator with 64-byte alignment: buffers whose rows AMX loads and stores whole (the packed activations,
// the split weights, the ops' prefill accumulators); a row split over two cache lines halves the load speed.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using CacheLineVector = std::vector<T, CacheLineAllocator<T>>;

namespace amx {

// AMX-BF16 can run here: the CPU has AMX-TILE and AMX-BF16, the OS enabled tile state and granted this
// process its use (Linux asks once, arch_prctl ARCH_REQ_XCOMP_PERM). Checked once per process.
bool cpu_ready();

// Rows of X from which the AMX path pays: at 16 rows the weight split and the tile loads cost more than
// the FMA kernels' work, at 32 both take about as long, at 64 AMX is 1.3-1.4x faster (4096 x 4096, one
// thread, Xeon VM).
constexpr int64_t kMinRows = 32;

// The prefill tiles multiply on AMX: `rows` of X (at least kMinRows), cpu_ready(), accuracy_level is not 1
// (fp32 everywhere), and QCOMPILE_PREFILL_AMX (the tests' and benchmarks' switch) is not "0". Callers ask
// once per op call.
bool enabled(int64_t accuracy_level, int64_t rows);

// Rows of W a prefill tile holds where it multiplies on AMX: two A tiles of 16 rows share every load of the
// activations, the loads (not the tile instructions) being what bounds the multiplication.
constexpr int64_t kTileRows = 32;

// The activations in the layout of AMX's B operand: 1 KB tiles of 16 pairs of K positions × 16 rows of X, the
// rows' (x[2p], x[2p+1]) bf16 pairs; per block of 16 rows and step of 32 positions the high parts, then the
// remainders; ordered by pair of blocks, then step, then block, so a kernel's walk over K for one or two
// blocks reads consecutive memory (blocks all of K apart fell into the same cache sets); zero past K up to Kpad
// (K rounded up to 32) and past the last block up to a whole pair.
struct XPack {
  CacheLineVector<uint32_t> data;
  int64_t Kpad = 0;
};

// The calling thread's pack of xt ([⌈Mpad/16⌉][Kx][16] fp32, the FMA kernels' transposed activations, zero past
// M), for the op's tasks to read, where enabled(accuracy_level, rows); else null, also when an activation is
// NaN, ±Inf or of magnitude 2¹²⁰ or more, or the pack cannot be allocated: the call then stays on the FMA
// kernels. The pointer stays valid until release_pack() on this thread.
const XPack* prepare_pack(int64_t accuracy_level, int64_t rows, const float* xt, int64_t Kx, int64_t Mpad);

// After a call: frees this thread's pack where it holds more than 64 MB (a long prompt's), as the ops free
// their other per-thread buffers.
void release_pack();

// C^T[r][m] (+)= Σ_{k0 ≤ k < k0+len} tile[r][k − k0] · X[m][k] for the nc ≤ kTileRows rows of the decoded tile
// (row stride ldw floats) and the rows [m0, m1) of X (m0 a multiple of 16; a last block of fewer rows writes
// acc up to the next multiple of 16): acc[r * ldc + m], stored when
// `accumulate` is false. k0 is a multiple of 32. False, with acc untouched, when a weight of the tile cannot be
// split (see above): the caller multiplies that slice on the FMA kernels instead.
bool multiply(const float* tile, int64_t ldw, int64_t nc, const XPack& x, int64_t m0, int64_t m1, int64_t k0,
              int64_t len, float* acc, int64_t ldc, bool accumulate);

}  // namespace amx
}  // namespace tile
}  // namespace qcompile
