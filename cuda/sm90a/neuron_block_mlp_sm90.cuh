// The neuron-block MLP's Hopper launches, for either element type (one instantiation file each).
#pragma once

#include "kernel_choice.cuh"
#include "neuron_block_mlp_launch.cuh"
#include "persistent_mlp_engine.cuh"
#include "wgmma_gemm.cuh"
#include "wgmma_tma_gemm.cuh"

namespace long_exposure {
namespace neuron_block {

// Two warpgroups side by side along N, sharing each A tile, per 64 tokens; four (two by two) per
// 128 where the mask's tiles allow it, sharing B tiles too. Wider and taller tiles bring fewer
// bytes from L2 per FLOP, and those bytes bound these kernels (bench/RESULTS.md). TMA feeds them
// unless LONG_EXPOSURE_MLP_KERNEL=cp-async asks for the cp.async ring (kept to compare against).
// 64-token tiles run two thread blocks per SM with two 40 KiB stages each, so that one's epilogue
// runs beside the other's products: 1.7-7.6% faster at OPT-1.3B than one block with five stages
// (LONG_EXPOSURE_MLP_KERNEL=tma-deep, kept to compare against). Four 48 KiB 128 x 256 stages fill
// an SM alone. 128-token tiles run as 128 x 128 products, two thread blocks per SM with three 32 KiB
// stages each: as few bytes per FLOP as 128 x 256, and 0-7% faster than one 128 x 256 block at
// densities up to 0.25, within 1% above (LONG_EXPOSURE_MLP_KERNEL=tma-128x256 keeps that block).
template <typename T, bool B_KMAJOR>
using Tma64x256 = wgmma::TmaEngine<T, B_KMAJOR, kStages + 1, 1, 2>;
template <typename T, bool B_KMAJOR>
using Tma128x256 = wgmma::TmaEngine<T, B_KMAJOR, kStages, 2, 2>;
template <typename T, bool B_KMAJOR>
using Tma64x256Pair = wgmma::TmaEngine<T, B_KMAJOR, 2, 1, 2, 2>;
template <typename T, bool B_KMAJOR>
using Tma128x128Pair = wgmma::TmaEngine<T, B_KMAJOR, 3, 2, 1, 2>;
template <typename T, bool B_KMAJOR>
using Persistent128x256 = PersistentEngine<T, B_KMAJOR, 4>;
template <typename T, bool B_KMAJOR>
using CpAsync64x256 = wgmma::Engine<T, B_KMAJOR, kStages, 1, 2>;
template <typename T, bool B_KMAJOR>
using CpAsync128x256 = wgmma::Engine<T, B_KMAJOR, kStages, 2, 2>;

inline bool mlp_loads_by_cp_async() { return kernel_variable_is("LONG_EXPOSURE_MLP_KERNEL", "cp-async"); }
inline bool mlp_deep_ring() { return kernel_variable_is("LONG_EXPOSURE_MLP_KERNEL", "tma-deep"); }
inline bool mlp_wide_tall_tiles() { return kernel_variable_is("LONG_EXPOSURE_MLP_KERNEL", "tma-128x256"); }
inline bool mlp_persistent() { return kernel_variable_is("LONG_EXPOSURE_MLP_KERNEL", "persistent"); }

template <typename T>
void forward_hopper(const MlpForwardArgs& a) {
  const bool tall = a.mask.tile_m % 128 == 0;
  if (mlp_loads_by_cp_async())
    tall ? forward_with<T, CpAsync128x256>(a) : forward_with<T, CpAsync64x256>(a);
  else if (tall && mlp_persistent())
    forward_with<T, Persistent128x256>(a);
  else if (tall)
    mlp_wide_tall_tiles() ? forward_with<T, Tma128x256>(a) : forward_with<T, Tma128x128Pair>(a);
  else
    mlp_deep_ring() ? forward_with<T, Tma64x256>(a) : forward_with<T, Tma64x256Pair>(a);
}

template <typename T>
void backward_hopper(const MlpBackwardArgs& a) {
  const bool tall = a.mask.tile_m % 128 == 0;
  if (mlp_loads_by_cp_async())
    tall ? backward_with<T, CpAsync128x256>(a) : backward_with<T, CpAsync64x256>(a);
  else if (tall && mlp_persistent())
    backward_with<T, Persistent128x256>(a);
  else if (tall)
    mlp_wide_tall_tiles() ? backward_with<T, Tma128x256>(a) : backward_with<T, Tma128x128Pair>(a);
  else
    mlp_deep_ring() ? backward_with<T, Tma64x256>(a) : backward_with<T, Tma64x256Pair>(a);
}

}  // namespace neuron_block
}  // namespace long_exposure
