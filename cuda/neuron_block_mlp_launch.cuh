// Host side of the neuron-block MLP kernels: grids, shared memory and the order of launches, for
// one element type (instantiated once per type in neuron_block_mlp_<type>.cu).
#pragma once

#include <cstdlib>
#include <string>

#include "cuda_check.cuh"
#include "float_kernels.cuh"
#include "kernel_choice.cuh"
#include "neuron_block_mlp.cuh"
#include "tma.cuh"

namespace long_exposure {
namespace neuron_block {

inline unsigned pieces(int64_t n, int64_t size) { return static_cast<unsigned>((n + size - 1) / size); }

template <typename T>
const T* ptr_or_null(const TensorView& v) {
  return v.defined() ? v.ptr<const T>() : nullptr;
}
template <typename T>
T* out_or_null(const TensorView& v) {
  return v.defined() ? v.ptr<T>() : nullptr;
}

// The token tiles fc1 and dH take together (grouped_pair_position), as LONG_EXPOSURE_MLP_TILE_GROUP
// names them; 0 when it names none: the engine's own choice (1, each tile's slots side by side, on
// engines with one tile per thread block; PersistentEngine::run's on the persistent one).
inline int tile_group() {
  const char* value = std::getenv("LONG_EXPOSURE_MLP_TILE_GROUP");
  const int chosen = value ? std::atoi(value) : 0;
  return chosen > 0 ? chosen : 0;
}

// LONG_EXPOSURE_MLP_TILE_ORDER=grid: the persistent engine's fc2 and dX tiles in the grid's order
// (PersistentEngine::run), to compare.
inline bool grid_order() { return kernel_variable_is("LONG_EXPOSURE_MLP_TILE_ORDER", "grid"); }

// x: the forward's input, or dy in the backward (the same [T, d]).
inline Dims dims_of(const TensorView& x, const TensorView& w1, const MlpMask& mask, const TensorView& lora1_u,
                    const TensorView& lora2_a) {
  return Dims{x.size(0),
              x.size(1),
              w1.size(0),
              lora1_u.defined() ? lora1_u.size(1) : 0,
              lora2_a.defined() ? lora2_a.size(0) : 0,
              mask.tile_m,
              mask.block_n,
              mask.capacity(),
              tile_group(),
              grid_order()};
}

// One of the four products: grid (Work::width, Work::height) of one tile each, or for a
// persistent engine one row of as many thread blocks as the SMs hold at once, capped at the tiles.
template <typename Engine, template <typename, typename> class Work, typename T, typename Kernel, typename Params>
void launch(Kernel kernel, cudaStream_t stream, int device, const Params& params, const char* name) {
  using W = Work<T, Engine>;
  const unsigned width = W::width(params), height = W::height(params);
  if (width == 0 || height == 0) return;
  dim3 grid(width, height);
  if constexpr (Engine::kPersistent) {
    static int sms = 0;  // per process: the library drives one kind of device at a time
    if (sms == 0) check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), name);
    const uint64_t tiles = static_cast<uint64_t>(width) * height, resident = static_cast<uint64_t>(sms) * Engine::kMinBlocks;
    grid = dim3(static_cast<unsigned>(tiles < resident ? tiles : resident));
  }
  constexpr int bytes = Engine::shared_bytes() + EpilogueShared<Engine>::kBytes;
  reserve_shared_memory(kernel, bytes, device, name);
  kernel<<<grid, Engine::kThreads, bytes, stream>>>(params);
  check_cuda(cudaGetLastError(), name);
}

