// What the CUDA microbenchmarks share: error checks, random bf16 buffers, median event timing and
// device views. Header-only, for the bench executables alone (one translation unit each).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "long_exposure/tensor_view.h"

namespace long_exposure {
namespace bench {

#define CHECK(call)                                                                         \
  do {                                                                                      \
    cudaError_t e = (call);                                                                 \
    if (e != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e)); \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

__global__ void fill_random(__nv_bfloat16* p, int64_t n, float scale, uint32_t seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
  h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
  p[i] = __float2bfloat16(scale * (static_cast<float>(h & 0xffff) / 32768.0f - 1.0f));
}

inline __nv_bfloat16* random_buffer(int64_t n, float scale, uint32_t seed) {
  __nv_bfloat16* p = nullptr;
  CHECK(cudaMalloc(&p, n * sizeof(__nv_bfloat16)));
  fill_random<<<static_cast<unsigned>((n + 255) / 256), 256>>>(p, n, scale, seed);
  CHECK(cudaGetLastError());
  return p;
}

template <typename Fn>
float median_ms(Fn fn, int reps = 30) {
  for (int i = 0; i < 5; ++i) fn();
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(start));
    fn();
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

inline TensorView device_view(void* p, DType dtype, std::vector<int64_t> shape) {
  return make_view(p, dtype, shape, DeviceKind::kCUDA);
}

}  // namespace bench
}  // namespace long_exposure
