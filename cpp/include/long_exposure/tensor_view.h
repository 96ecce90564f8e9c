// The one type through which tensors enter and leave the core. It owns nothing: the caller keeps
// the memory alive for the duration of the call. Python builds it from a torch tensor after its
// own checks; C++ callers build it from raw buffers. Keeping torch out of here is what lets the
// wheel work across torch versions (DESIGN.md section 3).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace long_exposure {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3, kInt32 = 4,
                            kInt64 = 5 };
enum class DeviceKind : int32_t { kCPU = 0, kCUDA = 1 };

const char* dtype_name(DType dtype);
int64_t dtype_size(DType dtype);

constexpr int kMaxDims = 6;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int ndim = -1;  // -1 marks an absent optional argument
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, as torch reports them
  DeviceKind device = DeviceKind::kCPU;
  int device_index = 0;
  void* stream = nullptr;  // cudaStream_t for CUDA views; ignored on the CPU

  bool defined() const { return ndim >= 0; }
  int64_t size(int dim) const { return shape[dim < 0 ? dim + ndim : dim]; }
  int64_t stride(int dim) const { return strides[dim < 0 ? dim + ndim : dim]; }
  int64_t numel() const;
  bool is_contiguous() const;
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

// A contiguous view of `data` (for C++ callers, tests and benchmarks that own plain buffers).
TensorView make_view(void* data, DType dtype, const std::vector<int64_t>& shape,
                     DeviceKind device = DeviceKind::kCPU);

// A contract violation by the caller: bad shape, dtype, device or mask contents. The bindings turn
// it into Python's ValueError, so the message must name the argument and what was expected.
class ContractError : public std::invalid_argument {
 public:
  explicit ContractError(const std::string& what) : std::invalid_argument(what) {}
};

// Helpers the operators use to state their contracts in one line each.
void require(bool condition, const std::string& message);
void require_shape(const TensorView& view, const char* name,
                   std::initializer_list<int64_t> expected);
void require_dtype(const TensorView& view, const char* name, DType expected);
void require_same_device(const TensorView& view, const char* name, const TensorView& reference);
std::string shape_string(const TensorView& view);

}  // namespace long_exposure
