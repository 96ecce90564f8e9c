#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace long_exposure {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

inline cudaStream_t stream_of(const void* stream) {
  return static_cast<cudaStream_t>(const_cast<void*>(stream));
}

// Makes `device` current for a launch and restores the caller's device afterwards, so the core
// never changes the device a framework believes is current.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace long_exposure
