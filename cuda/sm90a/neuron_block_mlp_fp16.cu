// The neuron-block MLP kernels for fp16 with Hopper's wgmma; built for sm_90a only (CMakeLists.txt).
#include "neuron_block_mlp_launch.cuh"
#include "wgmma_gemm.cuh"

namespace long_exposure {
namespace neuron_block {

// One warpgroup per 64 tokens; two per 128 where the mask's tiles allow it, which halves the
// operand traffic per product (bench/RESULTS.md).
template <typename T, bool B_KMAJOR>
using WgmmaWide = wgmma::Engine<T, B_KMAJOR, kStages>;
template <typename T, bool B_KMAJOR>
using WgmmaTall = wgmma::Engine<T, B_KMAJOR, kStages, 2>;

template <>
void forward_sm90<__half>(const MlpForwardArgs& a) {
  a.mask.tile_m % 128 == 0 ? forward_with<__half, WgmmaTall>(a) : forward_with<__half, WgmmaWide>(a);
}
template <>
void backward_sm90<__half>(const MlpBackwardArgs& a) {
  a.mask.tile_m % 128 == 0 ? backward_with<__half, WgmmaTall>(a) : backward_with<__half, WgmmaWide>(a);
}

}  // namespace neuron_block
}  // namespace long_exposure
