// Launchers of the block-sparse attention kernels: the alignment contract of the fast path, the
// choice of kernel configuration, and the backward's transposition of the layout on device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>

#include "block_sparse_attention_launch.cuh"
#include "cuda_check.cuh"
#include "kernel_choice.cuh"

namespace long_exposure {

namespace {

// cp.async and TMA move 16-byte pieces, so every row of every operand must start on 16 bytes; a
// TMA map also takes no stride of 0 (a broadcast dimension) where the extent is above 1.
void require_aligned(const TensorView& view, const char* name) {
  if (!view.defined()) return;
  bool ok = reinterpret_cast<uintptr_t>(view.data) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && view.stride(d) % 8 == 0 && (view.stride(d) != 0 || view.size(d) == 1);
  require(ok, std::string(name) +
                  " must start on 16 bytes with strides in nonzero multiples of 8 elements (but where a dimension "
                  "has extent 1) for the CUDA attention kernels");
}

void require_supported(DType dtype, int64_t head_dim, int64_t block) {
  require(attention_cuda_supports(dtype, head_dim, block),
          std::string("the CUDA attention kernels take bf16 or fp16 with head dim 64, 80 or 128 "
                      "and block 64 or 128, not ") +
              dtype_name(dtype) + " with head dim " + std::to_string(head_dim) + " and block " +
              std::to_string(block));
}

template <typename Fn>
void dispatch(DType dtype, int64_t head_dim, int64_t block, Fn&& fn) {
  auto with_block = [&](auto tag, auto dim) {
    if (block == 64)
      fn(tag, dim, std::integral_constant<int, 64>{});
    else
      fn(tag, dim, std::integral_constant<int, 128>{});
  };
  auto with_dim = [&](auto tag) {
    if (head_dim == 64)
      with_block(tag, std::integral_constant<int, 64>{});
    else if (head_dim == 80)
      with_block(tag, std::integral_constant<int, 80>{});
    else
      with_block(tag, std::integral_constant<int, 128>{});
  };
  if (dtype == DType::kBFloat16)
    with_dim(__nv_bfloat16{});
  else
    with_dim(__half{});
}

using Named = std::initializer_list<std::pair<const TensorView*, const char*>>;

// Runs Launch::wgmma<T, D, BLK>(a) where the wgmma kernels (cuda/sm90a/) take the call (every
// head dim on a Hopper, unless LONG_EXPOSURE_ATTENTION_KERNEL=mma), Launch::portable otherwise.
template <typename Launch, typename Args>
void launch_kernels(const Args& a) {
  const bool hopper = use_wgmma_kernels(a.q.device_index, "LONG_EXPOSURE_ATTENTION_KERNEL");
  dispatch(a.q.dtype, a.q.size(3), a.layout.block, [&](auto tag, auto dim, auto blk) {
    using T = decltype(tag);
    constexpr int kDim = decltype(dim)::value, kBlock = decltype(blk)::value;
#ifdef LONG_EXPOSURE_WITH_SM90A
    if (hopper) {
      Launch::template wgmma<T, kDim, kBlock>(a);
      return;
    }
#else
    (void)hopper;
#endif
    Launch::template portable<T, kDim, kBlock>(a);
  });
}

struct ForwardLaunch {
  template <typename T, int D, int BLK>
  static void wgmma(const AttentionForwardArgs& a) { attention_cuda::launch_forward_sm90<T, D, BLK>(a); }
  template <typename T, int D, int BLK>
  static void portable(const AttentionForwardArgs& a) { attention_cuda::launch_forward<T, D, BLK>(a); }
};

struct BackwardLaunch {
  template <typename T, int D, int BLK>
  static void wgmma(const AttentionBackwardArgs& a) { attention_cuda::launch_backward_sm90<T, D, BLK>(a); }
  template <typename T, int D, int BLK>
  static void portable(const AttentionBackwardArgs& a) { attention_cuda::launch_backward<T, D, BLK>(a); }
};

}  // namespace

bool attention_cuda_supports(DType dtype, int64_t head_dim, int64_t block) {
  return (dtype == DType::kBFloat16 || dtype == DType::kFloat16) &&
         (head_dim == 64 || head_dim == 80 || head_dim == 128) && (block == 64 || block == 128);
}

void attention_forward_cuda(const AttentionForwardArgs& a) {
  const int64_t D = a.q.size(3), block = a.layout.block;
  require_supported(a.q.dtype, D, block);
  for (auto [view, name] : Named{{&a.q, "q"}, {&a.k, "k"}, {&a.v, "v"}, {&a.out, "out"},
                                 {&a.prefix_k, "prefix_k"}, {&a.prefix_v, "prefix_v"}})
    require_aligned(*view, name);
  if (a.q.numel() == 0) return;
  DeviceGuard guard(a.q.device_index);
  launch_kernels<ForwardLaunch>(a);
}

void attention_backward_cuda(const AttentionBackwardArgs& a) {
  const int64_t B = a.q.size(0), H = a.q.size(1), S = a.q.size(2), D = a.q.size(3);
  const int64_t block = a.layout.block, n_q = a.layout.rows(), Lb = a.layout.batch();
  require_supported(a.q.dtype, D, block);
  for (auto [view, name] :
       Named{{&a.q, "q"}, {&a.k, "k"}, {&a.v, "v"}, {&a.dout, "dout"}, {&a.out, "out"},
        {&a.dq, "dq"}, {&a.dk, "dk"}, {&a.dv, "dv"}, {&a.prefix_k, "prefix_k"},
        {&a.prefix_v, "prefix_v"}, {&a.dprefix_k, "dprefix_k"}, {&a.dprefix_v, "dprefix_v"}})
    require_aligned(*view, name);
  require_shape(a.ws_delta, "ws_delta", {B, H, S});
  require_dtype(a.ws_delta, "ws_delta", DType::kFloat32);
  require(a.ws_delta.is_contiguous(), "ws_delta must be contiguous");
  require_shape(a.ws_q_counts, "ws_q_counts", {Lb, H, n_q});
  require_shape(a.ws_q_indices, "ws_q_indices", {Lb, H, n_q, n_q});
  require_dtype(a.ws_q_counts, "ws_q_counts", DType::kInt32);
  require_dtype(a.ws_q_indices, "ws_q_indices", DType::kInt32);
  require(a.ws_q_counts.is_contiguous() && a.ws_q_indices.is_contiguous(),
          "ws_q_counts and ws_q_indices must be contiguous");
  for (auto [view, name] : Named{{&a.ws_delta, "ws_delta"}, {&a.ws_q_counts, "ws_q_counts"},
                                 {&a.ws_q_indices, "ws_q_indices"}})
    require_same_device(*view, name, a.q);
  if (a.q.numel() == 0) return;
  DeviceGuard guard(a.q.device_index);
  // The workspaces carry no stream of their own: the transposition runs on q's.
  TensorView t_counts = a.ws_q_counts, t_indices = a.ws_q_indices;
  TensorView counts = a.layout.counts;
  t_counts.stream = t_indices.stream = counts.stream = a.q.stream;
  transpose_block_lists_cuda(counts, a.layout.indices, t_counts, t_indices);
  launch_kernels<BackwardLaunch>(a);
}

}  // namespace long_exposure
