#include "long_exposure/build_info.h"

namespace long_exposure {

// The LONG_EXPOSURE_* macros come from CMake, which knows what it compiled.
BuildInfo build_info() {
  BuildInfo info;
  info.version = LONG_EXPOSURE_VERSION;
#ifdef LONG_EXPOSURE_WITH_CUDA
  info.cuda = true;
  info.cuda_architectures = LONG_EXPOSURE_CUDA_ARCHITECTURES;
  info.cuda_compiler_version = LONG_EXPOSURE_CUDA_COMPILER_VERSION;
#endif
#ifdef _OPENMP
  info.openmp = true;
#endif
  return info;
}

}  // namespace long_exposure
