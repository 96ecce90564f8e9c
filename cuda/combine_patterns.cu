// Device combination of pattern-pool atoms into fixed-capacity block lists, one warp per (head,
// row), nothing read back by the host. Rows of up to 64 blocks (sequences up to 4096 tokens at
// 64-token blocks) take a lane per atom: each ORs its selected atoms' lists into a register word,
// the warp ORs the words, and lane l writes bits l and l + 32 at their ranks. Longer rows OR the
// lists into a shared-memory bitmap, a lane per list entry, and lane w writes word w's bits at its
// prefix-sum offset. (A thread per row, with its bitmap in local memory, took 28 us per call at 128
// heads x 32 rows: 1.4 ms of a 2048-token OPT-1.3B step; a lane per list entry at these rows, 20 us.)
#include "cuda_check.cuh"
#include "long_exposure/pattern_pool.h"

namespace long_exposure {

namespace {

constexpr int kMaxRowWords = 16;  // grids of up to 1024 blocks
constexpr int kWarps = 8;
constexpr unsigned kAll = 0xffffffffu;

__device__ __forceinline__ bool chosen_atom(const unsigned long long* selection, int64_t a) {
  return (selection[a / 64] >> (a % 64)) & 1ull;
}

// Rows of up to 64 blocks: the row's bitmap is one word.
__device__ __forceinline__ void combine_short_row(const int32_t* lut_counts, const int32_t* lut_indices,
                                                  const unsigned long long* selection, int64_t atoms, int64_t n,
                                                  int64_t r, int64_t capacity, int32_t* out, int32_t* out_count,
                                                  int lane) {
  unsigned long long word = 0;
  for (int64_t a = lane; a < atoms; a += 32) {
    if (!chosen_atom(selection, a)) continue;
    const int32_t count = lut_counts[a * n + r];
    const int32_t* list = lut_indices + (a * n + r) * n;
#pragma unroll 4
    for (int32_t i = 0; i < count; ++i) word |= 1ull << list[i];
  }
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) word |= __shfl_xor_sync(kAll, word, o);
  for (int bit = lane; bit < n; bit += 32)
    if ((word >> bit) & 1ull) out[__popcll(word & ((1ull << bit) - 1))] = bit;
  const int total = __popcll(word);
  for (int64_t i = total + lane; i < capacity; i += 32) out[i] = -1;
  if (lane == 0) *out_count = total;
}

// Longer rows: a bitmap of up to kMaxRowWords words in shared memory.
__device__ __forceinline__ void combine_long_row(const int32_t* lut_counts, const int32_t* lut_indices,
                                                 const unsigned long long* selection, int64_t atoms, int64_t n,
                                                 int64_t r, int64_t capacity, int32_t* out, int32_t* out_count,
                                                 int lane, unsigned long long* bits) {
  if (lane < kMaxRowWords) bits[lane] = 0;
  __syncwarp();
  for (int64_t a0 = 0; a0 < atoms; a0 += 64) {
    unsigned long long chosen = selection[a0 / 64];
    if (atoms - a0 < 64) chosen &= (1ull << (atoms - a0)) - 1;  // bits past the last atom mean nothing
    for (; chosen; chosen &= chosen - 1) {
      const int64_t a = a0 + __ffsll(static_cast<long long>(chosen)) - 1;
      const int32_t count = lut_counts[a * n + r];
      const int32_t* list = lut_indices + (a * n + r) * n;
      for (int32_t i = lane; i < count; i += 32) {
        const int32_t c = list[i];
        atomicOr(&bits[c / 64], 1ull << (c % 64));
      }
    }
  }
  __syncwarp();
  const int row_words = static_cast<int>((n + 63) / 64);
  unsigned long long word = lane < row_words ? bits[lane] : 0ull;
  const int set = __popcll(word);
  int through = set;  // inclusive prefix sum of the set bits over lanes
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int below = __shfl_up_sync(kAll, through, o);
    if (lane >= o) through += below;
  }
  const int total = __shfl_sync(kAll, through, 31);
  for (int at = through - set; word; word &= word - 1)
    out[at++] = lane * 64 + __ffsll(static_cast<long long>(word)) - 1;
  for (int64_t i = total + lane; i < capacity; i += 32) out[i] = -1;
  if (lane == 0) *out_count = total;
}

__global__ void __launch_bounds__(kWarps * 32)
    combine_kernel(const int32_t* __restrict__ lut_counts, const int32_t* __restrict__ lut_indices,
                   const unsigned long long* __restrict__ selection, int64_t atoms, int64_t n, int64_t words,
                   int64_t groups, int64_t capacity, int32_t* __restrict__ out_counts,
                   int32_t* __restrict__ out_indices) {
  __shared__ unsigned long long s_bits[kWarps][kMaxRowWords];
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (item >= groups * n) return;  // the whole warp: item is the warp's
  const int64_t g = item / n, r = item % n;
  int32_t* out = out_indices + item * capacity;
  if (n <= 64)
    combine_short_row(lut_counts, lut_indices, selection + g * words, atoms, n, r, capacity, out,
                      out_counts + item, lane);
  else
    combine_long_row(lut_counts, lut_indices, selection + g * words, atoms, n, r, capacity, out,
                     out_counts + item, lane, s_bits[warp]);
}

}  // namespace

void combine_patterns_cuda(const TensorView& lut_counts, const TensorView& lut_indices,
                           const TensorView& selection, const TensorView& out_counts,
                           const TensorView& out_indices) {
  const int64_t atoms = lut_counts.size(0), n = lut_counts.size(1), words = selection.size(-1);
  const int64_t groups = selection.numel() / words;
  require(n <= 64 * kMaxRowWords, "CUDA pattern combination supports grids of up to " +
                                      std::to_string(64 * kMaxRowWords) + " blocks, got " +
                                      std::to_string(n));
  if (groups == 0) return;
  DeviceGuard guard(lut_counts.device_index);
  const int64_t items = groups * n;
  combine_kernel<<<static_cast<unsigned>((items + kWarps - 1) / kWarps), kWarps * 32, 0,
                   stream_of(out_counts.stream)>>>(
      lut_counts.ptr<const int32_t>(), lut_indices.ptr<const int32_t>(),
      selection.ptr<const unsigned long long>(), atoms, n, words, groups, out_indices.size(-1),
      out_counts.ptr<int32_t>(), out_indices.ptr<int32_t>());
  check_cuda(cudaGetLastError(), "combine_patterns kernel launch");
}

}  // namespace long_exposure
