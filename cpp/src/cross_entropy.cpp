// Contract checks, device dispatch and the CPU implementation of the token cross-entropy (the
// reference the CUDA kernels are held to).
#include "long_exposure/cross_entropy.h"

#include <cmath>
#include <limits>
#include <string>

#include "dtype_dispatch.h"

namespace long_exposure {

namespace {

void check_rows(const TensorView& logits, const TensorView& labels, const TensorView& lse) {
  require(logits.defined() && logits.ndim == 2, "logits must be a [tokens, vocab] tensor");
  require(logits.size(1) > 0, "logits must have at least one column (vocab entry)");
  require(logits.size(1) == 1 || logits.stride(1) == 1, "each row of logits must be contiguous");
  const int64_t n = logits.size(0);
  require_shape(labels, "labels", {n});
  require(labels.dtype == DType::kInt64 || labels.dtype == DType::kInt32,
          std::string("labels has dtype ") + dtype_name(labels.dtype) + ", expected int64 or int32");
  require_same_device(labels, "labels", logits);
  require_shape(lse, "lse", {n});
  require_dtype(lse, "lse", DType::kFloat32);
  require(lse.is_contiguous(), "lse must be contiguous");
  require_same_device(lse, "lse", logits);
}

int64_t label_at(const TensorView& labels, int64_t row) {
  const int64_t offset = row * labels.stride(0);
  return labels.dtype == DType::kInt64 ? labels.ptr<const int64_t>()[offset]
                                       : labels.ptr<const int32_t>()[offset];
}

// A label that is neither ignored nor a column is the caller's bug; the CPU can afford to say so.
void check_labels(const TensorView& labels, int64_t ignore_index, int64_t vocab) {
  for (int64_t r = 0; r < labels.size(0); ++r) {
    const int64_t label = label_at(labels, r);
    if (label != ignore_index && (label < 0 || label >= vocab))
      throw ContractError("labels[" + std::to_string(r) + "] is " + std::to_string(label) +
                          ", outside the vocabulary [0, " + std::to_string(vocab) +
                          ") and not ignore_index " + std::to_string(ignore_index));
  }
}

template <typename T>
void forward_rows(const CrossEntropyForwardArgs& a) {
  const int64_t n = a.logits.size(0), vocab = a.logits.size(1), stride = a.logits.stride(0);
  const T* logits = a.logits.ptr<const T>();
  float* lse = a.lse.ptr<float>();
  float* loss = a.loss.ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    using Acc = typename Accumulator<T>::type;
    const T* row = logits + r * stride;
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < vocab; ++j) top = std::max(top, static_cast<double>(load<Acc>(row + j)));
    double sum = 0;
    for (int64_t j = 0; j < vocab; ++j) sum += std::exp(static_cast<double>(load<Acc>(row + j)) - top);
    const double row_lse = top + std::log(sum);
    lse[r] = static_cast<float>(row_lse);
    const int64_t label = label_at(a.labels, r);
    loss[r] = label == a.ignore_index ? 0.0f : static_cast<float>(row_lse - load<Acc>(row + label));
  }
}

template <typename T>
void backward_rows(const CrossEntropyBackwardArgs& a) {
  const int64_t n = a.logits.size(0), vocab = a.logits.size(1), stride = a.logits.stride(0);
  const T* logits = a.logits.ptr<const T>();
  const float* lse = a.lse.ptr<const float>();
  T* grad = a.grad_logits.ptr<T>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    using Acc = typename Accumulator<T>::type;
    const T* row = logits + r * stride;
    T* out = grad + r * vocab;
    const int64_t label = label_at(a.labels, r);
    const float g = label == a.ignore_index ? 0.0f : a.grad_loss.ptr<const float>()[r * a.grad_loss.stride(0)];
    for (int64_t j = 0; j < vocab; ++j) {
      const Acc p = std::exp(load<Acc>(row + j) - static_cast<Acc>(lse[r]));
      store<Acc>(out + j, (p - (j == label ? Acc(1) : Acc(0))) * static_cast<Acc>(g));
    }
  }
}

}  // namespace

void cross_entropy_forward(const CrossEntropyForwardArgs& a) {
  check_rows(a.logits, a.labels, a.lse);
  require_shape(a.loss, "loss", {a.logits.size(0)});
  require_dtype(a.loss, "loss", DType::kFloat32);
  require(a.loss.is_contiguous(), "loss must be contiguous");
  require_same_device(a.loss, "loss", a.logits);
  if (a.logits.size(0) == 0) return;
  if (a.logits.device == DeviceKind::kCUDA)
    cross_entropy_forward_cuda(a);
  else
    cross_entropy_forward_cpu(a);
}

void cross_entropy_backward(const CrossEntropyBackwardArgs& a) {
  check_rows(a.logits, a.labels, a.lse);
  const int64_t n = a.logits.size(0);
  require_shape(a.grad_loss, "grad_loss", {n});
  require_dtype(a.grad_loss, "grad_loss", DType::kFloat32);
  require_same_device(a.grad_loss, "grad_loss", a.logits);
  require_shape(a.grad_logits, "grad_logits", {n, a.logits.size(1)});
  require_dtype(a.grad_logits, "grad_logits", a.logits.dtype);
  require(a.grad_logits.is_contiguous(), "grad_logits must be contiguous");
  require_same_device(a.grad_logits, "grad_logits", a.logits);
  if (n == 0) return;
  if (a.logits.device == DeviceKind::kCUDA)
    cross_entropy_backward_cuda(a);
  else
    cross_entropy_backward_cpu(a);
}

void cross_entropy_forward_cpu(const CrossEntropyForwardArgs& a) {
  check_labels(a.labels, a.ignore_index, a.logits.size(1));
  dispatch_float(a.logits.dtype, "cross_entropy_forward", [&](auto tag) { forward_rows<decltype(tag)>(a); });
}

void cross_entropy_backward_cpu(const CrossEntropyBackwardArgs& a) {
  check_labels(a.labels, a.ignore_index, a.logits.size(1));
  dispatch_float(a.logits.dtype, "cross_entropy_backward", [&](auto tag) { backward_rows<decltype(tag)>(a); });
}

}  // namespace long_exposure
