// The fixed-capacity block-mask formats of DESIGN.md section 4, and the operations on them that
// every operator shares: validation and transposition.
#pragma once

#include "long_exposure/tensor_view.h"

namespace long_exposure {

// MLP mask: for each tile of `tile_m` consecutive tokens of the flattened batch, the active
// blocks of `block_n` neurons. counts[int32, n_tiles], indices[int32, n_tiles, capacity]; the
// first counts[t] entries of row t are sorted, distinct block numbers, the rest is padding.
struct MlpMask {
  TensorView counts;
  TensorView indices;
  int64_t tile_m = 0;
  int64_t block_n = 0;

  int64_t n_tiles() const { return counts.size(0); }
  int64_t capacity() const { return indices.size(1); }
};

// Attention layout: for each (batch or 1, head, query block) the active key blocks, blocks of
// `block` tokens on both axes. counts[int32, Lb, H, n_q], indices[int32, Lb, H, n_q, capacity].
// The same form, transposed (for each key block the query blocks that read it), serves dK/dV.
struct BlockLayout {
  TensorView counts;
  TensorView indices;
  int64_t block = 0;

  int64_t batch() const { return counts.size(0); }
  int64_t heads() const { return counts.size(1); }
  int64_t rows() const { return counts.size(2); }
  int64_t capacity() const { return indices.size(3); }
};

int64_t ceil_div(int64_t a, int64_t b);

// Shape and dtype checks, on any device.
void check_mlp_mask_format(const MlpMask& mask, int64_t n_tokens, int64_t n_neurons);
void check_layout_format(const BlockLayout& layout, int64_t batch, int64_t heads, int64_t rows);

// Content checks (counts within capacity, indices in range, sorted and distinct). They read the
// mask, so they run on CPU masks only: a CUDA step must not wait on the host.
void check_mlp_mask_contents(const MlpMask& mask, int64_t n_blocks);
void check_layout_contents(const BlockLayout& layout, int64_t n_columns);

// Transpose a fixed-capacity block list: rows x columns -> columns x rows. Input counts
// [G, R], indices [G, R, cap_in]; output counts [G, C], indices [G, C, cap_out] with rows listed in
// increasing order. cap_out must be >= the largest output count (R always suffices); padding
// entries of the output are written as -1. Dispatches on the device of the views; the CUDA
// version runs on the views' stream without synchronising with the host.
void transpose_block_lists(const TensorView& counts, const TensorView& indices,
                           const TensorView& out_counts, const TensorView& out_indices);
void transpose_block_lists_cpu(const TensorView& counts, const TensorView& indices,
                               const TensorView& out_counts, const TensorView& out_indices);
void transpose_block_lists_cuda(const TensorView& counts, const TensorView& indices,
                                const TensorView& out_counts, const TensorView& out_indices);

}  // namespace long_exposure
