// Compiled in place of cuda/ when the build has no CUDA compiler: the CUDA entry points exist and
// say why they cannot run.
#include <stdexcept>

#include "long_exposure/masks.h"

namespace long_exposure {

void transpose_block_lists_cuda(const TensorView&, const TensorView&, const TensorView&,
                                const TensorView&) {
  throw std::runtime_error(
      "long_exposure was built without CUDA; reinstall on a machine with nvcc to use CUDA tensors");
}

}  // namespace long_exposure
