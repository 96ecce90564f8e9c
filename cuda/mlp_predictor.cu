// The MLP predictor on the device, in one launch from activations to the MlpMask: one thread block
// per token tile. The tile's tokens go through in passes of 32 (one per lane in the logit phase):
//   1. z = x @ down^T for the pass, with x and down staged through shared memory kChunk model
//      dimensions at a time and z accumulated in shared memory in fp32 (rounded to x's dtype);
//   2. each warp takes whole neuron blocks: lanes compute one token's logit each from z and the
//      block's row of up, a warp max folds them into the tile maximum (kept in tile_max itself);
//   3. after the last pass one warp thresholds the tile's maxima into the sorted block list with
//      ballots, or keeps the best block when none passes.
// Sums run over k, then j, from index 0, as on the CPU, so the two differ only by fused
// multiply-adds on fp32 inputs (products of bf16 values are exact in fp32, so bf16 inputs give
// the CPU's results). Nothing is read back by the host.
//
// For bf16 at rank <= 128 with d a multiple of 8 (every real model), phase 1 runs on the tensor
// cores instead, 64 tokens a pass: the rank-r projection is the predictor's whole cost (2 T d r
// FLOPs against T r nb for the logits), and on CUDA cores it cost 40-130% of the dense MLP layer
// it steers. Its sums then run in the tensor cores' order, so z can round differently from the
// CPU's.
#include <cfloat>
#include <cmath>

#include "cuda_check.cuh"
#include "float_kernels.cuh"
#include "kernel_choice.cuh"
#include "long_exposure/predictors.h"
#include "mma_gemm.cuh"

namespace long_exposure {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPassRows = 32;  // tokens per pass: one per lane when the logits are computed
constexpr int kChunk = 32;     // model dimensions staged per step of the rank-r product
constexpr int kChunkStride = kChunk + 1;  // padded so that lanes reading one column hit distinct banks

// An odd row stride puts the same column of 32 consecutive rows in 32 distinct banks.
__host__ __device__ inline int64_t z_stride(int64_t rank) { return rank | 1; }

// z [kPassRows][z_stride], the x chunk [kPassRows][kChunkStride], then one region that holds the
// down chunk [rank][kChunkStride] in phase 1 and each warp's row of up [kWarps][rank] in phase 2.
size_t shared_bytes(int64_t rank) {
  return sizeof(float) * static_cast<size_t>(kPassRows * z_stride(rank) + kPassRows * kChunkStride +
                                             rank * kChunkStride);
}

// Phase 1: z[t][j] = sum_k x[row0 + t, k] * down[j, k] for the pass's `rows` tokens (the other
// rows of z come out zero), as stored in T. Each thread owns the same outputs throughout, so
// zeroing, accumulating and rounding them need no barrier of their own.
template <typename T>
__device__ void project_down(const T* __restrict__ x, const T* __restrict__ down, int64_t row0,
                             int rows, int64_t d, int64_t rank, float* z, float* x_chunk,
                             float* down_chunk) {
  const int64_t zs = z_stride(rank);
  for (int64_t o = threadIdx.x; o < kPassRows * rank; o += kThreads) z[(o / rank) * zs + o % rank] = 0.0f;
  for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
    const int width = static_cast<int>(min(static_cast<int64_t>(kChunk), d - k0));
    __syncthreads();  // the previous chunk is consumed and z is zeroed
    for (int e = threadIdx.x; e < kPassRows * kChunk; e += kThreads) {
      const int t = e / kChunk, k = e % kChunk;
      x_chunk[t * kChunkStride + k] = t < rows && k < width ? load_float(x + (row0 + t) * d + k0 + k) : 0.0f;
    }
    for (int64_t e = threadIdx.x; e < rank * kChunk; e += kThreads) {
      const int64_t j = e / kChunk;
      const int k = static_cast<int>(e % kChunk);
      down_chunk[j * kChunkStride + k] = k < width ? load_float(down + j * d + k0 + k) : 0.0f;
    }
    __syncthreads();
    for (int64_t o = threadIdx.x; o < kPassRows * rank; o += kThreads) {
      const int64_t t = o / rank, j = o % rank;
      float acc = z[t * zs + j];
      for (int k = 0; k < width; ++k) acc += x_chunk[t * kChunkStride + k] * down_chunk[j * kChunkStride + k];
      z[t * zs + j] = acc;
    }
  }
  for (int64_t o = threadIdx.x; o < kPassRows * rank; o += kThreads)
    z[(o / rank) * zs + o % rank] = as_stored<T>(z[(o / rank) * zs + o % rank]);
}

