// The neuron-block MLP kernels for bf16 on mma.sync (any chip from sm_80), in a file of their own
// to keep each compilation small.
#include "neuron_block_mlp_launch.cuh"

namespace long_exposure {
namespace neuron_block {

template <>
void forward<__nv_bfloat16>(const MlpForwardArgs& a) {
  forward_with<__nv_bfloat16, MmaWide>(a);
}
template <>
void backward<__nv_bfloat16>(const MlpBackwardArgs& a) {
  backward_with<__nv_bfloat16, MmaWide>(a);
}

}  // namespace neuron_block
}  // namespace long_exposure
