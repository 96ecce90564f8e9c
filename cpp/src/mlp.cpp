#include "long_exposure/mlp.h"

#include <stdexcept>
#include <string>

namespace long_exposure {

namespace {

bool is_float_dtype(DType dtype, DeviceKind device) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat64 || dtype == DType::kBFloat16 ||
         (dtype == DType::kFloat16 && device == DeviceKind::kCUDA);
}

// Every float argument shares x's dtype and device, and is contiguous.
void require_like(const TensorView& view, const char* name, const TensorView& x) {
  if (!view.defined()) return;
  require_dtype(view, name, x.dtype);
  require_same_device(view, name, x);
  require(view.is_contiguous(), std::string(name) + " must be contiguous");
}

struct MlpDims {
  int64_t tokens, model, neurons, r1, r2;
};

// `x` is the forward's input, or dy for the backward (same shape, dtype and device); `x_name` names it.
MlpDims check_common(const TensorView& x, const char* x_name, const TensorView& w1, const TensorView& w2,
                     const MlpMask& mask, const TensorView& lora1_u, const TensorView& lora1_b,
                     const TensorView& lora2_a) {
  require(x.defined() && x.ndim == 2, std::string(x_name) + " must have shape [tokens, d_model]");
  require(is_float_dtype(x.dtype, x.device), std::string(x_name) + " has dtype " + dtype_name(x.dtype) +
                                                 ", expected float32, float64 or bfloat16 (or float16 on CUDA)");
  MlpDims dims{x.size(0), x.size(1), 0, 0, 0};
  require(w1.defined() && w1.ndim == 2, "w1 (fc1 weight) must have shape [d_ffn, d_model]");
  dims.neurons = w1.size(0);
  require_shape(w1, "w1 (fc1 weight)", {dims.neurons, dims.model});
  require_shape(w2, "w2 (fc2 weight)", {dims.model, dims.neurons});
  require_like(x, x_name, x);
  require_like(w1, "w1 (fc1 weight)", x);
  require_like(w2, "w2 (fc2 weight)", x);
  require(lora1_u.defined() == lora1_b.defined(), "lora1_u and lora1_b come together");
  if (lora1_u.defined()) {
    require(lora1_u.ndim == 2, "lora1_u must have shape [tokens, r1]");
    dims.r1 = lora1_u.size(1);
    require_shape(lora1_u, "lora1_u", {dims.tokens, dims.r1});
    require_shape(lora1_b, "lora1_b", {dims.neurons, dims.r1});
    require_like(lora1_u, "lora1_u", x);
    require_like(lora1_b, "lora1_b", x);
  }
  if (lora2_a.defined()) {
    require(lora2_a.ndim == 2, "lora2_a must have shape [r2, d_ffn]");
    dims.r2 = lora2_a.size(0);
    require_shape(lora2_a, "lora2_a", {dims.r2, dims.neurons});
    require_like(lora2_a, "lora2_a", x);
  }
  check_mlp_mask_format(mask, dims.tokens, dims.neurons);
  require_same_device(mask.counts, "mask counts", x);
  require_same_device(mask.indices, "mask indices", x);
  return dims;
}

}  // namespace

void check_mlp_forward_args(const MlpForwardArgs& a) {
  MlpDims dims = check_common(a.x, "x", a.w1, a.w2, a.mask, a.lora1_u, a.lora1_b, a.lora2_a);
  if (a.b1.defined()) require_shape(a.b1, "b1 (fc1 bias)", {dims.neurons});
  if (a.b2.defined()) require_shape(a.b2, "b2 (fc2 bias)", {dims.model});
  require_like(a.b1, "b1 (fc1 bias)", a.x);
  require_like(a.b2, "b2 (fc2 bias)", a.x);
  require_shape(a.y, "y", {dims.tokens, dims.model});
  require_shape(a.h, "h", {dims.tokens, dims.neurons});
  require_like(a.y, "y", a.x);
  require_like(a.h, "h", a.x);
  require(a.lora2_v.defined() == a.lora2_a.defined(), "lora2_v is an output exactly when lora2_a is given");
  if (a.lora2_v.defined()) {
    require_shape(a.lora2_v, "lora2_v", {dims.tokens, dims.r2});
    require_like(a.lora2_v, "lora2_v", a.x);
  }
}

void check_mlp_backward_args(const MlpBackwardArgs& a) {
  MlpDims dims = check_common(a.dy, "dy", a.w1, a.w2, a.mask, a.lora1_u, a.lora1_b, a.lora2_a);
  require_shape(a.h, "h", {dims.tokens, dims.neurons});
  require_like(a.h, "h", a.dy);
  if (a.dlora2_v.defined()) {
    require(a.lora2_a.defined(), "dlora2_v needs lora2_a");
    require_shape(a.dlora2_v, "dlora2_v", {dims.tokens, dims.r2});
    require_like(a.dlora2_v, "dlora2_v", a.dy);
  }
  require_shape(a.dx, "dx", {dims.tokens, dims.model});
  require_like(a.dx, "dx", a.dy);
  if (a.db1.defined()) require_shape(a.db1, "db1", {dims.neurons});
  if (a.db2.defined()) require_shape(a.db2, "db2", {dims.model});
  require_like(a.db1, "db1", a.dy);
  require_like(a.db2, "db2", a.dy);
  if (a.dlora1_u.defined() || a.dlora1_b.defined())
    require(a.lora1_u.defined(), "dlora1_u and dlora1_b need lora1_u and lora1_b");
  if (a.dlora1_u.defined()) require_shape(a.dlora1_u, "dlora1_u", {dims.tokens, dims.r1});
  if (a.dlora1_b.defined()) require_shape(a.dlora1_b, "dlora1_b", {dims.neurons, dims.r1});
  require_like(a.dlora1_u, "dlora1_u", a.dy);
  require_like(a.dlora1_b, "dlora1_b", a.dy);
  if (a.dlora2_a.defined()) {
    require(a.lora2_a.defined(), "dlora2_a needs lora2_a");
    require_shape(a.dlora2_a, "dlora2_a", {dims.r2, dims.neurons});
    require_like(a.dlora2_a, "dlora2_a", a.dy);
  }
  if (a.dh_workspace.defined()) {
    require_shape(a.dh_workspace, "dh_workspace", {dims.tokens, dims.neurons});
    require_like(a.dh_workspace, "dh_workspace", a.dy);
  }
  if (a.sum_workspace.defined()) {
    require_shape(a.sum_workspace, "sum_workspace", {dims.neurons + dims.model});
    require_dtype(a.sum_workspace, "sum_workspace", DType::kFloat32);
    require_same_device(a.sum_workspace, "sum_workspace", a.dy);
  }
}

void mlp_forward(const MlpForwardArgs& args) {
  check_mlp_forward_args(args);
  if (args.x.device == DeviceKind::kCPU) {
    check_mlp_mask_contents(args.mask, ceil_div(args.w1.size(0), args.mask.block_n));
    mlp_forward_cpu(args);
  } else {
    mlp_forward_cuda(args);
  }
}

void mlp_backward(const MlpBackwardArgs& args) {
  check_mlp_backward_args(args);
  if (args.dy.device == DeviceKind::kCPU) {
    check_mlp_mask_contents(args.mask, ceil_div(args.w1.size(0), args.mask.block_n));
    mlp_backward_cpu(args);
  } else {
    mlp_backward_cuda(args);
  }
}

}  // namespace long_exposure
