// CUDA kernels for qcompile.SpQRMatMul (contract: include/qcompile/spqr_matmul.h, docs/ops.md).
//
// M <= 8: GEMV, one warp per output row. Lane l takes 32-code chunks l, l+32, ...: it loads the chunk's
//         `bits` words (consecutive lanes read consecutive chunks: coalesced), decodes each half-chunk's
//         group statistics, dequantizes and accumulates against up to 8 rows of X read through the
//         permutation; the row's CSR outliers are spread over the lanes; a warp shuffle reduces.
// M > 8:  cuda::tile_loop (tile_loop.cuh) over 64x64 output tiles, K walked one 32-code chunk at a time: X
//         (gathered through perm) and the dequantized W chunk are staged in shared memory; each thread then
//         adds its rows' outliers and the bias.
// Every index read from the model is clamped or skipped when out of range, so even unvalidated tensors
// cannot cause an out-of-bounds read (the adapter validates them anyway, see validate_indices_cuda).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "common.cuh"
#include "qcompile/spqr_matmul.h"
#include "tile_loop.cuh"

namespace qcompile {
namespace spqr {
namespace {

using cuda::from_f;
using cuda::to_f;

__device__ __forceinline__ float h2f(uint16_t v) { return __half2float(__ushort_as_half(v)); }

// Activation at stored position p of row m (0 past K or for an out-of-range perm entry).
template <typename T>
__device__ __forceinline__ float x_stored(const T* x, int64_t m, int64_t K, const Weights& w, int64_t p) {
  if (p >= K) return 0.f;
  const int64_t f = w.perm ? perm_at(w, p) : p;
  if (f < 0 || f >= K) return 0.f;
  return to_f(x[m * K + f]);
}

// Scale and zero of group g of row n.
__device__ __forceinline__ void group_stats(const Attrs& a, const Weights& w, int64_t n, int64_t g, float* scale,
                                            float* zero) {
  const int64_t G = a.groups();
  const uint32_t* srow = w.stat_codes + n * 2 * a.stat_words();
  uint32_t sc, zc;
  stat_codes_at(a, srow, g, &sc, &zc);
  const uint16_t* sp = w.stat_params + (n / a.stat_group) * 4 * G;
  *scale = (float)sc * h2f(sp[g]) + h2f(sp[G + g]);
  *zero = (float)zc * h2f(sp[2 * G + g]) + h2f(sp[3 * G + g]);
}

// Clamped CSR range of row n.
__device__ __forceinline__ void row_range(const Weights& w, int64_t n, int64_t* s, int64_t* e) {
  int64_t a = row_offset(w, n), b = row_offset(w, n + 1);
  a = a < 0 ? 0 : (a > w.nnz ? w.nnz : a);
  b = b < a ? a : (b > w.nnz ? w.nnz : b);
  *s = a;
  *e = b;
}

template <typename T, int MT, int BITS>
__global__ void gemv_kernel(Attrs a, Weights w, int64_t M, const T* __restrict__ x, const T* __restrict__ bias,
                            T* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t n = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (n >= a.N) return;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  const uint32_t* row = w.codes + n * a.code_words();
  const int64_t chunks = a.chunks();
  for (int64_t c = lane; c < chunks; c += 32) {
    uint32_t words[BITS];
    const uint32_t* wp = row + c * BITS;
#pragma unroll
    for (int i = 0; i < BITS; ++i) words[i] = __ldg(wp + i);
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // group_size is a multiple of 16: a half-chunk lies in one group
      const int64_t p0 = c * 32 + 16 * h;
      if (p0 >= a.K) break;
      float scale, zero;
      group_stats(a, w, n, p0 / a.group_size, &scale, &zero);
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        if (p0 + i >= a.K) break;  // padding codes: contribute nothing (even with non-finite stats)
        const float wv = scale * ((float)bits_at(words, 16 * h + i, BITS) - zero);
#pragma unroll
        for (int m = 0; m < MT; ++m)
          if (m < M) acc[m] += wv * x_stored(x, m, a.K, w, p0 + i);
      }
    }
  }
  int64_t s, e;
  row_range(w, n, &s, &e);
  for (int64_t o = s + lane; o < e; o += 32) {
    const int64_t col = col_at(w, o);
    if (col < 0 || col >= a.K) continue;
    const float v = h2f(w.values[o]);
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < M) acc[m] += v * to_f(x[m * a.K + col]);
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0 && m < M) from_f(y + m * a.N + n, v + (bias ? to_f(bias[n]) : 0.f));
  }
}

