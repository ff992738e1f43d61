// CUDA kernels for qcompile.CodebookMatMul (AQLM additive codebooks, see docs/ops.md). All launches go on
// the caller's stream; everything accumulates in fp32.
//
//  * rows <= 8 (decode): GEMV, one warp per output channel. The codebooks (fp16, 8 KB for 2x8) are staged
//    in shared memory when they fit in 32 KB, else read through the read-only cache. Lane l handles
//    groups l, l+32, ...: it reads the group's M codes (contiguous across the warp), sums M codewords
//    (one 16-byte load each when d == 8) and dots the sum with every activation row, so W is decoded
//    once for the whole batch. A warp shuffle reduction finishes the row; scale and bias once per output.
//  * rows > 8 (prefill): decode-then-GEMM in one kernel, cuda::tile_loop (tile_loop.cuh) over 64x64 output
//    tiles; each K step of 32 decodes the matching 64x32 W tile (4 groups per channel) into shared memory.
// Every code index is clamped to codebook_size-1 before use, so a corrupt code can never read out of
// bounds; check_codes_cuda turns a bad code into an error before the matmul runs (the adapter calls it).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "common.cuh"
#include "qcompile/codebook_matmul.h"
#include "tile_loop.cuh"

namespace qcompile {
namespace codebook {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kMaxRows = 8;               // GEMV path serves up to this many X rows
constexpr int kSmemCodebookBytes = 32768;  // stage codebooks in shared memory up to this size

struct DevAttrs {
  int K, N, G, M, S, d;
  int rows;
};

using cuda::from_f;
using cuda::to_f;

template <typename C>
__device__ __forceinline__ int clamp_code(C c, int S) {
  const int v = static_cast<int>(c);
  return v < S ? v : S - 1;
}

// Copy the fp16 codebooks into shared memory (when they fit) with 16-byte loads where aligned.
__device__ void stage_codebooks(const __half* cb, __half* smem, int count) {
  const bool aligned = (reinterpret_cast<uintptr_t>(cb) & 15u) == 0 && (count % 8) == 0;
  if (aligned) {
    const uint4* src = reinterpret_cast<const uint4*>(cb);
    uint4* dst = reinterpret_cast<uint4*>(smem);
    for (int i = threadIdx.x; i < count / 8; i += blockDim.x) dst[i] = __ldg(src + i);
  } else {
    for (int i = threadIdx.x; i < count; i += blockDim.x) smem[i] = cb[i];
  }
  __syncthreads();
}

// Sum of the M codewords of one group, d == 8, into w[8].
template <typename C>
__device__ __forceinline__ void decode_group8(const C* cg, const __half* cb, int M, int S, float* w) {
#pragma unroll
  for (int j = 0; j < 8; ++j) w[j] = 0.0f;
  for (int m = 0; m < M; ++m) {
    const int c = clamp_code(cg[m], S);
    const uint4 raw = *reinterpret_cast<const uint4*>(cb + (static_cast<size_t>(m) * S + c) * 8);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(h[j]);
      w[2 * j] += f.x;
      w[2 * j + 1] += f.y;
    }
  }
}

// An infinite scale multiplies the weights, as in the reference (W = codeword sum · scale, then X @ Wᵀ), so
// that a zero codeword sum or ±Inf terms of both signs give NaN; a finite one multiplies the finished dot
// product. weight_factor · output_factor = scale, and one of them is 1 (exact).
__device__ __forceinline__ float weight_factor(float scale) { return isinf(scale) ? scale : 1.0f; }
__device__ __forceinline__ float output_factor(float scale) { return isinf(scale) ? 1.0f : scale; }

// Sums of the warp's share of row n of W (groups lane, lane + 32, ...) times up to R rows of X, each weight
// multiplied by wf first.
template <typename T, typename C, int R>
__device__ __forceinline__ void row_dots(const DevAttrs& a, const T* __restrict__ x, const C* row, const __half* cb,
                                         int lane, float wf, float (&acc)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  for (int g = lane; g < a.G; g += kWarp) {
    const C* cg = row + static_cast<size_t>(g) * a.M;
    if (a.d == 8) {
      float w[8];
      decode_group8(cg, cb, a.M, a.S, w);
#pragma unroll
      for (int j = 0; j < 8; ++j) w[j] *= wf;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < a.rows) {
          const T* xr = x + static_cast<size_t>(r) * a.K + g * 8;
          float s = 0.0f;
#pragma unroll
          for (int j = 0; j < 8; ++j) s += w[j] * to_f(xr[j]);
          acc[r] += s;
        }
      }
    } else {
      for (int j = 0; j < a.d; ++j) {
        float w = 0.0f;
        for (int m = 0; m < a.M; ++m)
          w += __half2float(cb[(static_cast<size_t>(m) * a.S + clamp_code(cg[m], a.S)) * a.d + j]);
        w *= wf;
#pragma unroll
        for (int r = 0; r < R; ++r)
          if (r < a.rows) acc[r] += w * to_f(x[static_cast<size_t>(r) * a.K + g * a.d + j]);
      }
    }
  }
}

