// A few lines of test harness instead of a framework: the core must build and test with nothing
// but a compiler and CMake, on machines where no package registry is reachable.
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "long_exposure/tensor_view.h"

namespace testing {

struct Case {
  const char* name;
  std::function<void()> body;
};

inline std::vector<Case>& cases() {
  static std::vector<Case> all;
  return all;
}

struct Register {
  Register(const char* name, std::function<void()> body) { cases().push_back({name, body}); }
};

struct Failure {
  std::string message;
};

inline int run_all() {
  int failed = 0;
  for (const Case& c : cases()) {
    try {
      c.body();
      std::printf("[ ok ] %s\n", c.name);
    } catch (const Failure& f) {
      std::printf("[FAIL] %s: %s\n", c.name, f.message.c_str());
      ++failed;
    } catch (const std::exception& e) {
      std::printf("[FAIL] %s: unexpected exception: %s\n", c.name, e.what());
      ++failed;
    }
  }
  std::printf("%zu cases, %d failed\n", cases().size(), failed);
  return failed ? 1 : 0;
}

template <typename T>
long_exposure::TensorView view_of(std::vector<T>& data, std::vector<int64_t> shape,
                                  long_exposure::DType dtype) {
  return long_exposure::make_view(data.data(), dtype, shape);
}

inline long_exposure::TensorView f32(std::vector<float>& d, std::vector<int64_t> s) {
  return view_of(d, s, long_exposure::DType::kFloat32);
}
inline long_exposure::TensorView i32(std::vector<int32_t>& d, std::vector<int64_t> s) {
  return view_of(d, s, long_exposure::DType::kInt32);
}

inline std::vector<float> random_vector(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> out(n);
  for (float& x : out) x = dist(rng);
  return out;
}

inline double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::fmax(worst, std::fabs(double(a[i]) - b[i]));
  return worst;
}

}  // namespace testing

#define LE_CONCAT_(a, b) a##b
#define LE_CONCAT(a, b) LE_CONCAT_(a, b)
#define TEST_CASE(name) \
  static void LE_CONCAT(test_, __LINE__)(); \
  static testing::Register LE_CONCAT(reg_, __LINE__)(name, &LE_CONCAT(test_, __LINE__)); \
  static void LE_CONCAT(test_, __LINE__)()

#define CHECK(cond) \
  do { if (!(cond)) throw testing::Failure{std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": " #cond}; } while (0)

#define CHECK_NEAR(a, b, tol) \
  do { double _a = (a), _b = (b); if (!(std::fabs(_a - _b) <= (tol))) \
    throw testing::Failure{std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": " #a " = " + \
      std::to_string(_a) + " vs " #b " = " + std::to_string(_b)}; } while (0)

#define CHECK_THROWS_CONTRACT(expr, fragment) \
  do { bool _thrown = false; \
    try { expr; } catch (const long_exposure::ContractError& e) { \
      _thrown = std::string(e.what()).find(fragment) != std::string::npos; \
      if (!_thrown) throw testing::Failure{std::string("wrong message: ") + e.what()}; } \
    if (!_thrown) throw testing::Failure{std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": no ContractError from " #expr}; } while (0)

#define TEST_MAIN() int main() { return testing::run_all(); }