// Phase 3, by one warp: the tile's sorted block list from its maxima.
__device__ void select_blocks(const float* tile_max, int64_t n_blocks, float threshold,
                              int32_t* count_out, int32_t* list) {
  const int lane = threadIdx.x % 32;
  int32_t count = 0;
  for (int64_t b0 = 0; b0 < n_blocks; b0 += 32) {
    const int64_t b = b0 + lane;
    const bool active = b < n_blocks && tile_max[b] > threshold;
    const unsigned ballot = __ballot_sync(0xffffffffu, active);
    if (active) list[count + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int32_t>(b);
    count += __popc(ballot);
  }
  if (count == 0) {
    // The best block: the highest maximum, the lowest block number on ties.
    float best = -FLT_MAX;
    int64_t best_block = -1;
    for (int64_t b = lane; b < n_blocks; b += 32)
      if (best_block < 0 || tile_max[b] > best) best = tile_max[b], best_block = b;
    for (int offset = 16; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int64_t other_block = __shfl_xor_sync(0xffffffffu, best_block, offset);
      if (other_block >= 0 && (best_block < 0 || other > best || (other == best && other_block < best_block)))
        best = other, best_block = other_block;
    }
    if (lane == 0) list[0] = static_cast<int32_t>(best_block);
    count = 1;
  }
  for (int64_t i = count + lane; i < n_blocks; i += 32) list[i] = -1;
  if (lane == 0) *count_out = count;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    mlp_predictor_kernel(const T* __restrict__ x, const T* __restrict__ down,
                         const T* __restrict__ up, const T* __restrict__ bias, int64_t tokens,
                         int64_t d, int64_t rank, int64_t n_blocks, int64_t tile_m, float threshold,
                         int32_t* __restrict__ counts, int32_t* __restrict__ indices,
                         float* __restrict__ tile_max) {
  extern __shared__ float shared[];
  float* z = shared;
  float* x_chunk = z + kPassRows * z_stride(rank);
  float* weights = x_chunk + kPassRows * kChunkStride;  // down chunk, then rows of up
  const int64_t tile = blockIdx.x, first = tile * tile_m, end = min(tokens, first + tile_m);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* maxima = tile_max + tile * n_blocks;
  const int64_t zs = z_stride(rank);

  for (int64_t row0 = first; row0 < end; row0 += kPassRows) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kPassRows), end - row0));
    project_down(x, down, row0, rows, d, rank, z, x_chunk, weights);
    __syncthreads();

    float* up_row = weights + warp * rank;
    for (int64_t b = warp; b < n_blocks; b += kWarps) {
      for (int64_t j = lane; j < rank; j += 32) up_row[j] = load_float(up + b * rank + j);
      __syncwarp();
      float logit = -INFINITY;
      if (lane < rows) {
        float acc = 0.0f;
        for (int64_t j = 0; j < rank; ++j) acc += z[lane * zs + j] * up_row[j];
        logit = acc + load_float(bias + b);
      }
      logit = warp_max(logit);
      // Block b belongs to this warp in every pass, so its lane 0 alone updates the maximum.
      if (lane == 0) maxima[b] = row0 == first ? logit : fmaxf(maxima[b], logit);
      __syncwarp();  // up_row is rewritten for the next block
    }
    __syncthreads();  // z and the weights region are reused by the next pass, maxima read below
  }
  if (warp == 0) select_blocks(maxima, n_blocks, threshold, counts + tile, indices + tile * n_blocks);
}

constexpr int kMmaRows = 64;  // tokens per tensor-core pass

template <int BN>
using ProjectionConfig = mma::Config<kMmaRows, BN, 2, 4, 3, true, true>;

template <int BN>
size_t mma_shared_bytes(int64_t rank) {
  const size_t pipeline = ProjectionConfig<BN>::template shared_bytes<__nv_bfloat16>();
  const size_t logits = sizeof(float) * static_cast<size_t>(kMmaRows * z_stride(rank) + kWarps * rank);
  return pipeline > logits ? pipeline : logits;
}

// The larger of `value` and what `address` holds, atomically, for a float maximum that starts
// from the all-ones word (memset 0xff): as an int it is below every non-negative float, as an
// unsigned above every negative one. NaN logits are left out, as fmaxf leaves them out.
__device__ __forceinline__ void atomic_max_float(float* address, float value) {
  if (isnan(value)) return;
  if (value >= 0.0f)
    atomicMax(reinterpret_cast<int*>(address), __float_as_int(value));
  else
    atomicMin(reinterpret_cast<unsigned*>(address), __float_as_uint(value));
}

