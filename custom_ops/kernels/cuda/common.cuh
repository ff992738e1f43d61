// What every CUDA kernel file shares: fp32 <-> activation-type conversions on the device and the
// cudaError_t -> Status bridge.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "qcompile/status.h"

namespace qcompile {
namespace cuda {

// Activations, biases and outputs are float or fp16 (as __half, or as its raw bits in a uint16_t).
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(uint16_t v) { return __half2float(__ushort_as_half(v)); }
__device__ __forceinline__ void from_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void from_f(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void from_f(uint16_t* p, float v) { *p = __half_as_ushort(__float2half_rn(v)); }

// OK, or "<op> (CUDA): <what>: <CUDA's message>".
inline Status cuda_status(cudaError_t e, const char* op, const char* what) {
  if (e == cudaSuccess) return Status::OK();
  return Status::Error(std::string(op) + " (CUDA): " + what + ": " + cudaGetErrorString(e));
}

}  // namespace cuda
}  // namespace qcompile
