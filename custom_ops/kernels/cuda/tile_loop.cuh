// The prefill (many rows of X) loop every CUDA kernel shares. A block of kTileThreads threads computes one
// kTileM x kTileN tile of Y: for each K step of kTileK it stages the X tile and the op's decoded W tile in
// shared memory, k-major, then every thread accumulates its kThreadM x kThreadN block in fp32. Only the W
// decoding and the epilogue (outliers, scales, bias) are op-specific.
#pragma once

#include <cstdint>

namespace qcompile {
namespace cuda {

constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kTileThreads = 256;
constexpr int kThreadM = 4, kThreadN = 4;  // outputs per thread: (kTileM / kThreadM) x (kTileN / kThreadN) = 256

// Shared-memory tiles, k-major. The +1 keeps the stores of consecutive threads (consecutive k) in distinct
// banks.
struct TileSmem {
  float x[kTileK][kTileM + 1];  // x[k][m] = X[m0 + m, k0 + k]
  float w[kTileK][kTileN + 1];  // w[k][n] = W[n0 + n, k0 + k] (decoded)
};

// This thread's block of the tile: rows tile_m() * kThreadM .., columns tile_n() * kThreadN ..
__device__ __forceinline__ int tile_m() { return threadIdx.x / (kTileN / kThreadN); }
__device__ __forceinline__ int tile_n() { return threadIdx.x % (kTileN / kThreadN); }

// acc += the tile's X rows [m0, m0 + kTileM) times the decoded W rows [n0, n0 + kTileN) over all of K.
//   x_at(m, k): X[m, k] as float, called for m < M and k < K only (the rest of the tile is zero);
//   stage_w(k0, w): fills w[k][n] with W[n0 + n, k0 + k] (zero past N or K), all threads taking part.
// kUnroll: how far the k loop over a staged tile is unrolled (more loads in flight against more registers:
// FP4 and SpQR use 8, Codebook, whose W staging needs more registers, 4).
// Every thread of the block must call it (it synchronises the block).
// Index: int64_t, or int where every index of the op fits 32 bits (fewer registers).
template <int kUnroll, typename Index, typename XAt, typename StageW>
__device__ __forceinline__ void tile_loop(TileSmem& s, Index M, Index K, Index m0, XAt x_at, StageW stage_w,
                                          float (&acc)[kThreadM][kThreadN]) {
  const int tm = tile_m(), tn = tile_n();
#pragma unroll
  for (int i = 0; i < kThreadM; ++i)
#pragma unroll
    for (int j = 0; j < kThreadN; ++j) acc[i][j] = 0.0f;
  for (Index k0 = 0; k0 < K; k0 += kTileK) {
    // consecutive threads walk k: coalesced reads of a row of X
    for (int i = threadIdx.x; i < kTileM * kTileK; i += kTileThreads) {
      const int mm = i / kTileK, kk = i % kTileK;
      const Index gm = m0 + mm, gk = k0 + kk;
      s.x[kk][mm] = (gm < M && gk < K) ? x_at(gm, gk) : 0.0f;
    }
    stage_w(k0, s.w);
    __syncthreads();
#pragma unroll kUnroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float av[kThreadM], bv[kThreadN];
#pragma unroll
      for (int i = 0; i < kThreadM; ++i) av[i] = s.x[kk][tm * kThreadM + i];
#pragma unroll
      for (int j = 0; j < kThreadN; ++j) bv[j] = s.w[kk][tn * kThreadN + j];
#pragma unroll
      for (int i = 0; i < kThreadM; ++i)
#pragma unroll
        for (int j = 0; j < kThreadN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
}

// Calls store(m, n, acc[i][j]) for this thread's outputs inside [0, M) x [0, N).
template <typename Index, typename Store>
__device__ __forceinline__ void tile_store(Index M, Index N, Index m0, Index n0,
                                           const float (&acc)[kThreadM][kThreadN], Store store) {
  const int tm = tile_m(), tn = tile_n();
#pragma unroll
  for (int i = 0; i < kThreadM; ++i) {
    const Index gm = m0 + tm * kThreadM + i;
    if (gm >= M) continue;
#pragma unroll
    for (int j = 0; j < kThreadN; ++j) {
      const Index gn = n0 + tn * kThreadN + j;
      if (gn < N) store(gm, gn, acc[i][j]);
    }
  }
}

}  // namespace cuda
}  // namespace qcompile