// kSplit: one thread block per 64-token pass of a tile (blockIdx.y), folding its maxima into
// tile_max atomically; select_kernel then cuts the lists. A 128-token tile otherwise runs its two
// passes one after the other in one block, which leaves 64 thread blocks for 132 SMs at 8192
// tokens. Maxima are exact in any order, so both ways give the same masks.
template <int BN, bool kSplit>
__global__ void __launch_bounds__(kThreads)
    mlp_predictor_mma_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ down,
                             const __nv_bfloat16* __restrict__ up, const __nv_bfloat16* __restrict__ bias,
                             int64_t tokens, int64_t d, int64_t rank, int64_t n_blocks, int64_t tile_m,
                             float threshold, int32_t* __restrict__ counts, int32_t* __restrict__ indices,
                             float* __restrict__ tile_max) {
  using Cfg = ProjectionConfig<BN>;
  static_assert(Cfg::kThreads == kThreads, "one thread count for both phases");
  extern __shared__ __align__(128) unsigned char shared_raw[];
  // The pipeline's tiles in phase 1; z and each warp's row of up in phase 2.
  __nv_bfloat16* tiles = reinterpret_cast<__nv_bfloat16*>(shared_raw);
  float* z = reinterpret_cast<float*>(shared_raw);
  const int64_t zs = z_stride(rank);
  float* up_row = z + kMmaRows * zs + (threadIdx.x / 32) * rank;
  const int64_t tile = blockIdx.x, first = tile * tile_m, end = min(tokens, first + tile_m);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* maxima = tile_max + tile * n_blocks;
  const mma::Operand<__nv_bfloat16> down_op{down, d, rank, d};
  const int n_chunks = static_cast<int>((d + mma::kBK - 1) / mma::kBK);
  const int64_t pass_first = kSplit ? first + int64_t{blockIdx.y} * kMmaRows : first;
  const int64_t pass_end = kSplit ? min(end, pass_first + kMmaRows) : end;

  for (int64_t row0 = pass_first; row0 < pass_end; row0 += kMmaRows) {
    const int64_t rows = min(static_cast<int64_t>(kMmaRows), end - row0);
    const mma::Operand<__nv_bfloat16> x_op{x + row0 * d, d, rows, d};
    float acc[Cfg::MI][Cfg::NI][4];
    mma::zero<Cfg>(acc);
    mma::accumulate<Cfg, __nv_bfloat16>(
        acc, n_chunks, [&](int i) { return mma::Chunk<__nv_bfloat16>{x_op, down_op, int64_t{i} * mma::kBK}; }, tiles);
    // accumulate() ends on a barrier with no copy in flight, so z may overwrite the tiles.
    mma::for_each_pair<Cfg>(acc, [&](int row, int col, float v0, float v1, int) {
      if (col < rank) z[row * zs + col] = as_stored<__nv_bfloat16>(v0);
      if (col + 1 < rank) z[row * zs + col + 1] = as_stored<__nv_bfloat16>(v1);
    });
    __syncthreads();
    for (int64_t b = warp; b < n_blocks; b += kWarps) {
      for (int64_t j = lane; j < rank; j += 32) up_row[j] = load_float(up + b * rank + j);
      __syncwarp();
      float logit = -INFINITY;
      for (int half = 0; half < kMmaRows / 32; ++half) {
        const int row = half * 32 + lane;
        if (row < rows) {
          float s = 0.0f;
          for (int64_t j = 0; j < rank; ++j) s += z[row * zs + j] * up_row[j];
          logit = fmaxf(logit, s + load_float(bias + b));
        }
      }
      logit = warp_max(logit);
      if (lane == 0) {
        if constexpr (kSplit)
          atomic_max_float(maxima + b, logit);
        else
          maxima[b] = row0 == first ? logit : fmaxf(maxima[b], logit);
      }
      __syncwarp();
    }
    __syncthreads();  // z and up_row are overwritten by the next pass; maxima are read below
  }
  if (!kSplit && warp == 0) select_blocks(maxima, n_blocks, threshold, counts + tile, indices + tile * n_blocks);
}

