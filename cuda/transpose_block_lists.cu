// Device transposition of fixed-capacity block lists (tiles per neuron block for the MLP backward,
// query blocks per key block for dK/dV). One thread block per group; each thread owns output
// columns and scans the input rows in order, so the lists come out sorted with no atomics and no
// host synchronisation. The output capacity is at least the number of rows, so nothing overflows.
#include "cuda_check.cuh"
#include "long_exposure/masks.h"

namespace long_exposure {

namespace {

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

}  // namespace

void transpose_block_lists_cuda(const TensorView& counts, const TensorView& indices,
                                const TensorView& out_counts, const TensorView& out_indices) {
  const int64_t rows = counts.size(-1), columns = out_counts.size(-1);
  const int64_t groups = out_counts.numel() / (columns ? columns : 1);
  if (groups == 0 || columns == 0) return;
  DeviceGuard guard(counts.device_index);
  transpose_kernel<<<static_cast<unsigned>(groups), 128, 0, stream_of(counts.stream)>>>(
      counts.ptr<const int32_t>(), indices.ptr<const int32_t>(), rows, indices.size(-1),
      out_counts.ptr<int32_t>(), out_indices.ptr<int32_t>(), columns, out_indices.size(-1));
  check_cuda(cudaGetLastError(), "transpose_block_lists kernel launch");
}

}  // namespace long_exposure
