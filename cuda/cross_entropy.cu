// The token cross-entropy on CUDA: a thread block per row of logits. The forward reads the row once
// (online max and sum of exponentials in base 2, 16-byte loads), the backward reads it again and
// writes the gradient; both are bound by memory bandwidth, so neither keeps more than the row's
// logsumexp in between. See cpp/include/long_exposure/cross_entropy.h for the contract.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "cuda_check.cuh"
#include "float_kernels.cuh"
#include "long_exposure/cross_entropy.h"

namespace long_exposure {

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread before any is used
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__device__ __forceinline__ int64_t label_of(const void* labels, bool labels64, int64_t stride, int64_t row) {
  return labels64 ? static_cast<const int64_t*>(labels)[row * stride]
                  : static_cast<const int32_t*>(labels)[row * stride];
}

// (max, sum of 2^(y - max)) of two parts of a row, in base-2 logits y = x * log2(e).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float top = fmaxf(m, m2);
  if (top == -INFINITY) return;  // both parts empty so far
  s = s * exp2f(m - top) + s2 * exp2f(m2 - top);
  m = top;
}

// Folds base-2 logits y[0..n) into (m, s).
template <int N>
__device__ __forceinline__ void fold(float& m, float& s, const float (&y)[N]) {
  float top = y[0];
#pragma unroll
  for (int i = 1; i < N; ++i) top = fmaxf(top, y[i]);
  if (top > m) {
    s *= exp2f(m - top);
    m = top;
  }
  if (m == -INFINITY) return;
#pragma unroll
  for (int i = 0; i < N; ++i) s += exp2f(y[i] - m);
}

// The row's (max, sum) over the whole thread block, returned to every thread.
__device__ __forceinline__ void block_merge(float& m, float& s) {
  __shared__ float warp_m[kThreads / 32], warp_s[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2)
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, s, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  __syncthreads();
  m = warp_m[0];
  s = warp_s[0];
  for (int w = 1; w < kThreads / 32; ++w) merge(m, s, warp_m[w], warp_s[w]);
}

// Calls fn(index, pack) for each 16-byte pack of a row this thread owns, with kUnroll loads in
// flight before the first is used.
template <typename P, typename Fn>
__device__ __forceinline__ void for_each_pack(const P* packs, int64_t n_packs, Fn&& fn) {
  for (int64_t base = threadIdx.x; base < n_packs; base += int64_t{kThreads} * kUnroll) {
    P p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kThreads < n_packs) p[u] = packs[base + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kThreads < n_packs) fn(base + u * kThreads, p[u]);
  }
}

// kVector: rows start on 16 bytes and hold whole packs, so every load is one 16-byte load.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_forward_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t vocab,
                                 const void* __restrict__ labels, bool labels64, int64_t label_stride,
                                 int64_t ignore_index, float* __restrict__ lse, float* __restrict__ loss) {
  const int64_t r = blockIdx.x;
  const T* row = logits + r * row_stride;
  float m = -INFINITY, s = 0.0f;
  if constexpr (kVector) {
    using P = Pack<T>;
    for_each_pack(reinterpret_cast<const P*>(row), vocab / P::kSize, [&](int64_t, const P& p) {
      float y[P::kSize];
#pragma unroll
      for (int i = 0; i < P::kSize; ++i) y[i] = to_float(p.v[i]) * kLog2e;
      fold(m, s, y);
    });
  } else {
    for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
      const float y[1] = {to_float(row[j]) * kLog2e};
      fold(m, s, y);
    }
  }
  block_merge(m, s);
  if (threadIdx.x == 0) {
    const float row_lse = (m + log2f(s)) * kLn2;
    lse[r] = row_lse;
    const int64_t label = label_of(labels, labels64, label_stride, r);
    if (label == ignore_index)
      loss[r] = 0.0f;
    else if (label < 0 || label >= vocab)
      loss[r] = NAN;  // the contract's loud answer to a label outside the vocabulary
    else
      loss[r] = row_lse - to_float(row[label]);
  }
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_backward_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t vocab,
                                  const void* __restrict__ labels, bool labels64, int64_t label_stride,
                                  int64_t ignore_index, const float* __restrict__ lse,
                                  const float* __restrict__ grad_loss, int64_t grad_stride,
                                  T* __restrict__ grad) {
  const int64_t r = blockIdx.x;
  const T* row = logits + r * row_stride;
  T* out = grad + r * vocab;
  const int64_t label = label_of(labels, labels64, label_stride, r);
  const bool counted = label != ignore_index && label >= 0 && label < vocab;
  const float g = counted ? grad_loss[r * grad_stride] : 0.0f;
  const float shift = lse[r] * kLog2e;
  if constexpr (kVector) {
    using P = Pack<T>;
    P* out_packs = reinterpret_cast<P*>(out);
    for_each_pack(reinterpret_cast<const P*>(row), vocab / P::kSize, [&](int64_t pack, const P& p) {
      P q;
#pragma unroll
      for (int i = 0; i < P::kSize; ++i) {
        const int64_t j = pack * P::kSize + i;
        q.v[i] = from_float<T>(exp2f(to_float(p.v[i]) * kLog2e - shift) * g - (j == label ? g : 0.0f));
      }
      out_packs[pack] = q;
    });
  } else {
    for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
      const float d = exp2f(to_float(row[j]) * kLog2e - shift) * g - (j == label ? g : 0.0f);
      out[j] = from_float<T>(d);
    }
  }
}