// Phase 3 of the split kernel: a warp per tile.
__global__ void __launch_bounds__(32)
    select_kernel(const float* __restrict__ tile_max, int64_t n_blocks, float threshold,
                  int32_t* __restrict__ counts, int32_t* __restrict__ indices) {
  const int64_t tile = blockIdx.x;
  select_blocks(tile_max + tile * n_blocks, n_blocks, threshold, counts + tile, indices + tile * n_blocks);
}

// Tiles of more than one 64-token pass spread their passes over a thread block each: at 128-token
// tiles one block per tile leaves half the H200's SMs idle for 1024 tiles, and the split kernel
// costs 2.1-3.1% of OPT-1.3B's dense layer against 3.6-5.7% (bench/RESULTS.md, session 16).
// LONG_EXPOSURE_PREDICTOR_KERNEL=single keeps one block per tile, to compare against.
bool split_passes(int64_t tile_m) {
  return tile_m > kMmaRows && !kernel_variable_is("LONG_EXPOSURE_PREDICTOR_KERNEL", "single");
}

template <int BN>
void launch_mma(const MlpPredictorArgs& a, int64_t n_tiles, int64_t rank) {
  const size_t bytes = mma_shared_bytes<BN>(rank);
  const cudaStream_t stream = stream_of(a.counts.stream);
  const bool split = split_passes(a.tile_m);
  const auto kernel = split ? mlp_predictor_mma_kernel<BN, true> : mlp_predictor_mma_kernel<BN, false>;
  reserve_shared_memory(kernel, bytes, a.x.device_index, "mlp_predictor_mask");
  const int64_t n_blocks = a.up.size(0);
  if (split)
    check_cuda(cudaMemsetAsync(a.tile_max.data, 0xff, sizeof(float) * n_tiles * n_blocks, stream),
               "mlp_predictor_mask tile_max reset");
  const dim3 grid(static_cast<unsigned>(n_tiles), split ? static_cast<unsigned>((a.tile_m + kMmaRows - 1) / kMmaRows) : 1u);
  kernel<<<grid, kThreads, bytes, stream>>>(
      a.x.ptr<const __nv_bfloat16>(), a.down.ptr<const __nv_bfloat16>(), a.up.ptr<const __nv_bfloat16>(),
      a.bias.ptr<const __nv_bfloat16>(), a.x.size(0), a.x.size(1), rank, n_blocks, a.tile_m,
      static_cast<float>(a.threshold), a.counts.ptr<int32_t>(), a.indices.ptr<int32_t>(), a.tile_max.ptr<float>());
  if (split)
    select_kernel<<<static_cast<unsigned>(n_tiles), 32, 0, stream>>>(
        a.tile_max.ptr<const float>(), n_blocks, static_cast<float>(a.threshold), a.counts.ptr<int32_t>(),
        a.indices.ptr<int32_t>());
}

bool aligned16(const TensorView& v) { return reinterpret_cast<uintptr_t>(v.data) % 16 == 0; }

}  // namespace

void mlp_predictor_mask_cuda(const MlpPredictorArgs& a) {
  const int64_t n_tiles = a.counts.size(0);
  if (n_tiles == 0) return;
  const int64_t rank = a.down.size(0);
  DeviceGuard guard(a.x.device_index);
  if (a.x.dtype == DType::kBFloat16 && rank <= 128 && a.x.size(1) % 8 == 0 && aligned16(a.x) && aligned16(a.down)) {
    if (rank <= 64)
      launch_mma<64>(a, n_tiles, rank);
    else
      launch_mma<128>(a, n_tiles, rank);
    check_cuda(cudaGetLastError(), "mlp_predictor_mask kernel launch");
    return;
  }
  dispatch_float_kernel(a.x.dtype, "mlp_predictor_mask", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const size_t bytes = shared_bytes(rank);
    reserve_shared_memory(mlp_predictor_kernel<T>, bytes, a.x.device_index,
                          "mlp_predictor_mask at rank " + std::to_string(rank));
    mlp_predictor_kernel<T><<<static_cast<unsigned>(n_tiles), kThreads, bytes, stream_of(a.counts.stream)>>>(
        a.x.ptr<const T>(), a.down.ptr<const T>(), a.up.ptr<const T>(), a.bias.ptr<const T>(),
        a.x.size(0), a.x.size(1), rank, a.up.size(0), a.tile_m, static_cast<float>(a.threshold),
        a.counts.ptr<int32_t>(), a.indices.ptr<int32_t>(), a.tile_max.ptr<float>());
  });
  check_cuda(cudaGetLastError(), "mlp_predictor_mask kernel launch");
}

}  // namespace long_exposure