// Prefill (cuda::tile_loop): X gathered through perm, W dequantized 8 codes (one group) per thread; then
// each thread adds its rows' outliers and the bias. (At least 4 blocks per SM: 64 registers, the budget
// this kernel had before it shared the loop; unbounded, ptxas takes 76 and fits one block fewer.)
template <typename T>
__global__ void __launch_bounds__(cuda::kTileThreads, 4)
    tiled_kernel(Attrs a, Weights w, int64_t M, const T* __restrict__ x, const T* __restrict__ bias,
                 T* __restrict__ y) {
  __shared__ cuda::TileSmem smem;
  const int64_t m0 = (int64_t)blockIdx.y * cuda::kTileM, n0 = (int64_t)blockIdx.x * cuda::kTileN;
  float acc[cuda::kThreadM][cuda::kThreadN];
  const auto x_at = [&](int64_t m, int64_t p) { return x_stored(x, m, a.K, w, p); };
  // each thread dequantizes 8 codes: row r, codes 8q..8q+7 of this chunk (one group)
  const auto stage_w = [&](int64_t p0, float (&ws)[cuda::kTileK][cuda::kTileN + 1]) {
    const int r = threadIdx.x / 4, q = threadIdx.x % 4;
    const int64_t n = n0 + r, pq = p0 + 8 * q;
    float vals[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) vals[i] = 0.f;
    if (n < a.N && pq < a.K) {
      float scale, zero;
      group_stats(a, w, n, pq / a.group_size, &scale, &zero);
      const uint32_t* row = w.codes + n * a.code_words();
#pragma unroll
      for (int i = 0; i < 8; ++i) vals[i] = pq + i < a.K ? scale * ((float)code_at(row, pq + i, a.bits) - zero) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) ws[8 * q + i][r] = vals[i];
  };
  static_assert(cuda::kTileK == kChunk, "a K step is one 32-code chunk");
  cuda::tile_loop<8>(smem, M, a.K, m0, x_at, stage_w, acc);
  const int tm = cuda::tile_m(), tn = cuda::tile_n();
#pragma unroll
  for (int j = 0; j < cuda::kThreadN; ++j) {
    const int64_t n = n0 + tn * cuda::kThreadN + j;
    if (n >= a.N) continue;
    int64_t s, e;
    row_range(w, n, &s, &e);
    for (int64_t o = s; o < e; ++o) {
      const int64_t col = col_at(w, o);
      if (col < 0 || col >= a.K) continue;
      const float v = h2f(w.values[o]);
#pragma unroll
      for (int i = 0; i < cuda::kThreadM; ++i) {
        const int64_t m = m0 + tm * cuda::kThreadM + i;
        if (m < M) acc[i][j] += v * to_f(x[m * a.K + col]);
      }
    }
  }
  cuda::tile_store(M, a.N, m0, n0, acc, [&](int64_t m, int64_t n, float v) {
    from_f(y + m * a.N + n, v + (bias ? to_f(bias[n]) : 0.f));
  });
}

template <typename T, int BITS>
void launch_gemv(const Problem& p, const T* x, const T* bias, T* y, cudaStream_t stream) {
  const int warps = 8;  // rows per block
  const dim3 grid((unsigned)((p.attrs.N + warps - 1) / warps));
  const dim3 block(32 * warps);
  if (p.M == 1)
    gemv_kernel<T, 1, BITS><<<grid, block, 0, stream>>>(p.attrs, p.w, p.M, x, bias, y);
  else if (p.M == 2)
    gemv_kernel<T, 2, BITS><<<grid, block, 0, stream>>>(p.attrs, p.w, p.M, x, bias, y);
  else if (p.M <= 4)
    gemv_kernel<T, 4, BITS><<<grid, block, 0, stream>>>(p.attrs, p.w, p.M, x, bias, y);
  else
    gemv_kernel<T, 8, BITS><<<grid, block, 0, stream>>>(p.attrs, p.w, p.M, x, bias, y);
}

template <typename T>
Status launch(const Problem& p, cudaStream_t stream) {
  const Attrs& a = p.attrs;
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  if (p.M <= 8) {
    if (a.bits == 4) {
      launch_gemv<T, 4>(p, x, bias, y, stream);
    } else {
      launch_gemv<T, 3>(p, x, bias, y, stream);
    }
  } else {
    const int64_t gy = (p.M + cuda::kTileM - 1) / cuda::kTileM;
    if (gy > 65535)
      return Status::Error("SpQRMatMul: too many rows of X for one CUDA launch (M=" + std::to_string(p.M) + ")");
    const dim3 grid((unsigned)((a.N + cuda::kTileN - 1) / cuda::kTileN), (unsigned)gy);
    tiled_kernel<T><<<grid, cuda::kTileThreads, 0, stream>>>(a, p.w, p.M, x, bias, y);
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return Status::Error(std::string("SpQRMatMul: CUDA launch failed: ") + cudaGetErrorString(e));
  return Status::OK();
}

}  // namespace

Status matmul_cuda(const Problem& p, void* stream) {
  if (p.M <= 0) return Status::OK();
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return p.dtype == DType::kFloat16 ? launch<uint16_t>(p, s) : launch<float>(p, s);
}

Status validate_indices_cuda(const Attrs& a, const Weights& dw, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // host copies, byte for byte (each index tensor is int16 or int32)
  std::vector<unsigned char> ro(((size_t)a.N + 1) * (dw.offsets_int16 ? 2 : 4));
  std::vector<unsigned char> perm(dw.perm ? (size_t)a.K * (dw.perm_int16 ? 2 : 4) : 0);
  std::vector<unsigned char> cols((size_t)dw.nnz * (dw.col_int16 ? 2 : 4));
  cudaError_t e = cudaMemcpyAsync(ro.data(), dw.row_offsets, ro.size(), cudaMemcpyDeviceToHost, s);
  if (e == cudaSuccess && !cols.empty())
    e = cudaMemcpyAsync(cols.data(), dw.col_indices, cols.size(), cudaMemcpyDeviceToHost, s);
  if (e == cudaSuccess && dw.perm) e = cudaMemcpyAsync(perm.data(), dw.perm, perm.size(), cudaMemcpyDeviceToHost, s);
  if (e == cudaSuccess) e = cudaStreamSynchronize(s);
  if (e != cudaSuccess)
    return Status::Error(std::string("SpQRMatMul: reading the outlier table from the GPU failed: ") +
                         cudaGetErrorString(e));
  Weights hw = dw;
  hw.row_offsets = ro.data();
  hw.col_indices = cols.data();
  hw.perm = dw.perm ? perm.data() : nullptr;
  return validate_indices(a, hw);
}

}  // namespace spqr
}  // namespace qcompile
