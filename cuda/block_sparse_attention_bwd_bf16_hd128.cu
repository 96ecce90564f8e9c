// One kernel configuration per file keeps the compile parallel and each ptxas report readable.
#include "block_sparse_attention.cuh"

namespace long_exposure {
namespace attention_cuda {

template void launch_backward<__nv_bfloat16, 128, 64>(const AttentionBackwardArgs&);
template void launch_backward<__nv_bfloat16, 128, 128>(const AttentionBackwardArgs&);

}  // namespace attention_cuda
}  // namespace long_exposure