// The tensor maps of a TMA engine's operands (Engine::kABoxRows tall boxes of A operands,
// kBBoxRows of B ones), named after the pointers of the params they describe.
template <typename Engine, typename T>
ForwardMaps forward_maps(const ForwardParams<T>& p) {
  const Dims& d = p.dims;
  constexpr int a = Engine::kABoxRows, b = Engine::kBBoxRows;
  ForwardMaps m{};
  m.x = tma::matrix_map(p.x, d.tokens, d.model, a, "x");
  m.w1 = tma::matrix_map(p.w1, d.neurons, d.model, b, "w1");
  m.h = tma::matrix_map(p.h, d.tokens, d.neurons, a, "h");
  m.w2 = tma::matrix_map(p.w2, d.model, d.neurons, b, "w2");
  m.lora1_u = tma::matrix_map(p.lora1_u, d.tokens, d.r1, a, "lora1_u");
  m.lora1_b = tma::matrix_map(p.lora1_b, d.neurons, d.r1, b, "lora1_b");
  m.lora2_a = tma::matrix_map(p.lora2_a, d.r2, d.neurons, b, "lora2_a");
  m.y = tma::matrix_map(static_cast<const T*>(p.y), d.tokens, d.model, a, "y");
  return m;
}
// The backward's B operands are the forward's weights read MN-major: the boxes run along their
// contiguous dimension (neurons of w2 and lora2_a, model columns of w1, rank of lora1_b).
template <typename Engine, typename T>
BackwardMaps backward_maps(const BackwardParams<T>& p) {
  const Dims& d = p.dims;
  constexpr int a = Engine::kABoxRows, b = Engine::kBBoxRows;
  BackwardMaps m{};
  m.dy = tma::matrix_map(p.dy, d.tokens, d.model, a, "dy");
  m.dlora2_v = tma::matrix_map(p.dlora2_v, d.tokens, d.r2, a, "dlora2_v");
  m.w2 = tma::matrix_map(p.w2, d.model, d.neurons, b, "w2");
  m.lora2_a = tma::matrix_map(p.lora2_a, d.r2, d.neurons, b, "lora2_a");
  m.dh = tma::matrix_map(static_cast<const T*>(p.dh), d.tokens, d.neurons, a, "dh");
  m.w1 = tma::matrix_map(p.w1, d.neurons, d.model, b, "w1");
  m.lora1_b = tma::matrix_map(p.lora1_b, d.neurons, d.r1, b, "lora1_b");
  m.dx = tma::matrix_map(static_cast<const T*>(p.dx), d.tokens, d.model, a, "dx");
  return m;
}

// The 64 x 64 tile for 64-neuron blocks, whichever engine takes the 128-wide tiles.
template <typename T, bool B_KMAJOR>
using NarrowEngine = mma::Engine<T, 64, B_KMAJOR, kStages>;

// Wide<T, B_KMAJOR> is the engine of fc2 and dX, and of fc1 and dH on 128-neuron multiples:
// mma::Engine (64 x 128) on any chip, wgmma::Engine (64 or 128 x 256, B in 128-wide pieces) on
// sm_90a (sm90a/neuron_block_mlp_*.cu).
template <typename T, template <typename, bool> class Wide>
void forward_with(const MlpForwardArgs& a) {
  ForwardParams<T> p{dims_of(a.x, a.w1, a.mask, a.lora1_u, a.lora2_a),
                     a.x.ptr<const T>(), a.w1.ptr<const T>(), ptr_or_null<T>(a.b1), a.w2.ptr<const T>(),
                     ptr_or_null<T>(a.b2), ptr_or_null<T>(a.lora1_u), ptr_or_null<T>(a.lora1_b),
                     ptr_or_null<T>(a.lora2_a), a.mask.counts.ptr<const int32_t>(),
                     a.mask.indices.ptr<const int32_t>(), a.y.ptr<T>(), a.h.ptr<T>(), out_or_null<T>(a.lora2_v)};
  const Dims& d = p.dims;
  const cudaStream_t stream = stream_of(a.y.stream);
  const int device = a.x.device_index;
  // dA2 = H^T @ dV2 runs dense over tokens in the backward pass: it needs zeros off the mask.
  if (p.lora2_a && d.tokens * d.neurons > 0)
    check_cuda(cudaMemsetAsync(p.h, 0, sizeof(T) * d.tokens * d.neurons, stream), "cudaMemsetAsync");
  using Wide1 = Wide<T, true>;
  using Narrow1 = NarrowEngine<T, true>;
  if constexpr (Wide1::kLoadsByTma) p.maps = forward_maps<Wide1>(p);
  static_assert(Wide1::kPieceN == 128, "the wide engine's pieces must divide the blocks it takes (multiples of 128)");
  if (d.block_n % 128 == 0)
    launch<Wide1, Fc1, T>(fc1_kernel<T, Wide1>, stream, device, p, "neuron-block MLP fc1");
  else
    launch<Narrow1, Fc1, T>(fc1_kernel<T, Narrow1>, stream, device, p, "neuron-block MLP fc1");
  launch<Wide1, Fc2, T>(fc2_kernel<T, Wide1>, stream, device, p, "neuron-block MLP fc2");
}

