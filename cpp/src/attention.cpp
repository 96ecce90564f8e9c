#include "long_exposure/attention.h"

#include <stdexcept>
#include <string>

namespace long_exposure {

namespace {

bool is_float_dtype(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat64 || dtype == DType::kBFloat16 ||
         dtype == DType::kFloat16;
}

void require_bhsd(const TensorView& view, const char* name, const TensorView& q, int64_t seq) {
  require_shape(view, name, {q.size(0), q.size(1), seq, q.size(3)});
  require_dtype(view, name, q.dtype);
  require_same_device(view, name, q);
  require(view.stride(3) == 1, std::string(name) + " must have a contiguous last dimension");
}

struct AttentionDims {
  int64_t batch, heads, seq, head_dim, prefix;
};

AttentionDims check_common(const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView& prefix_k, const TensorView& prefix_v,
                           const BlockLayout& layout, double scale) {
  require(q.defined() && q.ndim == 4, "q must have shape [batch, heads, seq, head_dim]");
  require(is_float_dtype(q.dtype), std::string("q has dtype ") + dtype_name(q.dtype) +
                                       ", expected a floating dtype");
  AttentionDims dims{q.size(0), q.size(1), q.size(2), q.size(3), 0};
  require_bhsd(q, "q", q, dims.seq);
  require_bhsd(k, "k", q, dims.seq);
  require_bhsd(v, "v", q, dims.seq);
  require(prefix_k.defined() == prefix_v.defined(), "prefix_k and prefix_v come together");
  if (prefix_k.defined()) {
    require(prefix_k.ndim == 4, "prefix_k must have shape [batch, heads, prefix, head_dim]");
    dims.prefix = prefix_k.size(2);
    require_bhsd(prefix_k, "prefix_k", q, dims.prefix);
    require_bhsd(prefix_v, "prefix_v", q, dims.prefix);
  }
  require(scale > 0.0, "scale must be positive");
  require(layout.block > 0, "layout block must be positive");
  check_layout_format(layout, dims.batch, dims.heads, ceil_div(dims.seq, layout.block));
  require_same_device(layout.counts, "layout counts", q);
  require_same_device(layout.indices, "layout indices", q);
  return dims;
}

// The CUDA kernels' grids take (head, batch row) pairs as y, which stops at 65535.
void check_cuda_grid(const TensorView& q) {
  require(q.size(0) * q.size(1) <= 65535, "the CUDA attention kernels take at most 65535 heads times batch rows");
}

}  // namespace

void check_attention_forward_args(const AttentionForwardArgs& a) {
  AttentionDims dims = check_common(a.q, a.k, a.v, a.prefix_k, a.prefix_v, a.layout, a.scale);
  require_bhsd(a.out, "out", a.q, dims.seq);
  require_shape(a.lse, "lse", {dims.batch, dims.heads, dims.seq});
  require_dtype(a.lse, "lse", DType::kFloat32);
  require(a.lse.is_contiguous(), "lse must be contiguous");
}

void check_attention_backward_args(const AttentionBackwardArgs& a) {
  AttentionDims dims = check_common(a.q, a.k, a.v, a.prefix_k, a.prefix_v, a.layout, a.scale);
  require_bhsd(a.dout, "dout", a.q, dims.seq);
  require_bhsd(a.out, "out", a.q, dims.seq);
  require_shape(a.lse, "lse", {dims.batch, dims.heads, dims.seq});
  require_dtype(a.lse, "lse", DType::kFloat32);
  require(a.lse.is_contiguous(), "lse must be contiguous");
  require_bhsd(a.dq, "dq", a.q, dims.seq);
  require_bhsd(a.dk, "dk", a.q, dims.seq);
  require_bhsd(a.dv, "dv", a.q, dims.seq);
  require(a.dprefix_k.defined() == a.dprefix_v.defined(), "dprefix_k and dprefix_v come together");
  if (a.dprefix_k.defined()) {
    require(a.prefix_k.defined(), "dprefix_k needs prefix_k");
    require_bhsd(a.dprefix_k, "dprefix_k", a.q, dims.prefix);
    require_bhsd(a.dprefix_v, "dprefix_v", a.q, dims.prefix);
  }
}

void attention_forward(const AttentionForwardArgs& args) {
  check_attention_forward_args(args);
  if (args.q.device == DeviceKind::kCPU) {
    check_layout_contents(args.layout, ceil_div(args.q.size(2), args.layout.block));
    attention_forward_cpu(args);
  } else {
    check_cuda_grid(args.q);
    attention_forward_cuda(args);
  }
}

void attention_backward(const AttentionBackwardArgs& args) {
  check_attention_backward_args(args);
  if (args.q.device == DeviceKind::kCPU) {
    check_layout_contents(args.layout, ceil_div(args.q.size(2), args.layout.block));
    attention_backward_cpu(args);
  } else {
    check_cuda_grid(args.q);
    attention_backward_cuda(args);
  }
}

}  // namespace long_exposure
