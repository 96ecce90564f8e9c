// Device transposition of fixed-capacity block lists (tiles per neuron block for the MLP backward,
// query blocks per key block for dK/dV), with no atomics to global memory and no host
// synchronisation. The output capacity is at least the number of rows, so nothing overflows.
//
// One thread block per group. Where a bitmap of the group (a bit per (column, row)) fits in shared
// memory, every thread scatters listed entries into it and then each column's thread reads its
// rows back in order with find-first-set: work in proportion to the entries, and the global reads
// coalesced. This replaced a scan in which each column's thread binary-searched every input row
// in global memory, a chain of dependent loads that took 25-30 us per attention layer at 2048
// tokens (bench/RESULTS.md); that scan remains for groups too large for the bitmap.
#include <cstdint>

#include "cuda_check.cuh"
#include "long_exposure/masks.h"

namespace long_exposure {

namespace {

// The fallback for groups whose bitmap would not fit: each thread owns output columns and scans
// the input rows in order, so the lists come out sorted.
__global__ void transpose_kernel(const int32_t* __restrict__ counts,
                                 const int32_t* __restrict__ indices, int64_t rows, int64_t cap_in,
                                 int32_t* __restrict__ out_counts, int32_t* __restrict__ out_indices,
                                 int64_t columns, int64_t cap_out) {
  const int64_t g = blockIdx.x;
  counts += g * rows;
  indices += g * rows * cap_in;
  out_counts += g * columns;
  out_indices += g * columns * cap_out;
  for (int64_t c = threadIdx.x; c < columns; c += blockDim.x) {
    int32_t n = 0;
    for (int64_t r = 0; r < rows; ++r) {
      // Rows are sorted, so a binary search finds column c in each.
      const int32_t* row = indices + r * cap_in;
      int32_t lo = 0, hi = counts[r];
      while (lo < hi) {
        const int32_t mid = (lo + hi) / 2;
        if (row[mid] < c) lo = mid + 1; else hi = mid;
      }
      if (lo < counts[r] && row[lo] == c) {
        out_indices[c * cap_out + n++] = static_cast<int32_t>(r);
      }
    }
    out_counts[c] = n;
    for (int64_t i = n; i < cap_out; ++i) out_indices[c * cap_out + i] = -1;
  }
}

// Rows of a group's input that list column c, as bits of words[c * n_words + r / 32].
__global__ void transpose_bitmap_kernel(const int32_t* __restrict__ counts, const int32_t* __restrict__ indices,
                                        int64_t rows, int64_t cap_in, int32_t* __restrict__ out_counts,
                                        int32_t* __restrict__ out_indices, int64_t columns, int64_t cap_out,
                                        int64_t n_words) {
  extern __shared__ uint32_t s_bits[];
  int32_t* s_count = reinterpret_cast<int32_t*>(s_bits + columns * n_words);
  const int64_t g = blockIdx.x;
  counts += g * rows;
  indices += g * rows * cap_in;
  out_counts += g * columns;
  out_indices += g * columns * cap_out;
  for (int64_t i = threadIdx.x; i < columns * n_words; i += blockDim.x) s_bits[i] = 0u;
  __syncthreads();
  for (int64_t e = threadIdx.x; e < rows * cap_in; e += blockDim.x) {
    const int64_t r = e / cap_in;
    if (e % cap_in < counts[r]) {
      const int32_t c = indices[e];
      // A listed index outside the columns (a malformed list) is dropped, not written out of bounds.
      if (c >= 0 && c < columns) atomicOr(&s_bits[c * n_words + r / 32], 1u << (r % 32));
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < columns; c += blockDim.x) {
    int32_t n = 0;
    for (int64_t w = 0; w < n_words; ++w) {
      for (uint32_t bits = s_bits[c * n_words + w]; bits != 0u; bits &= bits - 1u) {
        if (n < cap_out) out_indices[c * cap_out + n] = static_cast<int32_t>(w * 32 + __ffs(bits) - 1);
        ++n;
      }
    }
    n = n < cap_out ? n : static_cast<int32_t>(cap_out);
    out_counts[c] = n;
    s_count[c] = n;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < columns * cap_out; e += blockDim.x)
    if (e % cap_out >= s_count[e / cap_out]) out_indices[e] = -1;
}

}  // namespace

void transpose_block_lists_cuda(const TensorView& counts, const TensorView& indices,
                                const TensorView& out_counts, const TensorView& out_indices) {
  const int64_t rows = counts.size(-1), columns = out_counts.size(-1);
  const int64_t groups = out_counts.numel() / (columns ? columns : 1);
  if (groups == 0 || columns == 0) return;
  DeviceGuard guard(counts.device_index);
  const int64_t n_words = (rows + 31) / 32;
  const size_t bitmap_bytes = static_cast<size_t>(columns * n_words + columns) * sizeof(uint32_t);
  constexpr size_t kDefaultSharedLimit = 48 * 1024;
  if (bitmap_bytes <= kDefaultSharedLimit) {
    transpose_bitmap_kernel<<<static_cast<unsigned>(groups), 256, bitmap_bytes, stream_of(counts.stream)>>>(
        counts.ptr<const int32_t>(), indices.ptr<const int32_t>(), rows, indices.size(-1),
        out_counts.ptr<int32_t>(), out_indices.ptr<int32_t>(), columns, out_indices.size(-1), n_words);
  } else {
    transpose_kernel<<<static_cast<unsigned>(groups), 128, 0, stream_of(counts.stream)>>>(
        counts.ptr<const int32_t>(), indices.ptr<const int32_t>(), rows, indices.size(-1),
        out_counts.ptr<int32_t>(), out_indices.ptr<int32_t>(), columns, out_indices.size(-1));
  }
  check_cuda(cudaGetLastError(), "transpose_block_lists kernel launch");
}

}  // namespace long_exposure
