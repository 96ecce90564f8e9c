// What the kernels over fp32/bf16 tensors share: reading and rounding elements, warp reductions,
// the launcher-side choice of element type, and room for more than the default shared memory.
#pragma once

#include <cuda_bf16.h>

#include <string>

#include "cuda_check.cuh"
#include "long_exposure/tensor_view.h"

namespace long_exposure {

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// A value as it reads back after being stored as T (round to nearest even, as torch and the CPU
// side round), so an intermediate that torch would keep in T is used exactly as torch uses it.
template <typename T>
__device__ __forceinline__ float as_stored(float v) {
  return v;
}
template <>
__device__ __forceinline__ float as_stored<__nv_bfloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
struct ElementTag {
  using type = T;
};

// Calls fn(ElementTag<T>{}) with the device element type of an fp32 or bf16 tensor.
template <typename Fn>
void dispatch_float_kernel(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(ElementTag<float>{}); break;
    case DType::kBFloat16: fn(ElementTag<__nv_bfloat16>{}); break;
    default:
      throw ContractError(std::string(op) + " does not support dtype " + dtype_name(dtype) +
                          " on CUDA");
  }
}

// Lets `kernel` launch with `bytes` of dynamic shared memory on `device`, or explains which
// sizes of `op` do not fit. Launches within the default 48 KiB need no attribute.
template <typename Kernel>
void reserve_shared_memory(Kernel kernel, size_t bytes, int device, const std::string& op) {
  constexpr size_t kDefaultLimit = 48 * 1024;
  if (bytes <= kDefaultLimit) return;
  int limit = 0;
  check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  require(bytes <= static_cast<size_t>(limit),
          op + " needs " + std::to_string(bytes) + " bytes of shared memory per thread block, " +
              "more than the " + std::to_string(limit) + " this device allows");
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)),
             "cudaFuncSetAttribute");
}

}  // namespace long_exposure
