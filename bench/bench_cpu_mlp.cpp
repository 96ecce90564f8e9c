// CPU neuron-block MLP, forward+backward, at block densities 0.1..1: time and the ratio to the
// all-active mask measured in the same process. The CPU path is the reference, not the product;
// this keeps an eye on its cost so the test suite stays fast. Sizes: argv[1..3] = T d F.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "long_exposure/mlp.h"

using namespace long_exposure;

namespace {

template <typename T>
TensorView view(std::vector<T>& data, std::vector<int64_t> shape, DType dtype) {
  return make_view(data.data(), dtype, shape);
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t T = argc > 1 ? std::atoll(argv[1]) : 512;
  const int64_t d = argc > 2 ? std::atoll(argv[2]) : 256;
  const int64_t F = argc > 3 ? std::atoll(argv[3]) : 1024;
  const int64_t tm = 64, bn = 128, n_tiles = (T + tm - 1) / tm, n_blocks = (F + bn - 1) / bn;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto fill = [&](int64_t n) { std::vector<float> v(n); for (auto& x : v) x = normal(rng); return v; };
  auto x = fill(T * d), w1 = fill(F * d), w2 = fill(d * F), b1 = fill(F), b2 = fill(d), dy = fill(T * d);
  std::vector<float> y(T * d), h(T * F), dx(T * d), db1(F);
  std::printf("CPU MLP fwd+bwd, T=%lld d=%lld F=%lld, tile %lld, block %lld\n", (long long)T,
              (long long)d, (long long)F, (long long)tm, (long long)bn);
  std::printf("%8s %10s %12s\n", "density", "ms", "vs dense");
  double dense_ms = 0;
  for (double density : {1.0, 0.75, 0.5, 0.25, 0.1}) {
    const int32_t active = std::max<int32_t>(1, static_cast<int32_t>(density * n_blocks + 0.5));
    std::vector<int32_t> counts(n_tiles, active), indices(n_tiles * n_blocks, -1);
    for (int64_t t = 0; t < n_tiles; ++t)
      for (int32_t i = 0; i < active; ++i) indices[t * n_blocks + i] = i;
    MlpForwardArgs fa;
    fa.x = view(x, {T, d}, DType::kFloat32); fa.w1 = view(w1, {F, d}, DType::kFloat32);
    fa.b1 = view(b1, {F}, DType::kFloat32); fa.w2 = view(w2, {d, F}, DType::kFloat32);
    fa.b2 = view(b2, {d}, DType::kFloat32);
    fa.mask = MlpMask{view(counts, {n_tiles}, DType::kInt32), view(indices, {n_tiles, n_blocks}, DType::kInt32), tm, bn};
    fa.y = view(y, {T, d}, DType::kFloat32); fa.h = view(h, {T, F}, DType::kFloat32);
    MlpBackwardArgs ba;
    ba.dy = view(dy, {T, d}, DType::kFloat32); ba.w1 = fa.w1; ba.w2 = fa.w2; ba.h = fa.h;
    ba.mask = fa.mask; ba.dx = view(dx, {T, d}, DType::kFloat32); ba.db1 = view(db1, {F}, DType::kFloat32);
    mlp_forward(fa);
    mlp_backward(ba);  // warm-up
    const int reps = 3;
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
      auto start = std::chrono::steady_clock::now();
      mlp_forward(fa);
      mlp_backward(ba);
      times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(times.begin(), times.end());
    const double ms = times[reps / 2];
    if (density == 1.0) dense_ms = ms;
    std::printf("%8.2f %10.2f %12.3f\n", double(active) / n_blocks, ms, ms / dense_ms);
  }
  return 0;
}
