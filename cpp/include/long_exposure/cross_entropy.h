// Token cross-entropy over a language model's logits, without an fp32 copy of them.
//
// HF's causal-LM loss casts the [tokens, vocab] logits to fp32 and runs log_softmax over the copy:
// at OPT's 50k vocabulary and 8192 tokens that is 1.6 GB written, read back by the backward, and
// about 5 ms of a 2048-token OPT-1.3B step on the H200 (bench/RESULTS.md). Here the forward reads
// the logits once in their own dtype and keeps each row's logsumexp (fp32, 4 bytes a token); the
// backward rebuilds the softmax from it and writes the gradient in the logits' dtype, which is
// the precision HF's gradient ends in too (its fp32 gradient is cast back). All arithmetic is fp32.
#pragma once

#include <cstdint>

#include "long_exposure/tensor_view.h"

namespace long_exposure {

// logits [N, V] (fp32, fp64 or bf16 on the CPU; fp32, bf16 or fp16 on CUDA; rows may be strided,
// a row's elements are contiguous); labels [N] int64 or int32, any stride. Writes lse [N] fp32 (the
// row's logsumexp) and loss [N] fp32 (lse - logits[row, label]). A row whose label is ignore_index
// gets loss 0. A label outside [0, V) that is not ignore_index is a contract error on the CPU; on
// CUDA, where reading labels back would stall the stream, its loss is NaN and its gradient zero.
struct CrossEntropyForwardArgs {
  TensorView logits, labels;
  int64_t ignore_index = -100;
  TensorView lse, loss;
};

// grad_logits [N, V] in the logits' dtype, contiguous:
// (softmax(logits[row]) - onehot(label)) * grad_loss[row], and zero on ignored rows.
// grad_loss [N] fp32, any stride (an expanded scalar has stride 0).
struct CrossEntropyBackwardArgs {
  TensorView logits, labels, lse, grad_loss;
  int64_t ignore_index = -100;
  TensorView grad_logits;
};

void cross_entropy_forward(const CrossEntropyForwardArgs& args);
void cross_entropy_backward(const CrossEntropyBackwardArgs& args);

void cross_entropy_forward_cpu(const CrossEntropyForwardArgs& args);
void cross_entropy_backward_cpu(const CrossEntropyBackwardArgs& args);
void cross_entropy_forward_cuda(const CrossEntropyForwardArgs& args);
void cross_entropy_backward_cuda(const CrossEntropyBackwardArgs& args);

}  // namespace long_exposure
