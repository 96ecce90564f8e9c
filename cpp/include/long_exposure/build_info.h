#pragma once

#include <string>

namespace long_exposure {

struct BuildInfo {
  std::string version;
  bool cuda = false;
  std::string cuda_architectures;  // as given to CMAKE_CUDA_ARCHITECTURES, ";"-separated
  std::string cuda_compiler_version;
  bool openmp = false;
};

BuildInfo build_info();

}  // namespace long_exposure
