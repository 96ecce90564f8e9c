// Compiled in place of cuda/ when the build has no CUDA compiler: the CUDA entry points exist and
// say why they cannot run.
#include <stdexcept>

#include "long_exposure/attention.h"
#include "long_exposure/cross_entropy.h"
#include "long_exposure/masks.h"
#include "long_exposure/mlp.h"
#include "long_exposure/pattern_pool.h"
#include "long_exposure/predictors.h"

namespace long_exposure {

namespace {

[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "long_exposure was built without CUDA; reinstall on a machine with nvcc to use CUDA tensors");
}

}  // namespace

void transpose_block_lists_cuda(const TensorView&, const TensorView&, const TensorView&,
                                const TensorView&) {
  no_cuda();
}

void combine_patterns_cuda(const TensorView&, const TensorView&, const TensorView&,
                           const TensorView&, const TensorView&) {
  no_cuda();
}

void project_patterns_cuda(const TensorView&, const TensorView&, int64_t, const TensorView&, double,
                           const TensorView&, const TensorView&, const TensorView&) {
  no_cuda();
}

void mlp_forward_cuda(const MlpForwardArgs&) { no_cuda(); }

void mlp_backward_cuda(const MlpBackwardArgs&) { no_cuda(); }

void mlp_predictor_mask_cuda(const MlpPredictorArgs&) { no_cuda(); }

void attention_block_scores_cuda(const AttentionBlockScoresArgs&) { no_cuda(); }

void cross_entropy_forward_cuda(const CrossEntropyForwardArgs&) { no_cuda(); }

void cross_entropy_backward_cuda(const CrossEntropyBackwardArgs&) { no_cuda(); }

bool attention_cuda_supports(DType, int64_t, int64_t) { return false; }

void attention_forward_cuda(const AttentionForwardArgs&) { no_cuda(); }

void attention_backward_cuda(const AttentionBackwardArgs&) { no_cuda(); }

}  // namespace long_exposure
