// The kernel configurations of block-sparse attention, declared apart from their definitions so
// that the launchers can name them while each configuration compiles in its own file.
#pragma once

#include "long_exposure/attention.h"

namespace long_exposure {
namespace attention_cuda {

// T: __nv_bfloat16 or __half; D: head dim (64, 80, 128); BLK: layout block (64, 128).
template <typename T, int D, int BLK>
void launch_forward(const AttentionForwardArgs& args);

// Needs the workspaces of AttentionBackwardArgs filled in (the transposed layout included).
template <typename T, int D, int BLK>
void launch_backward(const AttentionBackwardArgs& args);

// The forward on Hopper's wgmma (cuda/sm90a/, built for sm_90a only, so callable only where the
// build defines LONG_EXPOSURE_WITH_SM90A and the device is a compute capability 9.0 part); D 64,
// 80 or 128.
template <typename T, int D, int BLK>
void launch_forward_sm90(const AttentionForwardArgs& args);

// The backward on wgmma (cuda/sm90a/, the same conditions as launch_forward_sm90): the delta pass,
// then wgmma dK/dV and dQ kernels. Needs the workspaces filled in as launch_backward does.
template <typename T, int D, int BLK>
void launch_backward_sm90(const AttentionBackwardArgs& args);

}  // namespace attention_cuda
}  // namespace long_exposure
