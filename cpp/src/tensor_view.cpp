#include "long_exposure/tensor_view.h"


namespace long_exposure {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
  }
  return "unknown";
}

int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat64:
    case DType::kInt64: return 8;
    case DType::kFloat32:
    case DType::kInt32: return 4;
    case DType::kBFloat16:
    case DType::kFloat16: return 2;
  }
  return 0;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;  // no element to lay out; torch reports any strides for these
  int64_t expected = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

TensorView make_view(void* data, DType dtype, const std::vector<int64_t>& shape, DeviceKind device) {
  require(shape.size() <= static_cast<size_t>(kMaxDims), "too many dimensions for a TensorView");
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t size : shape) v.shape[i++] = size;
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.strides[d] = stride;
    stride *= v.shape[d];
  }
  return v;
}

// Messages are built from std::string pieces, not iostreams: a stream's locale machinery crashed
// (SIGSEGV) inside the Python module on the H200 image, where several C++ runtimes share a process.
std::string shape_string(const TensorView& view) {
  std::string out = "[";
  for (int i = 0; i < view.ndim; ++i) out += (i ? ", " : "") + std::to_string(view.shape[i]);
  return out + "]";
}

void require(bool condition, const std::string& message) {
  if (!condition) throw ContractError(message);
}

// -1 in `expected` accepts any size in that dimension.
void require_shape(const TensorView& view, const char* name, std::initializer_list<int64_t> expected) {
  require(view.defined(), std::string(name) + " is required");
  bool ok = view.ndim == static_cast<int>(expected.size());
  int i = 0;
  for (int64_t size : expected) {
    if (ok && size >= 0 && view.shape[i] != size) ok = false;
    ++i;
  }
  if (!ok) {
    std::string want;
    i = 0;
    for (int64_t size : expected) want += (i++ ? ", " : "") + (size >= 0 ? std::to_string(size) : std::string("*"));
    throw ContractError(std::string(name) + " has shape " + shape_string(view) + ", expected [" + want + "]");
  }
}

void require_dtype(const TensorView& view, const char* name, DType expected) {
  require(view.dtype == expected, std::string(name) + " has dtype " + dtype_name(view.dtype) +
                                      ", expected " + dtype_name(expected));
}

void require_same_device(const TensorView& view, const char* name, const TensorView& reference) {
  require(view.device == reference.device && view.device_index == reference.device_index,
          std::string(name) + " is on another device than the operator's first input");
}

}  // namespace long_exposure
