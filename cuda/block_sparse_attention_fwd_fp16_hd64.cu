// One kernel configuration per file keeps the compile parallel and each ptxas report readable.
#include "block_sparse_attention.cuh"

namespace long_exposure {
namespace attention_cuda {

template void launch_forward<__half, 64, 64>(const AttentionForwardArgs&);
template void launch_forward<__half, 64, 128>(const AttentionForwardArgs&);

}  // namespace attention_cuda
}  // namespace long_exposure
