// Calls fn(T{}) with the C++ element type of a float dtype.
#pragma once

#include "long_exposure/numeric.h"
#include "long_exposure/tensor_view.h"

namespace long_exposure {

template <typename Fn>
void dispatch_float(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat64: fn(double{}); break;
    case DType::kBFloat16: fn(bfloat16{}); break;
    default:
      throw ContractError(std::string(op) + " does not support dtype " + dtype_name(dtype) +
                          " on the CPU");
  }
}

// Dot product of a buffer of accumulators with a row stored as T.
template <typename Acc, typename T>
inline Acc dot(const Acc* a, const T* b, int64_t n) {
  Acc sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * load<Acc>(b + i);
  return sum;
}

// out[i] += scale * row[i]
template <typename Acc, typename T>
inline void axpy(Acc* out, Acc scale, const T* row, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] += scale * load<Acc>(row + i);
}

}  // namespace long_exposure
