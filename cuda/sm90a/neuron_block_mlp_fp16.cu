// The neuron-block MLP kernels for fp16 with Hopper's wgmma; built for sm_90a only (CMakeLists.txt).
#include "neuron_block_mlp_launch.cuh"
#include "wgmma_gemm.cuh"

namespace long_exposure {
namespace neuron_block {

// Two warpgroups side by side along N, sharing each A tile, per 64 tokens; four (two by two) per
// 128 where the mask's tiles allow it, sharing B tiles too. Wider and taller tiles bring fewer
// bytes from L2 per FLOP, and those bytes bound these kernels (bench/RESULTS.md).
template <typename T, bool B_KMAJOR>
using Wgmma64x256 = wgmma::Engine<T, B_KMAJOR, kStages, 1, 2>;
template <typename T, bool B_KMAJOR>
using Wgmma128x256 = wgmma::Engine<T, B_KMAJOR, kStages, 2, 2>;

template <>
void forward_sm90<__half>(const MlpForwardArgs& a) {
  a.mask.tile_m % 128 == 0 ? forward_with<__half, Wgmma128x256>(a)
                           : forward_with<__half, Wgmma64x256>(a);
}
template <>
void backward_sm90<__half>(const MlpBackwardArgs& a) {
  a.mask.tile_m % 128 == 0 ? backward_with<__half, Wgmma128x256>(a)
                           : backward_with<__half, Wgmma64x256>(a);
}

}  // namespace neuron_block
}  // namespace long_exposure
