// CUDA kernels for qcompile.FP4MatMul (see docs/ops.md). All launches go on the caller's stream.
//
//  * Hadamard: a shared-memory fast Walsh-Hadamard kernel rotates X (blocks of b along K) into a float
//    scratch buffer (Problem::scratch when the caller gives one, else stream-ordered cudaMallocAsync),
//    never touching the input.
//  * M <= 8 (decode): GEMV, one warp per output row. Lane l reads 32-bit words l, l+32, ... of the packed
//    row (a warp load is 128 contiguous bytes, four loads in flight per lane) so that the activations
//    it needs, 8 consecutive k per word, are also contiguous across the warp and come in as two 128-bit
//    loads; bytes decode through a 256-entry float2 table in shared memory (one lookup = two weights) and
//    the group scale is applied once per 8 weights. Each warp serves up to 8 activation rows, so W is
//    read once for the whole batch.
//  * M > 8 (prefill): cuda::tile_loop (tile_loop.cuh) over 64x64 output tiles; each K step decodes the 64x32
//    W tile (scales applied) into shared memory next to the X tile.
// Everything accumulates in fp32; fp16 inputs/outputs are converted at load/store.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.cuh"
#include "tile_loop.cuh"
#include "qcompile/fp4_matmul.h"

namespace qcompile {
namespace fp4 {
namespace {

using cuda::from_f;
using cuda::to_f;

constexpr int kWarp = 32;

__device__ __forceinline__ float e2m1_value(int c) {
  // magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}
  const int i = c & 7;
  const float mag = i < 4 ? 0.5f * i : (i < 6 ? (i - 2) * 1.0f : (i == 6 ? 4.0f : 6.0f));
  return (c & 8) ? -mag : mag;
}

__device__ __forceinline__ float decode_scale(uint32_t s, int e4m3) {
  if (!e4m3) {
    if (s == 255u) return __int_as_float(0x7fc00000);
    return s == 0u ? __int_as_float(0x00400000) : __int_as_float(static_cast<int>(s << 23));  // 2^(s-127)
  }
  const uint32_t e = (s >> 3) & 15u, m = s & 7u;
  float v;
  if (e == 15u && m == 7u) {
    v = __int_as_float(0x7fc00000);
  } else if (e == 0u) {
    v = static_cast<float>(m) * 0.001953125f;  // m/8 * 2^-6
  } else {
    v = __int_as_float(static_cast<int>(((e + 120u) << 23) | (m << 20)));
  }
  return (s & 0x80u) ? -v : v;
}

// 8 consecutive activations as floats: 128-bit loads when aligned, else scalar.
__device__ __forceinline__ void load8(const float* p, float* v) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) == 0) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = p[i];
  }
}
__device__ __forceinline__ void load8(const __half* p, float* v) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) == 0) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], 4);
      const float2 f = __half22float2(h);
      v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = __half2float(p[i]);
  }
}

__device__ __forceinline__ void fill_lut(float2* lut) {
  for (int i = threadIdx.x; i < 256; i += blockDim.x) lut[i] = make_float2(e2m1_value(i & 15), e2m1_value(i >> 4));
}

// ---- Hadamard ------------------------------------------------------------------------------------------
// One block = 256 consecutive elements of one row (K % b == 0 and b | 256, so a segment holds whole
// Hadamard blocks; the last segment of a row may be shorter but is still a multiple of b).
template <typename T>
__global__ void hadamard_kernel(const T* __restrict__ x, float* __restrict__ out, int64_t K, int64_t segs, int b,
                                float norm) {
  __shared__ float buf[256];
  const int64_t row = blockIdx.x / segs;
  const int64_t base = (blockIdx.x % segs) * 256;
  const int len = K - base < 256 ? static_cast<int>(K - base) : 256;
  const int t = threadIdx.x;  // 256 threads
  buf[t] = t < len ? to_f(x[row * K + base + t]) : 0.0f;
  __syncthreads();
  for (int h = 1; h < b; h <<= 1) {
    if (t < 128) {  // 128 butterflies per stage
      const int blk = t / (b / 2), r = t % (b / 2);
      const int j = blk * b + (r / h) * 2 * h + (r % h);
      const float a = buf[j], c = buf[j + h];
      buf[j] = a + c;
      buf[j + h] = a - c;
    }
    __syncthreads();
  }
  if (t < len) out[row * K + base + t] = buf[t] * norm;
}

