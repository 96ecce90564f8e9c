// One wgmma forward configuration per file keeps the compile parallel and each ptxas report
// readable; built for sm_90a only (CMakeLists.txt).
#include "block_sparse_attention_sm90.cuh"

namespace long_exposure {
namespace attention_cuda {

template void launch_forward_sm90<__half, 80, 64>(const AttentionForwardArgs&);
template void launch_forward_sm90<__half, 80, 128>(const AttentionForwardArgs&);

}  // namespace attention_cuda
}  // namespace long_exposure
