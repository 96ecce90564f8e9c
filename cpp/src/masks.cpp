#include "long_exposure/masks.h"

#include <algorithm>
#include <string>
#include <vector>

namespace long_exposure {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_mlp_mask_format(const MlpMask& mask, int64_t n_tokens, int64_t n_neurons) {
  require(mask.tile_m > 0, "mask tile_m must be positive, got " + std::to_string(mask.tile_m));
  require(mask.block_n > 0, "mask block_n must be positive, got " + std::to_string(mask.block_n));
  int64_t n_tiles = ceil_div(n_tokens, mask.tile_m);
  require_shape(mask.counts, "mask counts", {n_tiles});
  require_shape(mask.indices, "mask indices", {n_tiles, -1});
  require_dtype(mask.counts, "mask counts", DType::kInt32);
  require_dtype(mask.indices, "mask indices", DType::kInt32);
  require(mask.counts.is_contiguous() && mask.indices.is_contiguous(),
          "mask counts and indices must be contiguous");
  (void)n_neurons;
}

void check_layout_format(const BlockLayout& layout, int64_t batch, int64_t heads, int64_t rows) {
  require(layout.block > 0, "layout block must be positive, got " + std::to_string(layout.block));
  require(layout.counts.defined() && layout.counts.ndim == 3,
          "layout counts must have shape [batch or 1, heads, query blocks]");
  int64_t lb = layout.counts.size(0);
  require(lb == 1 || lb == batch, "layout counts has batch " + std::to_string(lb) +
                                      ", expected 1 or " + std::to_string(batch));
  require_shape(layout.counts, "layout counts", {lb, heads, rows});
  require_shape(layout.indices, "layout indices", {lb, heads, rows, -1});
  require_dtype(layout.counts, "layout counts", DType::kInt32);
  require_dtype(layout.indices, "layout indices", DType::kInt32);
  require(layout.counts.is_contiguous() && layout.indices.is_contiguous(),
          "layout counts and indices must be contiguous");
}

namespace {

// Rows of a flattened [groups * rows] list: counts within capacity, entries sorted, distinct and
// in [0, n_columns).
void check_lists(const int32_t* counts, const int32_t* indices, int64_t n_rows, int64_t capacity,
                 int64_t n_columns, const char* what) {
  for (int64_t r = 0; r < n_rows; ++r) {
    int32_t count = counts[r];
    if (count < 0 || count > capacity)
      throw ContractError(std::string(what) + " row " + std::to_string(r) + " has count " +
                          std::to_string(count) + ", expected 0.." + std::to_string(capacity));
    const int32_t* row = indices + r * capacity;
    for (int32_t i = 0; i < count; ++i) {
      if (row[i] < 0 || row[i] >= n_columns)
        throw ContractError(std::string(what) + " row " + std::to_string(r) + " lists block " +
                            std::to_string(row[i]) + ", expected 0.." +
                            std::to_string(n_columns - 1));
      if (i > 0 && row[i] <= row[i - 1])
        throw ContractError(std::string(what) + " row " + std::to_string(r) +
                            " is not sorted and distinct");
    }
  }
}

}  // namespace

void check_mlp_mask_contents(const MlpMask& mask, int64_t n_blocks) {
  require(mask.counts.device == DeviceKind::kCPU, "mask contents can be checked on the CPU only");
  check_lists(mask.counts.ptr<int32_t>(), mask.indices.ptr<int32_t>(), mask.n_tiles(),
              mask.capacity(), n_blocks, "mask");
}

void check_layout_contents(const BlockLayout& layout, int64_t n_columns) {
  require(layout.counts.device == DeviceKind::kCPU,
          "layout contents can be checked on the CPU only");
  check_lists(layout.counts.ptr<int32_t>(), layout.indices.ptr<int32_t>(),
              layout.counts.numel(), layout.capacity(), n_columns, "layout");
}

namespace {

void check_transpose_args(const TensorView& counts, const TensorView& indices,
                          const TensorView& out_counts, const TensorView& out_indices) {
  require(counts.defined() && counts.ndim >= 1, "counts must have at least one dimension");
  require(indices.ndim == counts.ndim + 1, "indices must have one dimension more than counts");
  require(out_counts.ndim == counts.ndim && out_indices.ndim == indices.ndim,
          "outputs must have the ranks of the inputs");
  for (int i = 0; i < counts.ndim - 1; ++i)
    require(indices.shape[i] == counts.shape[i] && out_counts.shape[i] == counts.shape[i] &&
                out_indices.shape[i] == counts.shape[i],
            "counts, indices and outputs must share their leading dimensions");
  require(indices.size(counts.ndim - 1) == counts.size(-1),
          "indices must have as many rows as counts");
  require(out_indices.size(counts.ndim - 1) == out_counts.size(-1),
          "out_indices must have as many rows as out_counts");
  require(out_indices.size(-1) >= counts.size(-1),
          "out_indices capacity must be at least the number of input rows (" +
              std::to_string(counts.size(-1)) + ")");
  for (const TensorView* view : {&counts, &indices, &out_counts, &out_indices}) {
    require(view->dtype == DType::kInt32, "block lists must be int32");
    require(view->is_contiguous(), "block lists must be contiguous");
    require_same_device(*view, "block list", counts);
  }
}

}  // namespace

void transpose_block_lists_cpu(const TensorView& counts, const TensorView& indices,
                               const TensorView& out_counts, const TensorView& out_indices) {
  const int64_t rows = counts.size(-1), cap_in = indices.size(-1);
  const int64_t columns = out_counts.size(-1), cap_out = out_indices.size(-1);
  const int64_t groups = rows ? counts.numel() / rows : out_counts.numel() / std::max<int64_t>(columns, 1);
  const int32_t* in_counts = counts.ptr<const int32_t>();
  const int32_t* in_indices = indices.ptr<const int32_t>();
  int32_t* o_counts = out_counts.ptr<int32_t>();
  int32_t* o_indices = out_indices.ptr<int32_t>();
  std::fill(o_counts, o_counts + out_counts.numel(), 0);
  std::fill(o_indices, o_indices + out_indices.numel(), -1);
  for (int64_t g = 0; g < groups; ++g) {
    // Rows are visited in increasing order, so every output list comes out sorted.
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t* row = in_indices + (g * rows + r) * cap_in;
      for (int32_t i = 0; i < in_counts[g * rows + r]; ++i) {
        int64_t c = row[i];
        int32_t& n = o_counts[g * columns + c];
        o_indices[(g * columns + c) * cap_out + n++] = static_cast<int32_t>(r);
      }
    }
  }
}

void transpose_block_lists(const TensorView& counts, const TensorView& indices,
                           const TensorView& out_counts, const TensorView& out_indices) {
  check_transpose_args(counts, indices, out_counts, out_indices);
  if (counts.device == DeviceKind::kCUDA) {
    transpose_block_lists_cuda(counts, indices, out_counts, out_indices);
  } else {
    check_lists(counts.ptr<int32_t>(), indices.ptr<int32_t>(), counts.numel(), indices.size(-1),
                out_counts.size(-1), "block list");
    transpose_block_lists_cpu(counts, indices, out_counts, out_indices);
  }
}

}  // namespace long_exposure
