// The attention predictor's block score maps on the device, in two launches on one stream:
//   1. one thread block per (batch, token block) averages the block's hidden states into pooled,
//      read once here rather than once per head;
//   2. one thread block per (batch, head) projects every pooled block to its Q and K sketches,
//      kept in shared memory (a warp per sketch entry, lanes splitting the model dimension), then
//      gives each warp whole score rows: dot products, a warp max and a warp sum for the softmax.
// Everything after the load of hidden and the weights is fp32. Nothing is read back by the host.
#include <cmath>

#include "cuda_check.cuh"
#include "float_kernels.cuh"
#include "long_exposure/predictors.h"

namespace long_exposure {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// An odd row stride puts one column of the sketches of 32 consecutive blocks in distinct banks.
__host__ __device__ inline int64_t sketch_stride(int64_t rank) { return rank | 1; }

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pool_blocks_kernel(const T* __restrict__ hidden, int64_t seq, int64_t d, int64_t block,
                       int64_t n, float* __restrict__ pooled) {
  const int64_t item = blockIdx.x, b = item / n, first = (item % n) * block;
  const int64_t end = min(seq, first + block);
  const float count = static_cast<float>(end - first);
  for (int64_t k = threadIdx.x; k < d; k += kThreads) {
    float sum = 0.0f;
    for (int64_t t = first; t < end; ++t) sum += load_float(hidden + (b * seq + t) * d + k);
    pooled[item * d + k] = sum / count;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    block_scores_kernel(const float* __restrict__ pooled, const T* __restrict__ wq,
                        const T* __restrict__ wk, int64_t heads, int64_t rank, int64_t d,
                        int64_t n, float* __restrict__ scores) {
  extern __shared__ float sketches[];
  const int64_t rs = sketch_stride(rank);
  float* qs = sketches;   // [n][rs]
  float* ks = qs + n * rs;  // [n][rs]
  const int64_t g = blockIdx.x, b = g / heads, h = g % heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int64_t item = warp; item < 2 * n * rank; item += kWarps) {
    const bool is_key = item >= n * rank;
    const int64_t i = (item / rank) % n, j = item % rank;
    const T* w = (is_key ? wk : wq) + (h * rank + j) * d;
    const float* p = pooled + (b * n + i) * d;
    float acc = 0.0f;
    for (int64_t k = lane; k < d; k += 32) acc += p[k] * load_float(w + k);
    acc = warp_sum(acc);
    if (lane == 0) (is_key ? ks : qs)[i * rs + j] = acc;
  }
  __syncthreads();

  const float norm = sqrtf(static_cast<float>(rank));
  for (int64_t i = warp; i < n; i += kWarps) {
    // Each lane reads back only the entries of the row it wrote itself.
    float* row = scores + (g * n + i) * n;
    float top = -INFINITY;
    for (int64_t j = lane; j <= i; j += 32) {
      float s = 0.0f;
      for (int64_t c = 0; c < rank; ++c) s += qs[i * rs + c] * ks[j * rs + c];
      row[j] = s / norm;
      top = fmaxf(top, row[j]);
    }
    top = warp_max(top);
    float sum = 0.0f;
    for (int64_t j = lane; j <= i; j += 32) sum += (row[j] = expf(row[j] - top));
    sum = warp_sum(sum);
    for (int64_t j = lane; j <= i; j += 32) row[j] /= sum;
    for (int64_t j = i + 1 + lane; j < n; j += 32) row[j] = 0.0f;
  }
}

}  // namespace

void attention_block_scores_cuda(const AttentionBlockScoresArgs& a) {
  const int64_t batch = a.hidden.size(0), seq = a.hidden.size(1), d = a.hidden.size(2);
  const int64_t heads = a.wq.size(0), rank = a.wq.size(1), n = a.pooled.size(1);
  if (batch == 0 || n == 0) return;
  DeviceGuard guard(a.hidden.device_index);
  const cudaStream_t stream = stream_of(a.scores.stream);
  dispatch_float_kernel(a.hidden.dtype, "attention_block_scores", [&](auto tag) {
    using T = typename decltype(tag)::type;
    pool_blocks_kernel<T><<<static_cast<unsigned>(batch * n), kThreads, 0, stream>>>(
        a.hidden.ptr<const T>(), seq, d, a.block, n, a.pooled.ptr<float>());
    check_cuda(cudaGetLastError(), "attention_block_scores pooling kernel launch");
    if (heads == 0) return;
    const size_t bytes = sizeof(float) * static_cast<size_t>(2 * n * sketch_stride(rank));
    reserve_shared_memory(block_scores_kernel<T>, bytes, a.hidden.device_index,
                          "attention_block_scores with " + std::to_string(n) + " blocks at rank " +
                              std::to_string(rank));
    block_scores_kernel<T><<<static_cast<unsigned>(batch * heads), kThreads, bytes, stream>>>(
        a.pooled.ptr<const float>(), a.wq.ptr<const T>(), a.wk.ptr<const T>(), heads, rank, d, n,
        a.scores.ptr<float>());
    check_cuda(cudaGetLastError(), "attention_block_scores scores kernel launch");
  });
}

}  // namespace long_exposure
