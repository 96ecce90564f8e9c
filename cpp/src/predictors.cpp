#include "long_exposure/predictors.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace long_exposure {

namespace {

// The predictors read fp32 or bf16 activations: what the model runs in.
void require_predictor_dtype(const TensorView& view, const char* name) {
  require(view.dtype == DType::kFloat32 || view.dtype == DType::kBFloat16,
          std::string(name) + " has dtype " + dtype_name(view.dtype) +
              ", expected float32 or bfloat16");
}

// One argument's whole contract: shape, dtype, the device of the op's first input, contiguity.
void require_tensor(const TensorView& view, const char* name, std::initializer_list<int64_t> shape,
                    DType dtype, const TensorView& first) {
  require_shape(view, name, shape);
  require_dtype(view, name, dtype);
  require_same_device(view, name, first);
  require(view.is_contiguous(), std::string(name) + " must be contiguous");
}

}  // namespace

void check_mlp_predictor_args(const MlpPredictorArgs& a) {
  require(a.x.defined() && a.x.ndim == 2, "x must have shape [tokens, d_model]");
  require_predictor_dtype(a.x, "x");
  const int64_t tokens = a.x.size(0), d = a.x.size(1);
  require(a.down.defined() && a.down.ndim == 2, "down must have shape [rank, d_model]");
  const int64_t rank = a.down.size(0);
  require(a.up.defined() && a.up.ndim == 2, "up must have shape [n_blocks, rank]");
  const int64_t n_blocks = a.up.size(0);
  require(n_blocks >= 1, "up must have at least one row: a mask needs at least one block");
  require_tensor(a.x, "x", {tokens, d}, a.x.dtype, a.x);
  require_tensor(a.down, "down", {rank, d}, a.x.dtype, a.x);
  require_tensor(a.up, "up", {n_blocks, rank}, a.x.dtype, a.x);
  require_tensor(a.bias, "bias", {n_blocks}, a.x.dtype, a.x);
  require(!std::isnan(a.threshold), "threshold must be a number, got nan");
  require(a.tile_m > 0, "tile_m must be positive, got " + std::to_string(a.tile_m));
  const int64_t n_tiles = ceil_div(tokens, a.tile_m);
  require_tensor(a.counts, "counts", {n_tiles}, DType::kInt32, a.x);
  require_tensor(a.indices, "indices", {n_tiles, n_blocks}, DType::kInt32, a.x);
  require_tensor(a.tile_max, "tile_max", {n_tiles, n_blocks}, DType::kFloat32, a.x);
}

void check_attention_block_scores_args(const AttentionBlockScoresArgs& a) {
  require(a.hidden.defined() && a.hidden.ndim == 3, "hidden must have shape [batch, seq, d_model]");
  require_predictor_dtype(a.hidden, "hidden");
  const int64_t batch = a.hidden.size(0), seq = a.hidden.size(1), d = a.hidden.size(2);
  require(a.wq.defined() && a.wq.ndim == 3, "wq must have shape [heads, rank, d_model]");
  const int64_t heads = a.wq.size(0), rank = a.wq.size(1);
  require(rank >= 1, "wq must have rank at least 1 (its second dimension)");
  require_tensor(a.hidden, "hidden", {batch, seq, d}, a.hidden.dtype, a.hidden);
  require_tensor(a.wq, "wq", {heads, rank, d}, a.hidden.dtype, a.hidden);
  require_tensor(a.wk, "wk", {heads, rank, d}, a.hidden.dtype, a.hidden);
  require(a.block > 0, "block must be positive, got " + std::to_string(a.block));
  const int64_t n = ceil_div(seq, a.block);
  require_tensor(a.pooled, "pooled", {batch, n, d}, DType::kFloat32, a.hidden);
  require_tensor(a.scores, "scores", {batch, heads, n, n}, DType::kFloat32, a.hidden);
  if (a.hidden.device == DeviceKind::kCUDA)
    require(a.workspace.defined(),
            "workspace is required on CUDA: a [splits, batch, n, 2, heads, rank] float32 tensor");
  if (a.workspace.defined()) {
    require(a.workspace.ndim == 6 && a.workspace.size(0) >= 1,
            "workspace has shape " + shape_string(a.workspace) +
                ", expected [splits, batch, n, 2, heads, rank] with splits >= 1");
    require_tensor(a.workspace, "workspace", {a.workspace.size(0), batch, n, 2, heads, rank},
                   DType::kFloat32, a.hidden);
  }
}

int64_t attention_sketch_splits(int64_t batch, int64_t n, int64_t heads, int64_t rank,
                                int64_t d_model) {
  // Mirrors the CUDA product's 64 x 64 output tiles. About 264 thread blocks is two per SM of an
  // H100/H200 (132 SMs), what the kernel's register budget lets an SM hold at once; slices of at
  // least 128 keep each thread block's loads and partial-sum writes a small part of its time.
  constexpr int64_t kTile = 64, kTargetBlocks = 264, kMinSlice = 128;
  const int64_t tiles = ceil_div(batch * n, kTile) * ceil_div(2 * heads * rank, kTile);
  if (tiles == 0) return 1;
  return std::max<int64_t>(1, std::min(ceil_div(kTargetBlocks, tiles), ceil_div(d_model, kMinSlice)));
}

void mlp_predictor_mask(const MlpPredictorArgs& args) {
  check_mlp_predictor_args(args);
  if (args.x.device == DeviceKind::kCUDA)
    mlp_predictor_mask_cuda(args);
  else
    mlp_predictor_mask_cpu(args);
}

void attention_block_scores(const AttentionBlockScoresArgs& args) {
  check_attention_block_scores_args(args);
  if (args.hidden.device == DeviceKind::kCUDA)
    attention_block_scores_cuda(args);
  else
    attention_block_scores_cpu(args);
}

}  // namespace long_exposure
