// Which kernels a call runs: the wgmma ones where the build has them (sm_90a) and the device is a
// Hopper, unless the environment variable named sets "mma", which picks the portable mma.sync
// kernels everywhere (the tests run both).
#pragma once

#include <cstdlib>
#include <cstring>

#include "cuda_check.cuh"

namespace long_exposure {

// Whether the environment variable is set to exactly `value`.
inline bool kernel_variable_is(const char* variable, const char* value) {
  const char* choice = std::getenv(variable);
  return choice && std::strcmp(choice, value) == 0;
}

inline bool use_wgmma_kernels(int device, const char* variable) {
#ifdef LONG_EXPOSURE_WITH_SM90A
  if (kernel_variable_is(variable, "mma")) return false;
  int major = 0, minor = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  return major == 9 && minor == 0;
#else
  (void)device;
  (void)variable;
  return false;
#endif
}

}  // namespace long_exposure
