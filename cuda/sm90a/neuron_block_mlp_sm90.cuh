// The neuron-block MLP's Hopper launches, for either element type (one instantiation file each).
#pragma once

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

template <typename T>
void forward_hopper(const MlpForwardArgs& a) {
  const bool tall = a.mask.tile_m % 128 == 0;
  if (mlp_loads_by_cp_async())
    tall ? forward_with<T, CpAsync128x256>(a) : forward_with<T, CpAsync64x256>(a);
  else if (tall && mlp_wide_tall_tiles())
    forward_with<T, Tma128x256>(a);
  else if (tall && mlp_tile_per_pair_of_blocks())
    forward_with<T, Tma128x128Pair>(a);
  else if (tall && mlp_reads_h_in_epilogue())
    forward_with<T, PersistentPlain128x256>(a);
  else if (tall && mlp_stages_stores())
    forward_with<T, PersistentStaged128x256>(a);
  else if (tall)
    forward_with<T, Persistent128x256>(a);
  else
    mlp_deep_ring() ? forward_with<T, Tma64x256>(a) : forward_with<T, Tma64x256Pair>(a);
}

template <typename T>
void backward_hopper(const MlpBackwardArgs& a) {
  const bool tall = a.mask.tile_m % 128 == 0;
  if (mlp_loads_by_cp_async())
    tall ? backward_with<T, CpAsync128x256>(a) : backward_with<T, CpAsync64x256>(a);
  else if (tall && mlp_wide_tall_tiles())
    backward_with<T, Tma128x256>(a);
  else if (tall && mlp_tile_per_pair_of_blocks())
    backward_with<T, Tma128x128Pair>(a);
  else if (tall && mlp_reads_h_in_epilogue())
    backward_with<T, PersistentPlain128x256>(a);
  else if (tall && mlp_stages_stores())
    backward_with<T, PersistentStaged128x256>(a);
  else if (tall)
    backward_with<T, Persistent128x256>(a);
  else
    mlp_deep_ring() ? backward_with<T, Tma64x256>(a) : backward_with<T, Tma64x256Pair>(a);
}

}  // namespace neuron_block
}  // namespace long_exposure
