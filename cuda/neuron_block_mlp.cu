// Entry points of the neuron-block MLP on CUDA: what the tensor-core kernels need beyond the
// common contract, then the element type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>

#include "cuda_check.cuh"
#include "kernel_choice.cuh"
#include "long_exposure/mlp.h"
#include "neuron_block_mlp.cuh"

namespace long_exposure {

namespace {

// 16-byte copies need 8-element rows and 16-byte-aligned bases.
void require_aligned(const TensorView& v, const char* name) {
  if (!v.defined()) return;
  require(reinterpret_cast<uintptr_t>(v.data) % 16 == 0,
          std::string(name) + " must start on a 16-byte boundary for the CUDA kernels");
}

void require_kernel_shapes(const TensorView& x, const TensorView& w1, const MlpMask& mask,
                           const TensorView& lora1_u, const TensorView& lora2_a) {
  require(x.dtype == DType::kBFloat16 || x.dtype == DType::kFloat16,
          std::string("the CUDA neuron-block MLP takes bfloat16 or float16, not ") + dtype_name(x.dtype));
  require(mask.tile_m % 64 == 0, "the CUDA neuron-block MLP needs tile_m to be a multiple of 64, got " +
                                     std::to_string(mask.tile_m));
  require(mask.block_n % 64 == 0, "the CUDA neuron-block MLP needs block_n to be a multiple of 64, got " +
                                      std::to_string(mask.block_n));
  require(x.size(1) % 8 == 0 && w1.size(0) % 8 == 0,
          "the CUDA neuron-block MLP needs d_model and d_ffn to be multiples of 8");
  require(w1.size(0) <= INT32_MAX, "the CUDA neuron-block MLP needs d_ffn below 2^31");
  require(!lora1_u.defined() || lora1_u.size(1) % 8 == 0, "the CUDA neuron-block MLP needs the fc1 LoRA rank to be a multiple of 8");
  require(!lora2_a.defined() || lora2_a.size(0) % 8 == 0, "the CUDA neuron-block MLP needs the fc2 LoRA rank to be a multiple of 8");
}

template <typename Fn>
void dispatch(DType dtype, Fn&& fn) {
  if (dtype == DType::kBFloat16)
    fn(static_cast<__nv_bfloat16*>(nullptr));
  else
    fn(static_cast<__half*>(nullptr));
}

}  // namespace

void mlp_forward_cuda(const MlpForwardArgs& a) {
  require_kernel_shapes(a.x, a.w1, a.mask, a.lora1_u, a.lora2_a);
  for (auto [v, name] : {std::pair{&a.x, "x"}, {&a.w1, "w1"}, {&a.b1, "b1"}, {&a.w2, "w2"}, {&a.b2, "b2"},
                         {&a.lora1_u, "lora1_u"}, {&a.lora1_b, "lora1_b"}, {&a.lora2_a, "lora2_a"}, {&a.y, "y"},
                         {&a.h, "h"}, {&a.lora2_v, "lora2_v"}})
    require_aligned(*v, name);
  DeviceGuard guard(a.x.device_index);
  const bool hopper = use_wgmma_kernels(a.x.device_index, "LONG_EXPOSURE_MLP_KERNEL");
  dispatch(a.x.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    hopper ? neuron_block::forward_sm90<T>(a) : neuron_block::forward<T>(a);
  });
}

void mlp_backward_cuda(const MlpBackwardArgs& a) {
  require_kernel_shapes(a.dy, a.w1, a.mask, a.lora1_u, a.lora2_a);
  require(a.dh_workspace.defined() && a.sum_workspace.defined(),
          "the CUDA neuron-block MLP backward needs dh_workspace and sum_workspace");
  for (auto [v, name] : {std::pair{&a.dy, "dy"}, {&a.dlora2_v, "dlora2_v"}, {&a.w1, "w1"}, {&a.w2, "w2"},
                         {&a.h, "h"}, {&a.lora1_u, "lora1_u"}, {&a.lora1_b, "lora1_b"}, {&a.lora2_a, "lora2_a"},
                         {&a.dx, "dx"}, {&a.dlora1_u, "dlora1_u"}, {&a.dh_workspace, "dh_workspace"}})
    require_aligned(*v, name);
  DeviceGuard guard(a.dy.device_index);
  const bool hopper = use_wgmma_kernels(a.dy.device_index, "LONG_EXPOSURE_MLP_KERNEL");
  dispatch(a.dy.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    hopper ? neuron_block::backward_sm90<T>(a) : neuron_block::backward<T>(a);
  });
}

}  // namespace long_exposure