template <typename Fn>
void dispatch_logits(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(ElementTag<float>{}); break;
    case DType::kBFloat16: fn(ElementTag<__nv_bfloat16>{}); break;
    case DType::kFloat16: fn(ElementTag<__half>{}); break;
    default:
      throw ContractError(std::string(op) + " does not support dtype " + dtype_name(dtype) + " on CUDA");
  }
}

// True when every row of `logits` (and of the contiguous gradient) is whole 16-byte packs on 16 bytes.
template <typename T>
bool vector_rows(const TensorView& logits) {
  constexpr int64_t per_pack = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(logits.data) % 16 == 0 && logits.size(1) % per_pack == 0 &&
         (logits.size(0) == 1 || logits.stride(0) % per_pack == 0);
}

}  // namespace

void cross_entropy_forward_cuda(const CrossEntropyForwardArgs& a) {
  DeviceGuard guard(a.logits.device_index);
  const unsigned rows = static_cast<unsigned>(a.logits.size(0));
  const bool labels64 = a.labels.dtype == DType::kInt64;
  dispatch_logits(a.logits.dtype, "cross_entropy_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = vector_rows<T>(a.logits) ? cross_entropy_forward_kernel<T, true>
                                           : cross_entropy_forward_kernel<T, false>;
    kernel<<<rows, kThreads, 0, stream_of(a.logits.stream)>>>(
        a.logits.ptr<const T>(), a.logits.stride(0), a.logits.size(1), a.labels.data, labels64,
        a.labels.stride(0), a.ignore_index, a.lse.ptr<float>(), a.loss.ptr<float>());
  });
  check_cuda(cudaGetLastError(), "cross_entropy_forward kernel launch");
}

void cross_entropy_backward_cuda(const CrossEntropyBackwardArgs& a) {
  DeviceGuard guard(a.logits.device_index);
  const unsigned rows = static_cast<unsigned>(a.logits.size(0));
  const bool labels64 = a.labels.dtype == DType::kInt64;
  dispatch_logits(a.logits.dtype, "cross_entropy_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vector = vector_rows<T>(a.logits) && reinterpret_cast<uintptr_t>(a.grad_logits.data) % 16 == 0;
    auto kernel = vector ? cross_entropy_backward_kernel<T, true> : cross_entropy_backward_kernel<T, false>;
    kernel<<<rows, kThreads, 0, stream_of(a.logits.stream)>>>(
        a.logits.ptr<const T>(), a.logits.stride(0), a.logits.size(1), a.labels.data, labels64,
        a.labels.stride(0), a.ignore_index, a.lse.ptr<const float>(), a.grad_loss.ptr<const float>(),
        a.grad_loss.stride(0), a.grad_logits.ptr<T>());
  });
  check_cuda(cudaGetLastError(), "cross_entropy_backward kernel launch");
}

}  // namespace long_exposure