// ---- GEMV (M <= 8) -----------------------------------------------------------------------------------------
struct GemvArgs {
  int64_t M, K, N, G, row_bytes, ng;
  int gshift;  // log2(G): no 64-bit division on the device
  int e4m3;
  float tensor_scale;
  const uint8_t* w;
  const uint8_t* scales;
};

template <typename XT, int MB>
__device__ __forceinline__ void gemv_word(uint32_t v, int64_t word, const GemvArgs& a, const uint8_t* srow,
                                          const XT* __restrict__ x, int64_t m0, const float2* lut, float* acc) {
  const int64_t k0 = word * 8;
  if (k0 >= a.K) return;  // padding words (k >= K) hold zero codes: nothing to add
  const float s = decode_scale(srow[k0 >> a.gshift], a.e4m3) * a.tensor_scale;
  float2 wv[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) wv[i] = lut[(v >> (8 * i)) & 255u];
  const bool full = k0 + 8 <= a.K;
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    if (m0 + m >= a.M) break;
    const XT* xr = x + (m0 + m) * a.K + k0;
    float part = 0.0f;
    if (full) {
      float xv[8];
      load8(xr, xv);
#pragma unroll
      for (int i = 0; i < 4; ++i) part += wv[i].x * xv[2 * i] + wv[i].y * xv[2 * i + 1];
    } else {
      for (int i = 0; i < 4; ++i) {
        if (k0 + 2 * i < a.K) part += wv[i].x * to_f(xr[2 * i]);
        if (k0 + 2 * i + 1 < a.K) part += wv[i].y * to_f(xr[2 * i + 1]);
      }
    }
    acc[m] = fmaf(part, s, acc[m]);
  }
}

// Rows are row_bytes long (a multiple of 4) and W is 4-byte aligned (checked on the host).
template <typename T, typename XT, int MB>
__global__ void gemv_kernel(GemvArgs a, const XT* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ float2 lut[256];
  fill_lut(lut);
  __syncthreads();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MB;
  if (n >= a.N) return;
  const uint32_t* row = reinterpret_cast<const uint32_t*>(a.w + n * a.row_bytes);
  const uint8_t* srow = a.scales + n * a.ng;
  const int64_t words = a.row_bytes / 4;
  float acc[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) acc[m] = 0.0f;
  constexpr int kUnroll = 4;  // independent loads in flight per lane
  for (int64_t base = 0; base < words; base += kWarp * kUnroll) {
    uint32_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t wi = base + u * kWarp + lane;
      v[u] = wi < words ? __ldg(row + wi) : 0u;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t wi = base + u * kWarp + lane;
      if (wi < words) gemv_word<XT, MB>(v[u], wi, a, srow, x, m0, lut, acc);
    }
  }
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0 && m0 + m < a.M) {
      if (bias) v += to_f(bias[n]);
      from_f(y + (m0 + m) * a.N + n, v);
    }
  }
}

// ---- tiled (M > 8): cuda::tile_loop ---------------------------------------------------------------------

template <typename T, typename XT>
__global__ void __launch_bounds__(cuda::kTileThreads) tiled_kernel(GemvArgs a, const XT* __restrict__ x,
                                                                   const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ float2 lut[256];
  __shared__ cuda::TileSmem smem;
  fill_lut(lut);
  __syncthreads();
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * cuda::kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * cuda::kTileN;
  float acc[cuda::kThreadM][cuda::kThreadN];
  const auto x_at = [&](int64_t m, int64_t k) { return to_f(x[m * a.K + k]); };
  // W tile: 64 rows x 16 bytes; one 32-bit word (8 weights, one scale) per thread.
  const auto stage_w = [&](int64_t k0, float (&ws)[cuda::kTileK][cuda::kTileN + 1]) {
    const int r = threadIdx.x / 4, kk = (threadIdx.x % 4) * 8;
    const int64_t gn = n0 + r, gk = k0 + kk;
    float vals[8];
    if (gn < a.N && gk < a.K) {
      const uint32_t v = *reinterpret_cast<const uint32_t*>(a.w + gn * a.row_bytes + gk / 2);
      const float s = decode_scale(a.scales[gn * a.ng + (gk >> a.gshift)], a.e4m3) * a.tensor_scale;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 p = lut[(v >> (8 * i)) & 255u];
        vals[2 * i] = gk + 2 * i < a.K ? p.x * s : 0.0f;
        vals[2 * i + 1] = gk + 2 * i + 1 < a.K ? p.y * s : 0.0f;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) vals[i] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) ws[kk + i][r] = vals[i];
  };
  cuda::tile_loop<8>(smem, a.M, a.K, m0, x_at, stage_w, acc);
  cuda::tile_store(a.M, a.N, m0, n0, acc, [&](int64_t m, int64_t n, float v) {
    if (bias) v += to_f(bias[n]);
    from_f(y + m * a.N + n, v);
  });
}

