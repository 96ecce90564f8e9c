// Predictor inference (DESIGN.md section 1, component 2): the per-step part of the predictors,
// from the frozen model's activations to the block masks and block scores the operators read.
//
// MLP predictor: a low-rank projection of the MLP input to one logit per neuron block,
//   z[t, j]      = sum_k x[t, k] * down[j, k]                  (rank r)
//   logits[t, b] = sum_j z[t, j] * up[b, j] + bias[b]
// reduced over each tile of tile_m tokens (tile i covers tokens [i*tile_m, min(T, (i+1)*tile_m)))
// by a max, then thresholded straight into the fixed-capacity MlpMask of masks.h: block b is active
// in tile i when tile_max[i, b] > threshold (strictly, compared in fp32). A tile where no block
// passes keeps exactly one, its highest tile_max (the lowest block number on ties), so every tile
// computes something. Inputs are fp32 or bf16; sums are in fp32. For bf16 inputs z is rounded to
// bf16 before the second product, as the same computation in torch bf16 stores it; logits and
// tile_max stay fp32.
//
// Attention predictor: per-head low-rank Q/K sketches of block-pooled hidden states,
//   pooled[b, i, :] = mean of hidden[b, t, :] over the tokens of block i (the last block may be short)
//   qs[b, h, i, :]  = wq[h] @ pooled[b, i, :],   ks[b, h, i, :] = wk[h] @ pooled[b, i, :]
//   scores[b, h, i, j] = softmax over j <= i of qs[b, h, i, :] . ks[b, h, j, :] / sqrt(r),
// and 0 for j > i: one causal block score map per (batch, head), each row summing to 1, which the
// pattern pool projects onto its atoms. Inputs are fp32 or bf16, widened to fp32; every
// intermediate and the scores are fp32.
//
// Both dispatch on the device of their inputs. The CUDA versions run on the stream of their
// output views and never synchronise with the host, so a step that calls them can be captured in
// a CUDA graph.
#pragma once

#include "long_exposure/masks.h"

namespace long_exposure {

struct MlpPredictorArgs {
  TensorView x;            // [T, d]
  TensorView down;         // [r, d], x's dtype
  TensorView up;           // [nb, r], nb >= 1
  TensorView bias;         // [nb]
  double threshold = 0.0;  // not NaN; +inf keeps only each tile's best block
  int64_t tile_m = 0;
  // Outputs, written in full: an MlpMask with capacity nb, and the tile maxima it was cut from.
  TensorView counts;    // [n_tiles] int32, n_tiles = ceil(T / tile_m)
  TensorView indices;   // [n_tiles, nb] int32, sorted, padding -1
  TensorView tile_max;  // [n_tiles, nb] fp32
};

struct AttentionBlockScoresArgs {
  TensorView hidden;  // [B, S, d]
  TensorView wq, wk;  // [H, r, d], hidden's dtype, r >= 1
  int64_t block = 0;
  // Outputs, written in full. pooled is the block means; the CUDA version also keeps it as the
  // one intermediate shared by all heads.
  TensorView pooled;  // [B, n, d] fp32, n = ceil(S / block)
  TensorView scores;  // [B, H, n, n] fp32
  // Scratch, required on CUDA and ignored (may be absent) on the CPU; the core never allocates.
  // The CUDA version computes every head's sketches in one tiled product and, so that a product
  // this short and wide fills the GPU, splits its model dimension into `splits` slices whose
  // partial sums land here ([s, b, i, 0, h, :] the Q sketch of slice s, [s, b, i, 1, h, :] the K
  // sketch) and are added up in a fixed order when scored. Any splits >= 1 gives the same scores
  // up to fp32 rounding; attention_sketch_splits picks one. Its contents on return are unspecified.
  TensorView workspace;  // [splits, B, n, 2, H, r] fp32
};

void mlp_predictor_mask(const MlpPredictorArgs& args);
void attention_block_scores(const AttentionBlockScoresArgs& args);

// A split count for AttentionBlockScoresArgs::workspace: enough slices of d_model that the sketch
// product has thread blocks for every SM of a large GPU, none so short that its fixed costs
// dominate. It depends on the shapes alone, so a shape's scores are the same on every device.
int64_t attention_sketch_splits(int64_t batch, int64_t n, int64_t heads, int64_t rank,
                                int64_t d_model);

// Per-device implementations behind the dispatchers above. Arguments are already checked.
void mlp_predictor_mask_cpu(const MlpPredictorArgs& args);
void mlp_predictor_mask_cuda(const MlpPredictorArgs& args);
void attention_block_scores_cpu(const AttentionBlockScoresArgs& args);
void attention_block_scores_cuda(const AttentionBlockScoresArgs& args);

// Shape/dtype/device contract of the arguments; throws ContractError naming the argument.
void check_mlp_predictor_args(const MlpPredictorArgs& args);
void check_attention_block_scores_args(const AttentionBlockScoresArgs& args);

}  // namespace long_exposure
