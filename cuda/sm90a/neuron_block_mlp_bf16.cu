// The neuron-block MLP kernels for bf16 with Hopper's wgmma; built for sm_90a only (CMakeLists.txt).
#include "neuron_block_mlp_launch.cuh"
#include "wgmma_gemm.cuh"

namespace long_exposure {
namespace neuron_block {

template <typename T, bool B_KMAJOR>
using WgmmaWide = wgmma::Engine<T, B_KMAJOR, kStages>;

template <>
void forward_sm90<__nv_bfloat16>(const MlpForwardArgs& a) {
  forward_with<__nv_bfloat16, WgmmaWide>(a);
}
template <>
void backward_sm90<__nv_bfloat16>(const MlpBackwardArgs& a) {
  backward_with<__nv_bfloat16, WgmmaWide>(a);
}

}  // namespace neuron_block
}  // namespace long_exposure
