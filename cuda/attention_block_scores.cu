// The attention predictor's block score maps on the device, in three launches on one stream:
//   1. pooling: each thread averages one model column over one token block, many loads in flight
//      per thread, since this pass reads all of hidden and is bound by memory latency otherwise;
//   2. sketches: one tiled fp32 product [B*n, d] x [wq; wk]^T -> [B*n, 2*H*r] for every head at
//      once, so each pooled row is read once per 64 sketch columns rather than once per column.
//      The product is short (B*n rows) and wide in K (d), so its K range is split into slices
//      written as separate partial sums (workspace), which keeps every SM busy without atomics
//      and keeps the result bit-for-bit reproducible;
//   3. scores: one thread block per (batch, head) adds up its sketches' partial sums in shared
//      memory, then gives each warp whole score rows: dot products, a warp max and a warp sum.
// Everything after the load of hidden and the weights is fp32. Nothing is read back by the host.
#include <cmath>

#include "cuda_check.cuh"
#include "float_kernels.cuh"
#include "long_exposure/predictors.h"

namespace long_exposure {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ---- pooling ------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pool_blocks_kernel(const T* __restrict__ hidden, int64_t seq, int64_t d, int64_t block,
                       int64_t n, float* __restrict__ pooled) {
  const int64_t item = blockIdx.x, b = item / n, first = (item % n) * block;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (k >= d) return;
  const int64_t end = min(seq, first + block);
  const T* column = hidden + (b * seq + first) * d + k;
  float sum = 0.0f;
  // Unrolled so the loads of several tokens are issued before the first add needs its value.
#pragma unroll 8
  for (int64_t t = 0; t < end - first; ++t) sum += load_float(column + t * d);
  pooled[item * d + k] = sum / static_cast<float>(end - first);
}

// ---- sketches: C[s] = A[:, slice s] x W[:, slice s]^T ------------------------------------------
// A = pooled [rows, d] fp32, W = [wq; wk] as [cols, d] (cols = 2*H*r) in the input dtype, both
// K-contiguous. Classic SIMT tiling: a 64 x 64 output tile per thread block, 4 x 4 per thread,
// K staged 16 at a time in shared memory, transposed there so that each thread reads its four A
// and four W values of one k as two float4s; double-buffered, with the next step's global loads
// in registers while this step computes.

constexpr int kTile = 64;   // rows and columns of C per thread block; attention_sketch_splits mirrors it
constexpr int kStep = 16;   // K per shared-memory stage
constexpr int kLd = kTile + 4;  // row stride of the staged tiles: float4-aligned

static_assert(kThreads == (kTile / 4) * (kTile / 4), "one thread per 4 x 4 outputs");
static_assert(kTile * kStep == 4 * kThreads, "each thread stages 2 x 2 elements of A and of W");

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    sketch_kernel(const float* __restrict__ pooled, const T* __restrict__ wq,
                  const T* __restrict__ wk, int64_t rows, int64_t head_cols, int64_t d,
                  int64_t slice, float* __restrict__ partial) {
  __shared__ __align__(16) float a_tile[2][kStep][kLd];
  __shared__ __align__(16) float w_tile[2][kStep][kLd];
  const int tid = threadIdx.x;
  const int64_t cols = 2 * head_cols;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t k_begin = min(d, static_cast<int64_t>(blockIdx.z) * slice);
  const int64_t k_end = min(d, k_begin + slice);

  // Staging: a warp covers 8 consecutive k of 4 rows (whole 32-byte sectors of global memory) and
  // its shared-memory stores, at k * kLd + row, fall in 32 distinct banks.
  const int lk = tid & 7, lr = tid >> 3;  // k offset (also + 8) and row/column (also + 32)
  const float* a_src[2];
  const T* w_src[2];
  bool a_in[2], w_in[2];
  for (int i = 0; i < 2; ++i) {
    const int64_t r = row0 + lr + 32 * i, c = col0 + lr + 32 * i;
    a_in[i] = r < rows;
    w_in[i] = c < cols;
    a_src[i] = pooled + (a_in[i] ? r : 0) * d;
    w_src[i] = w_in[i] ? (c < head_cols ? wq + c * d : wk + (c - head_cols) * d) : wq;
  }
  float a_next[4], w_next[4];
  auto fetch = [&](int64_t k0) {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) {
        const int64_t k = k0 + lk + 8 * j;
        const bool k_in = k < k_end;
        a_next[2 * i + j] = a_in[i] && k_in ? a_src[i][k] : 0.0f;
        w_next[2 * i + j] = w_in[i] && k_in ? load_float(w_src[i] + k) : 0.0f;
      }
  };
  auto stage = [&](int buf) {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) {
        a_tile[buf][lk + 8 * j][lr + 32 * i] = a_next[2 * i + j];
        w_tile[buf][lk + 8 * j][lr + 32 * i] = w_next[2 * i + j];
      }
  };

  // A warp's 32 threads read 2 distinct float4s of A (broadcast) and 16 consecutive ones of W.
  const int tx = tid % (kTile / 4), ty = tid / (kTile / 4);
  float acc[4][4] = {};
  fetch(k_begin);
  stage(0);
  __syncthreads();
  int buf = 0;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kStep) {
    const bool more = k0 + kStep < k_end;
    if (more) fetch(k0 + kStep);
#pragma unroll
    for (int k = 0; k < kStep; ++k) {
      const float4 a = *reinterpret_cast<const float4*>(&a_tile[buf][k][ty * 4]);
      const float4 w = *reinterpret_cast<const float4*>(&w_tile[buf][k][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, wv[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], wv[j], acc[i][j]);
    }
    // The other buffer was last read before the previous step's barrier.
    if (more) stage(buf ^ 1);
    __syncthreads();
    buf ^= 1;
  }

  // An empty slice (d not reaching it) still writes its zeros: the score pass adds every slice.
  float* out = partial + static_cast<int64_t>(blockIdx.z) * rows * cols;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = row0 + ty * 4 + i;
    if (r >= rows) break;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = col0 + tx * 4 + j;
      if (c < cols) out[r * cols + c] = acc[i][j];
    }
  }
}

