// The neuron-block MLP kernels for bf16 with Hopper's wgmma; built for sm_90a only (CMakeLists.txt).
#include "neuron_block_mlp_sm90.cuh"

namespace long_exposure {
namespace neuron_block {

template <>
void forward_sm90<__nv_bfloat16>(const MlpForwardArgs& a) {
  forward_hopper<__nv_bfloat16>(a);
}
template <>
void backward_sm90<__nv_bfloat16>(const MlpBackwardArgs& a) {
  backward_hopper<__nv_bfloat16>(a);
}

}  // namespace neuron_block
}  // namespace long_exposure
