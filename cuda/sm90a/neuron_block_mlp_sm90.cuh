// The neuron-block MLP's Hopper launches, for either element type (one instantiation file each).
#pragma once

#include <type_traits>

#include "kernel_choice.cuh"
#include "neuron_block_mlp_launch.cuh"
#include "persistent_mlp_engine.cuh"
#include "wgmma_gemm.cuh"
#include "wgmma_tma_gemm.cuh"

namespace long_exposure {
namespace neuron_block {

// Two warpgroups side by side along N, sharing each A tile, per 64 tokens; where the mask's tiles
// are multiples of 128 tokens, 128 x 256 tiles on the persistent engine (persistent_mlp_engine.cuh).
// Wider and taller tiles bring fewer bytes from L2 per FLOP, and those bytes bound these kernels
// (bench/RESULTS.md). TMA feeds them unless LONG_EXPOSURE_MLP_KERNEL=cp-async asks for the cp.async
// ring (kept to compare against). 64-token tiles run two thread blocks per SM with two 40 KiB
// stages each, so that one's epilogue runs beside the other's products: 1.7-7.6% faster at OPT-1.3B
// than one block with five stages (LONG_EXPOSURE_MLP_KERNEL=tma-deep, kept to compare against).
// 128-token tiles: the persistent engine took OPT-1.3B from 1.29-1.31 to 1.22 times cuBLAS at
// density 1 and OPT-2.7B from 1.25 to 1.16-1.18, and 0.71 to 0.68 and 0.66 to 0.62-0.63 at 0.5; at
// 0.1 it is 3-6% slower (0.185 against 0.180, 0.172 against 0.164; session 20, one process each).
// LONG_EXPOSURE_MLP_KERNEL=tma-128x128 keeps the previous default, 128 x 128 products on two thread
// blocks per SM with three 32 KiB stages each, and tma-128x256 one 128 x 256 tile per thread block.
template <typename T, bool B_KMAJOR>
using Tma64x256 = wgmma::TmaEngine<T, B_KMAJOR, kStages + 1, 1, 2>;
template <typename T, bool B_KMAJOR>
using Tma128x256 = wgmma::TmaEngine<T, B_KMAJOR, kStages, 2, 2>;
template <typename T, bool B_KMAJOR>
using Tma64x256Pair = wgmma::TmaEngine<T, B_KMAJOR, 2, 1, 2, 2>;
template <typename T, bool B_KMAJOR>
using Tma128x128Pair = wgmma::TmaEngine<T, B_KMAJOR, 3, 2, 1, 2>;
template <typename T, bool B_KMAJOR>
using Persistent128x256 = PersistentEngine<T, B_KMAJOR, 4, true, false>;
// dH's epilogue reading H's signs itself, as before session 22 (LONG_EXPOSURE_MLP_KERNEL=
// persistent-plain): 7-8% slower at density 1, 4-7% at 0.5 (H100, bench/RESULTS.md). And every
// output stored through shared memory by TMA, the ring cut to three stages to make room
// (persistent-staged): slower than the default at every density there, 3-8%, so kept to compare.
template <typename T, bool B_KMAJOR>
using PersistentPlain128x256 = PersistentEngine<T, B_KMAJOR, 4>;
template <typename T, bool B_KMAJOR>
using PersistentStaged128x256 = PersistentEngine<T, B_KMAJOR, 3, true, true>;
template <typename T, bool B_KMAJOR>
using CpAsync64x256 = wgmma::Engine<T, B_KMAJOR, kStages, 1, 2>;
template <typename T, bool B_KMAJOR>
using CpAsync128x256 = wgmma::Engine<T, B_KMAJOR, kStages, 2, 2>;

inline bool mlp_loads_by_cp_async() { return kernel_variable_is("LONG_EXPOSURE_MLP_KERNEL", "cp-async"); }
inline bool mlp_deep_ring() { return kernel_variable_is("LONG_EXPOSURE_MLP_KERNEL", "tma-deep"); }
inline bool mlp_wide_tall_tiles() { return kernel_variable_is("LONG_EXPOSURE_MLP_KERNEL", "tma-128x256"); }
inline bool mlp_tile_per_pair_of_blocks() { return kernel_variable_is("LONG_EXPOSURE_MLP_KERNEL", "tma-128x128"); }
inline bool mlp_reads_h_in_epilogue() { return kernel_variable_is("LONG_EXPOSURE_MLP_KERNEL", "persistent-plain"); }
inline bool mlp_stages_stores() { return kernel_variable_is("LONG_EXPOSURE_MLP_KERNEL", "persistent-staged"); }

// Calls launch.template with<Engine>() for the engine that the mask's tile height and
// LONG_EXPOSURE_MLP_KERNEL choose, the same for the forward and the backward.
template <typename Launch>
void with_chosen_engine(int64_t tile_m, const Launch& launch) {
  const bool tall = tile_m % 128 == 0;
  if (mlp_loads_by_cp_async())
    tall ? launch.template with<CpAsync128x256>() : launch.template with<CpAsync64x256>();
  else if (tall && mlp_wide_tall_tiles())
    launch.template with<Tma128x256>();
  else if (tall && mlp_tile_per_pair_of_blocks())
    launch.template with<Tma128x128Pair>();
  else if (tall && mlp_reads_h_in_epilogue())
    launch.template with<PersistentPlain128x256>();
  else if (tall && mlp_stages_stores())
    launch.template with<PersistentStaged128x256>();
  else if (tall)
    launch.template with<Persistent128x256>();
  else
    mlp_deep_ring() ? launch.template with<Tma64x256>() : launch.template with<Tma64x256Pair>();
}

// The forward (MlpForwardArgs) or the backward (MlpBackwardArgs) on the engine named by with().
template <typename T, typename Args>
struct PassLaunch {
  const Args& a;
  template <template <typename, bool> class Engine>
  void with() const {
    if constexpr (std::is_same_v<Args, MlpForwardArgs>)
      forward_with<T, Engine>(a);
    else
      backward_with<T, Engine>(a);
  }
};

template <typename T>
void forward_hopper(const MlpForwardArgs& a) {
  with_chosen_engine(a.mask.tile_m, PassLaunch<T, MlpForwardArgs>{a});
}
template <typename T>
void backward_hopper(const MlpBackwardArgs& a) {
  with_chosen_engine(a.mask.tile_m, PassLaunch<T, MlpBackwardArgs>{a});
}

}  // namespace neuron_block
}  // namespace long_exposure