// ---- scores -------------------------------------------------------------------------------------

// An odd row stride puts one column of the sketches of 32 consecutive blocks in distinct banks.
__host__ __device__ inline int64_t sketch_stride(int64_t rank) { return rank | 1; }

__global__ void __launch_bounds__(kThreads)
    block_scores_kernel(const float* __restrict__ partial, int64_t splits, int64_t rows,
                        int64_t heads, int64_t rank, int64_t n, float* __restrict__ scores) {
  extern __shared__ float sketches[];
  const int64_t rs = sketch_stride(rank);
  float* qs = sketches;     // [n][rs]
  float* ks = qs + n * rs;  // [n][rs]
  const int64_t g = blockIdx.x, b = g / heads, h = g % heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // partial is [splits][B * n][2][H][r]; the slices are added in order, so results repeat exactly.
  const int64_t head_cols = heads * rank, split_stride = rows * 2 * head_cols;
  for (int64_t item = threadIdx.x; item < 2 * n * rank; item += kThreads) {
    const int64_t which = item / (n * rank), i = (item / rank) % n, j = item % rank;
    const float* src = partial + ((b * n + i) * 2 + which) * head_cols + h * rank + j;
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += src[s * split_stride];
    (which ? ks : qs)[i * rs + j] = sum;
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
  const int64_t splits = a.workspace.size(0), rows = batch * n, head_cols = heads * rank;
  if (batch == 0 || n == 0) return;
  require(splits <= 65535, "workspace has " + std::to_string(splits) +
                               " splits; the CUDA version takes at most 65535");
  require(ceil_div(2 * head_cols, kTile) <= 65535,
          "attention_block_scores on CUDA takes at most " + std::to_string(65535 * kTile / 2) +
              " heads x rank, got " + std::to_string(head_cols));
  DeviceGuard guard(a.hidden.device_index);
  const cudaStream_t stream = stream_of(a.scores.stream);
  dispatch_float_kernel(a.hidden.dtype, "attention_block_scores", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (d > 0) {
      const dim3 pool_grid(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(d, kThreads)));
      pool_blocks_kernel<T><<<pool_grid, kThreads, 0, stream>>>(a.hidden.ptr<const T>(), seq, d,
                                                                 a.block, n, a.pooled.ptr<float>());
      check_cuda(cudaGetLastError(), "attention_block_scores pooling kernel launch");
    }
    if (heads == 0) return;
    // Slices are whole K steps, so only the last non-empty one has a ragged end.
    const int64_t slice = ceil_div(ceil_div(d, splits), kStep) * kStep;
    const dim3 sketch_grid(static_cast<unsigned>(ceil_div(rows, kTile)),
                           static_cast<unsigned>(ceil_div(2 * head_cols, kTile)),
                           static_cast<unsigned>(splits));
    sketch_kernel<T><<<sketch_grid, kThreads, 0, stream>>>(
        a.pooled.ptr<const float>(), a.wq.ptr<const T>(), a.wk.ptr<const T>(), rows, head_cols, d,
        slice, a.workspace.ptr<float>());
    check_cuda(cudaGetLastError(), "attention_block_scores sketch kernel launch");
  });
  if (heads == 0) return;
  const size_t bytes = sizeof(float) * static_cast<size_t>(2 * n * sketch_stride(rank));
  reserve_shared_memory(block_scores_kernel, bytes, a.hidden.device_index,
                        "attention_block_scores with " + std::to_string(n) + " blocks at rank " +
                            std::to_string(rank));
  block_scores_kernel<<<static_cast<unsigned>(batch * heads), kThreads, bytes, stream>>>(
      a.workspace.ptr<const float>(), splits, rows, heads, rank, n, a.scores.ptr<float>());
  check_cuda(cudaGetLastError(), "attention_block_scores scores kernel launch");
}

}  // namespace long_exposure