template <typename T, typename S_T, typename C, int R>
__global__ void gemv_kernel(DevAttrs a, const T* __restrict__ x, const C* __restrict__ codes,
                            const __half* __restrict__ cb_global, const S_T* __restrict__ scales,
                            const T* __restrict__ bias, T* __restrict__ y, int smem_books) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const __half* cb = cb_global;
  if (smem_books) {
    __half* s = reinterpret_cast<__half*>(smem_raw);
    stage_codebooks(cb_global, s, a.M * a.S * a.d);
    cb = s;
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * kWarpsPerBlock + warp;
  if (n >= a.N) return;
  const C* row = codes + static_cast<size_t>(n) * a.G * a.M;
  const float scale = to_f(scales[n]);
  float acc[R];
  row_dots<T, C, R>(a, x, row, cb, lane, weight_factor(scale), acc);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float v = acc[r];
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0 && r < a.rows) {
      v *= output_factor(scale);
      if (bias) v += to_f(bias[n]);
      from_f(y + static_cast<size_t>(r) * a.N + n, v);
    }
  }
}

// Prefill (cuda::tile_loop): the W tile is decoded weight by weight (k -> group, position), the scale applied
// with the bias per output (an infinite one with the weights, see weight_factor).
template <typename T, typename S_T, typename C>
__global__ void tiled_kernel(DevAttrs a, const T* __restrict__ x, const C* __restrict__ codes,
                             const __half* __restrict__ cb, const S_T* __restrict__ scales,
                             const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ cuda::TileSmem smem;
  __shared__ float wfs[cuda::kTileN];  // weight_factor of the tile's output channels
  if (threadIdx.x < cuda::kTileN) {
    const int gn = blockIdx.x * cuda::kTileN + threadIdx.x;
    wfs[threadIdx.x] = gn < a.N ? weight_factor(to_f(scales[gn])) : 1.0f;
  }
  __syncthreads();
  // 32-bit indices: K, N and the rows of X are below 2^31 (checked before the launch)
  const int m0 = blockIdx.y * cuda::kTileM, n0 = blockIdx.x * cuda::kTileN;
  float acc[cuda::kThreadM][cuda::kThreadN];
  const auto x_at = [&](int m, int k) { return to_f(x[static_cast<size_t>(m) * a.K + k]); };
  const auto stage_w = [&](int k0, float (&ws)[cuda::kTileK][cuda::kTileN + 1]) {
    for (int i = threadIdx.x; i < cuda::kTileN * cuda::kTileK; i += cuda::kTileThreads) {
      const int c = i / cuda::kTileK, k = i % cuda::kTileK;
      const int gn = n0 + c, gk = k0 + k;
      float w = 0.0f;
      if (gn < a.N && gk < a.K) {
        const int g = gk / a.d, j = gk % a.d;
        const C* cg = codes + (static_cast<size_t>(gn) * a.G + g) * a.M;
        for (int m = 0; m < a.M; ++m)
          w += __half2float(cb[(static_cast<size_t>(m) * a.S + clamp_code(cg[m], a.S)) * a.d + j]);
      }
      ws[k][c] = w * wfs[c];
    }
  };
  cuda::tile_loop<4>(smem, a.rows, a.K, m0, x_at, stage_w, acc);
  cuda::tile_store(a.rows, a.N, m0, n0, acc, [&](int m, int n, float v) {
    v *= output_factor(to_f(scales[n]));
    if (bias) v += to_f(bias[n]);
    from_f(y + static_cast<size_t>(m) * a.N + n, v);
  });
}

template <typename C>
__global__ void check_kernel(const C* __restrict__ codes, size_t total, int S, unsigned int* bad) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    if (static_cast<int>(codes[i]) >= S) atomicOr(bad, 1u);
  }
}

Status cuda_status(cudaError_t e, const char* what) { return cuda::cuda_status(e, "CodebookMatMul", what); }