template <typename T, template <typename, bool> class Wide>
void backward_with(const MlpBackwardArgs& a) {
  BackwardParams<T> p{dims_of(a.dy, a.w1, a.mask, a.lora1_u, a.lora2_a),
                      a.dy.ptr<const T>(), ptr_or_null<T>(a.dlora2_v), a.w1.ptr<const T>(), a.w2.ptr<const T>(),
                      a.h.ptr<const T>(), ptr_or_null<T>(a.lora1_u), ptr_or_null<T>(a.lora1_b),
                      ptr_or_null<T>(a.lora2_a), a.mask.counts.ptr<const int32_t>(),
                      a.mask.indices.ptr<const int32_t>(), a.dh_workspace.ptr<T>(), a.dx.ptr<T>(),
                      out_or_null<T>(a.dlora1_u), nullptr};
  const Dims& d = p.dims;
  const cudaStream_t stream = stream_of(a.dx.stream);
  const int device = a.dy.device_index;
  float* sums = a.sum_workspace.ptr<float>();  // db1's sums, then db2's
  if (a.db1.defined() || a.db2.defined())
    check_cuda(cudaMemsetAsync(sums, 0, sizeof(float) * (d.neurons + d.model), stream), "cudaMemsetAsync");
  if (a.db1.defined()) p.db1_sum = sums;
  // dB1 = dH^T @ U1 runs dense over tokens: it needs zeros off the mask.
  if (a.dlora1_b.defined() && d.tokens * d.neurons > 0)
    check_cuda(cudaMemsetAsync(p.dh, 0, sizeof(T) * d.tokens * d.neurons, stream), "cudaMemsetAsync");
  using Wide2 = Wide<T, false>;
  using Narrow2 = NarrowEngine<T, false>;
  if constexpr (Wide2::kLoadsByTma) p.maps = backward_maps<Wide2>(p);
  static_assert(Wide2::kPieceN == 128, "the wide engine's pieces must divide the blocks it takes (multiples of 128)");
  if (d.block_n % 128 == 0)
    launch<Wide2, Dh, T>(dh_kernel<T, Wide2>, stream, device, p, "neuron-block MLP dH");
  else
    launch<Narrow2, Dh, T>(dh_kernel<T, Narrow2>, stream, device, p, "neuron-block MLP dH");
  launch<Wide2, Dx, T>(dx_kernel<T, Wide2>, stream, device, p, "neuron-block MLP dX");

  auto token_sum = [&](const T* x, const T* y, int64_t m, int64_t n, T* out, int64_t out_m, int64_t out_n) {
    const dim3 grid(pieces(m, LoraGradConfig::BM), pieces(n, LoraGradConfig::BN));
    if (grid.x == 0 || grid.y == 0) return;
    constexpr int bytes = LoraGradConfig::shared_bytes<T>();
    reserve_shared_memory(token_sum_kernel<T>, bytes, device, "neuron-block MLP LoRA factor gradient");
    token_sum_kernel<T><<<grid, LoraGradConfig::kThreads, bytes, stream>>>(x, y, d.tokens, m, n, out, out_m, out_n);
    check_cuda(cudaGetLastError(), "neuron-block MLP LoRA factor gradient");
  };
  if (a.dlora1_b.defined()) token_sum(p.dh, p.lora1_u, d.neurons, d.r1, a.dlora1_b.ptr<T>(), d.r1, 1);
  if (a.dlora2_a.defined()) token_sum(p.h, p.dlora2_v, d.neurons, d.r2, a.dlora2_a.ptr<T>(), 1, d.neurons);

  auto round = [&](const float* in, T* out, int64_t n) {
    if (n == 0) return;
    round_kernel<T><<<pieces(n, 256), 256, 0, stream>>>(in, out, n);
    check_cuda(cudaGetLastError(), "neuron-block MLP bias gradient");
  };
  if (a.db1.defined()) round(sums, a.db1.ptr<T>(), d.neurons);
  if (a.db2.defined() && d.model > 0) {
    // Slabs of 256 rows give enough blocks to read dy at full bandwidth for any token count.
    constexpr int64_t kSlab = 256;
    const dim3 grid(pieces(d.model, 256), pieces(d.tokens, kSlab));
    if (grid.y > 0) column_sum_kernel<T><<<grid, 256, 0, stream>>>(p.dy, d.tokens, d.model, kSlab, sums + d.neurons);
    check_cuda(cudaGetLastError(), "neuron-block MLP bias gradient");
    round(sums + d.neurons, a.db2.ptr<T>(), d.model);
  }
}

template <typename T, bool B_KMAJOR>
using MmaWide = mma::Engine<T, 128, B_KMAJOR, kStages>;

}  // namespace neuron_block
}  // namespace long_exposure
