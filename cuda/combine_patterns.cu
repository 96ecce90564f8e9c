// Device combination of pattern-pool atoms into fixed-capacity block lists. One thread per
// (head, row): it ORs the selected atoms' precomputed lists for its row into a bitmap held in
// registers, then writes the set bits in order. Nothing is read back by the host.
#include "cuda_check.cuh"
#include "long_exposure/pattern_pool.h"

namespace long_exposure {

namespace {

constexpr int kMaxRowWords = 16;  // grids of up to 1024 blocks
constexpr int kThreads = 128;

__global__ void combine_kernel(const int32_t* __restrict__ lut_counts,
                               const int32_t* __restrict__ lut_indices,
                               const unsigned long long* __restrict__ selection, int64_t atoms,
                               int64_t n, int64_t words, int64_t groups, int64_t capacity,
                               int32_t* __restrict__ out_counts, int32_t* __restrict__ out_indices) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= groups * n) return;
  const int64_t g = item / n, r = item % n;
  unsigned long long bits[kMaxRowWords];
#pragma unroll
  for (int w = 0; w < kMaxRowWords; ++w) bits[w] = 0;
  for (int64_t a = 0; a < atoms; ++a) {
    if (!((selection[g * words + a / 64] >> (a % 64)) & 1ull)) continue;
    const int32_t* list = lut_indices + (a * n + r) * n;
    const int32_t count = lut_counts[a * n + r];
    for (int32_t i = 0; i < count; ++i) {
      const int32_t c = list[i];
      bits[c / 64] |= 1ull << (c % 64);
    }
  }
  int32_t* out = out_indices + (g * n + r) * capacity;
  int32_t count = 0;
  const int row_words = static_cast<int>((n + 63) / 64);
  for (int w = 0; w < row_words; ++w)
    for (unsigned long long word = bits[w]; word; word &= word - 1)
      out[count++] = w * 64 + __ffsll(static_cast<long long>(word)) - 1;
  for (int64_t i = count; i < capacity; ++i) out[i] = -1;
  out_counts[g * n + r] = count;
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
  combine_kernel<<<static_cast<unsigned>((items + kThreads - 1) / kThreads), kThreads, 0,
                   stream_of(out_counts.stream)>>>(
      lut_counts.ptr<const int32_t>(), lut_indices.ptr<const int32_t>(),
      selection.ptr<const unsigned long long>(), atoms, n, words, groups, out_indices.size(-1),
      out_counts.ptr<int32_t>(), out_indices.ptr<int32_t>());
  check_cuda(cudaGetLastError(), "combine_patterns kernel launch");
}

}  // namespace long_exposure
