// The neuron-block MLP kernels for bf16, in a file of their own to keep each compilation small.
#include "neuron_block_mlp_launch.cuh"

namespace long_exposure {
namespace neuron_block {

template void forward<__nv_bfloat16>(const MlpForwardArgs&);
template void backward<__nv_bfloat16>(const MlpBackwardArgs&);

}  // namespace neuron_block
}  // namespace long_exposure
