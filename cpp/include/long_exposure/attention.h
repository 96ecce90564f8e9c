// Block-sparse causal attention with optional prefix keys/values (prefix and P-tuning).
//
// Query i of the sequence attends (a) every prefix key, and (b) sequence keys j <= i whose key
// block is listed in the layout row of i's query block. Queries and keys share one block size.
// A query with nothing to attend gets a zero output and logsumexp -inf, and no gradient.
// q, k, v, out: [B, H, S, D] with any strides whose last one is 1; prefix_k/v: [B, H, P, D].
// The logsumexp (natural log, of the scaled scores) is saved as fp32 [B, H, S].
#pragma once

#include "long_exposure/masks.h"

namespace long_exposure {

struct AttentionForwardArgs {
  TensorView q, k, v;
  TensorView prefix_k, prefix_v;  // optional, together
  BlockLayout layout;             // rows = ceil(S / block), batch 1 or B
  double scale = 0.0;             // softmax scale applied to q.k
  // Outputs.
  TensorView out;  // [B, H, S, D]
  TensorView lse;  // [B, H, S] fp32
};

struct AttentionBackwardArgs {
  TensorView dout;
  TensorView q, k, v;
  TensorView prefix_k, prefix_v;
  TensorView out, lse;
  BlockLayout layout;
  double scale = 0.0;
  // Outputs; dprefix_k/v are computed when present.
  TensorView dq, dk, dv;
  TensorView dprefix_k, dprefix_v;
  // Workspaces of the CUDA path, allocated by the caller (the core never allocates device memory;
  // the CPU path ignores them): rowsum(dout * out) fp32 [B, H, S], and the layout transposed,
  // counts int32 [Lb, H, n_q] and indices int32 [Lb, H, n_q, n_q].
  TensorView ws_delta, ws_q_counts, ws_q_indices;
};

void attention_forward(const AttentionForwardArgs& args);
void attention_backward(const AttentionBackwardArgs& args);

void attention_forward_cpu(const AttentionForwardArgs& args);
void attention_backward_cpu(const AttentionBackwardArgs& args);

// CUDA kernels for bf16/fp16, head dims 64, 80 and 128, blocks 64 and 128 (attention_cuda_supports
// says whether a call qualifies); the views must be 16-byte aligned with strides in multiples of
// 8 elements. Launched on q's stream with no host synchronisation.
bool attention_cuda_supports(DType dtype, int64_t head_dim, int64_t block);
void attention_forward_cuda(const AttentionForwardArgs& args);
void attention_backward_cuda(const AttentionBackwardArgs& args);

void check_attention_forward_args(const AttentionForwardArgs& args);
void check_attention_backward_args(const AttentionBackwardArgs& args);

}  // namespace long_exposure
