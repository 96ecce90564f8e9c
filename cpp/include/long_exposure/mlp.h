// Neuron-block MLP: y = fc2(relu(fc1(x) + b1)) + b2 over the active (token tile, neuron block)
// pairs of an MlpMask. The frozen weights keep nn.Linear's layout: w1 [F, d], w2 [d, F].
//
// LoRA enters in the two places where it meets the sparse part, so that the dense low-rank
// products stay outside as ordinary torch ops:
//   fc1: the pre-activation gains  lora1_u @ lora1_b^T  where lora1_u = scale * x @ A1^T [T, r1]
//        is computed outside and lora1_b = B1 [F, r1];
//   fc2: the op returns lora2_v = h @ lora2_a^T [T, r2] with lora2_a = A2 [r2, F], and the caller
//        adds scale * lora2_v @ B2^T to y.
// All float tensors share one dtype (fp32, fp64 or bf16; bf16 or fp16 on CUDA, which has only the
// tensor-core kernels); accumulation is in fp32 (fp64 for fp64).
#pragma once

#include "long_exposure/masks.h"

namespace long_exposure {

struct MlpForwardArgs {
  TensorView x;        // [T, d]
  TensorView w1;       // [F, d]
  TensorView b1;       // [F], optional
  TensorView w2;       // [d, F]
  TensorView b2;       // [d], optional
  MlpMask mask;        // n_tiles = ceil(T / tile_m), block numbers < ceil(F / block_n)
  TensorView lora1_u;  // [T, r1], optional (with lora1_b)
  TensorView lora1_b;  // [F, r1], optional (with lora1_u)
  TensorView lora2_a;  // [r2, F], optional
  // Outputs, written in full by the op.
  TensorView y;        // [T, d]
  TensorView h;        // [T, F]: relu(pre-activation) on active blocks; unspecified elsewhere
                       // (the CPU writes zeros, CUDA leaves it alone unless lora2_a needs zeros)
  TensorView lora2_v;  // [T, r2], present exactly when lora2_a is
};

// The backward pass never reads x (dX = dH W1, and the LoRA factor gradients come from dH and the
// factors), so it does not take it: a caller keeps no [T, d] activation alive for it. dy gives the
// token count, dtype and device.
struct MlpBackwardArgs {
  TensorView dy;        // [T, d]
  TensorView dlora2_v;  // [T, r2], optional: the gradient reaching lora2_v
  TensorView w1, w2, h;
  MlpMask mask;
  TensorView lora1_u, lora1_b, lora2_a;  // as in the forward
  // Outputs; each optional one is computed when present.
  TensorView dx;        // [T, d]
  TensorView db1;       // [F]   (zero on neurons no tile activates)
  TensorView db2;       // [d]
  TensorView dlora1_u;  // [T, r1]
  TensorView dlora1_b;  // [F, r1]
  TensorView dlora2_a;  // [r2, F]
  // Scratch the CUDA kernels need (the core never allocates); the CPU ignores them.
  TensorView dh_workspace;   // [T, F], x's dtype
  TensorView sum_workspace;  // [F + d] fp32
};

void mlp_forward(const MlpForwardArgs& args);
void mlp_backward(const MlpBackwardArgs& args);

// Per-device implementations behind the dispatchers above. Arguments are already checked.
void mlp_forward_cpu(const MlpForwardArgs& args);
void mlp_backward_cpu(const MlpBackwardArgs& args);
// CUDA (cuda/neuron_block_mlp*.cu): tile_m and block_n multiples of 64, d_model, d_ffn and the LoRA
// ranks multiples of 8, 16-byte-aligned tensors; runs on the output's stream without host sync.
void mlp_forward_cuda(const MlpForwardArgs& args);
void mlp_backward_cuda(const MlpBackwardArgs& args);

// Shape/dtype/device contract of the arguments; throws ContractError naming the argument.
void check_mlp_forward_args(const MlpForwardArgs& args);
void check_mlp_backward_args(const MlpBackwardArgs& args);

}  // namespace long_exposure