// ---- dispatch ----------------------------------------------------------------------------------------------
Status cuda_status(cudaError_t e, const char* what) { return cuda::cuda_status(e, "FP4MatMul", what); }

template <typename T, typename XT, int MB>
void launch_gemv(const GemvArgs& a, const XT* x, const T* bias, T* y, cudaStream_t stream) {
  constexpr int kRowsPerBlock = 4;  // 4 warps
  const dim3 grid(static_cast<unsigned>((a.N + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>((a.M + MB - 1) / MB));
  gemv_kernel<T, XT, MB><<<grid, kRowsPerBlock * kWarp, 0, stream>>>(a, x, bias, y);
}

template <typename T, typename XT>
void launch(const GemvArgs& a, const XT* x, const T* bias, T* y, cudaStream_t stream) {
  if (a.M == 1) {
    launch_gemv<T, XT, 1>(a, x, bias, y, stream);
  } else if (a.M == 2) {
    launch_gemv<T, XT, 2>(a, x, bias, y, stream);
  } else if (a.M <= 4) {
    launch_gemv<T, XT, 4>(a, x, bias, y, stream);
  } else if (a.M <= 8) {
    launch_gemv<T, XT, 8>(a, x, bias, y, stream);
  } else {
    const dim3 grid(static_cast<unsigned>((a.N + cuda::kTileN - 1) / cuda::kTileN),
                    static_cast<unsigned>((a.M + cuda::kTileM - 1) / cuda::kTileM));
    tiled_kernel<T, XT><<<grid, cuda::kTileThreads, 0, stream>>>(a, x, bias, y);
  }
}

template <typename T>
Status run(const Problem& p, cudaStream_t stream) {
  GemvArgs a;
  a.M = p.M;
  a.K = p.attrs.K;
  a.N = p.attrs.N;
  a.G = p.attrs.group_size;
  a.gshift = 0;
  while ((int64_t{1} << a.gshift) < a.G) ++a.gshift;
  a.row_bytes = padded_k(a.K, a.G) / 2;
  a.ng = padded_k(a.K, a.G) / a.G;
  a.e4m3 = p.attrs.scale_format == ScaleFormat::kE4M3 ? 1 : 0;
  a.tensor_scale = p.tensor_scale;
  a.w = p.w;
  a.scales = p.scales;
  if (reinterpret_cast<uintptr_t>(p.w) % 4 != 0) return Status::Error("FP4MatMul (CUDA): W is not 4-byte aligned");
  if ((a.M + cuda::kTileM - 1) / cuda::kTileM > 65535) return Status::Error("FP4MatMul (CUDA): too many rows in X");
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int64_t hb = p.attrs.hadamard_block;
  if (hb > 1) {
    const int64_t segs = (a.K + 255) / 256;
    if (segs * a.M > 0x7fffffffLL) return Status::Error("FP4MatMul (CUDA): X too large for the Hadamard kernel");
    float* xr = static_cast<float*>(p.scratch);
    const bool own = xr == nullptr;
    if (own) {
      QCOMPILE_RETURN_IF_ERROR(cuda_status(
          cudaMallocAsync(reinterpret_cast<void**>(&xr), static_cast<size_t>(a.M * a.K) * sizeof(float), stream),
          "allocating the rotated-activation buffer"));
    }
    hadamard_kernel<T><<<static_cast<unsigned>(segs * a.M), 256, 0, stream>>>(
        x, xr, a.K, segs, static_cast<int>(hb), 1.0f / sqrtf(static_cast<float>(hb)));
    launch<T, float>(a, xr, bias, y, stream);
    const cudaError_t launch_err = cudaGetLastError();
    if (own) cudaFreeAsync(xr, stream);
    return cuda_status(launch_err, "kernel launch");
  }
  launch<T, T>(a, x, bias, y, stream);
  return cuda_status(cudaGetLastError(), "kernel launch");
}

}  // namespace

Status matmul_cuda(const Problem& p, void* stream) {
  QCOMPILE_RETURN_IF_ERROR(validate_attrs(p.attrs));
  if (p.M < 0) return Status::Error("FP4MatMul (CUDA): negative M");
  if (p.M == 0) return Status::OK();
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::kFloat16) return run<__half>(p, s);
  return run<float>(p, s);
}

}  // namespace fp4
}  // namespace qcompile