template <typename T, typename S_T, typename C>
Status launch(const Problem& p, const DevAttrs& a, cudaStream_t stream) {
  const T* x = static_cast<const T*>(p.x);
  const C* codes = static_cast<const C*>(p.codes);
  const __half* cb = reinterpret_cast<const __half*>(p.codebooks);
  const S_T* scales = static_cast<const S_T*>(p.scales);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  if (p.rows <= kMaxRows) {
    const size_t book_bytes = static_cast<size_t>(a.M) * a.S * a.d * sizeof(__half);
    const int smem = book_bytes <= static_cast<size_t>(kSmemCodebookBytes) ? 1 : 0;
    const dim3 grid((a.N + kWarpsPerBlock - 1) / kWarpsPerBlock);
    const size_t shared = smem ? book_bytes : 0;
    const int threads = kWarpsPerBlock * kWarp;
#define QC_GEMV(R) gemv_kernel<T, S_T, C, R><<<grid, threads, shared, stream>>>(a, x, codes, cb, scales, bias, y, smem)
    if (p.rows == 1) QC_GEMV(1);
    else if (p.rows == 2) QC_GEMV(2);
    else if (p.rows <= 4) QC_GEMV(4);
    else QC_GEMV(8);
#undef QC_GEMV
  } else {
    if ((p.rows + cuda::kTileM - 1) / cuda::kTileM > 65535)
      return Status::Error("CodebookMatMul (CUDA): too many rows in X");
    const dim3 grid((a.N + cuda::kTileN - 1) / cuda::kTileN, (p.rows + cuda::kTileM - 1) / cuda::kTileM);
    tiled_kernel<T, S_T, C><<<grid, cuda::kTileThreads, 0, stream>>>(a, x, codes, cb, scales, bias, y);
  }
  return cuda_status(cudaGetLastError(), "kernel launch");
}

template <typename T>
Status launch_scales(const Problem& p, const DevAttrs& a, cudaStream_t stream) {
  const bool u8 = p.code_type == CodeType::kUint8;
  if (p.scale_type == DType::kFloat16) {
    return u8 ? launch<T, __half, uint8_t>(p, a, stream) : launch<T, __half, uint16_t>(p, a, stream);
  }
  return u8 ? launch<T, float, uint8_t>(p, a, stream) : launch<T, float, uint16_t>(p, a, stream);
}

}  // namespace

Status matmul_cuda(const Problem& p, void* stream_ptr) {
  QCOMPILE_RETURN_IF_ERROR(validate_attrs(p.attrs));
  if (p.rows == 0) return Status::OK();
  if (p.rows > (int64_t{1} << 30)) return Status::Error("CodebookMatMul (CUDA): too many rows in X");
  if (p.attrs.in_group_size == 8 && (reinterpret_cast<uintptr_t>(p.codebooks) & 15u) != 0)
    return Status::Error("CodebookMatMul (CUDA): codebooks are not 16-byte aligned");
  DevAttrs a;
  a.K = static_cast<int>(p.attrs.K);
  a.N = static_cast<int>(p.attrs.N);
  a.d = static_cast<int>(p.attrs.in_group_size);
  a.G = a.K / a.d;
  a.M = static_cast<int>(p.attrs.num_codebooks);
  a.S = static_cast<int>(p.attrs.codebook_size);
  a.rows = static_cast<int>(p.rows);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  return p.dtype == DType::kFloat16 ? launch_scales<__half>(p, a, stream) : launch_scales<float>(p, a, stream);
}

Status check_codes_cuda(const Attrs& attrs, const void* codes, CodeType code_type, void* stream_ptr) {
  const bool u8 = code_type == CodeType::kUint8;
  if (u8 ? attrs.codebook_size >= 256 : attrs.codebook_size >= 65536) return Status::OK();  // full range
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const size_t total = static_cast<size_t>(attrs.N) * (attrs.K / attrs.in_group_size) * attrs.num_codebooks;
  unsigned int* flag = nullptr;
  QCOMPILE_RETURN_IF_ERROR(cuda_status(cudaMallocAsync(reinterpret_cast<void**>(&flag), sizeof(unsigned int), stream),
                                       "allocating the code-check flag"));
  unsigned int host = 0;
  cudaError_t e = cudaMemsetAsync(flag, 0, sizeof(unsigned int), stream);
  if (e == cudaSuccess) {
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<size_t>((total + threads - 1) / threads, 4096));
    if (u8) {
      check_kernel<uint8_t><<<blocks, threads, 0, stream>>>(static_cast<const uint8_t*>(codes), total,
                                                            static_cast<int>(attrs.codebook_size), flag);
    } else {
      check_kernel<uint16_t><<<blocks, threads, 0, stream>>>(static_cast<const uint16_t*>(codes), total,
                                                             static_cast<int>(attrs.codebook_size), flag);
    }
    e = cudaGetLastError();
  }
  if (e == cudaSuccess) e = cudaMemcpyAsync(&host, flag, sizeof(unsigned int), cudaMemcpyDeviceToHost, stream);
  const cudaError_t free_err = cudaFreeAsync(flag, stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  if (e == cudaSuccess) e = free_err;
  QCOMPILE_RETURN_IF_ERROR(cuda_status(e, "checking codes"));
  if (host != 0) {
    return Status::Error("CodebookMatMul: a code is out of range for codebook_size=" +
                         std::to_string(attrs.codebook_size));
  }
  return Status::OK();
}

}  // namespace codebook
}  // namespace qcompile
