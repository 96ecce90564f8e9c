// Pattern-pool combination: 32 heads on a 32 x 32 block grid (OPT-1.3B at sequence 2048 with
// 64-token blocks), both the kv lists and the transposed q lists, on the CPU and, where a GPU
// is present, on CUDA (timed with events on one stream). Prints microseconds per combination of
// one layer and of the 24 layers of OPT-1.3B.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "long_exposure/pattern_pool.h"

#ifdef LONG_EXPOSURE_WITH_CUDA
#include <cuda_runtime.h>
#endif

using namespace long_exposure;

namespace {

constexpr int64_t kHeads = 32, kBlocks = 32, kLayers = 24;

std::vector<Atom> bench_atoms() {
  std::vector<Atom> atoms{{AtomKind::kLocal, 1}, {AtomKind::kLocal, 2}, {AtomKind::kLocal, 4},
                          {AtomKind::kLocal, 8}, {AtomKind::kSink, 1},  {AtomKind::kSink, 2},
                          {AtomKind::kDense, 0}};
  for (int64_t o = 1; o < 9; ++o) atoms.push_back({AtomKind::kSlash, o});
  for (int64_t c = 0; c < kBlocks; ++c) atoms.push_back({AtomKind::kStripe, c});
  return atoms;
}

template <typename T>
TensorView view(T* data, std::initializer_list<int64_t> shape, DType dtype, DeviceKind device) {
  return make_view(data, dtype, shape, device);
}

}  // namespace

int main() {
  PatternPool pool(bench_atoms(), kBlocks);
  const int64_t W = pool.n_words(), n = kBlocks, G = kHeads * kLayers;
  // Each head takes the diagonal and about a fifth of the other atoms: a typical projection.
  std::mt19937_64 rng(0);
  std::bernoulli_distribution pick(0.2);
  std::vector<int64_t> selection(G * W, 0);
  for (int64_t g = 0; g < G; ++g) {
    selection[g * W] = 1;
    for (int64_t a = 1; a < pool.n_atoms(); ++a)
      if (pick(rng)) selection[g * W + a / 64] |= int64_t(1) << (a % 64);
  }
  std::vector<int32_t> counts(G * n), indices(G * n * n);
  auto time_cpu = [&](int64_t groups) {
    auto sel = view(selection.data(), {groups, W}, DType::kInt64, DeviceKind::kCPU);
    auto oc = view(counts.data(), {groups, n}, DType::kInt32, DeviceKind::kCPU);
    auto oi = view(indices.data(), {groups, n, n}, DType::kInt32, DeviceKind::kCPU);
    std::vector<double> us;
    for (int rep = 0; rep < 21; ++rep) {
      auto start = std::chrono::steady_clock::now();
      combine_patterns(pool.row_counts(), pool.row_indices(), sel, oc, oi);
      combine_patterns(pool.col_counts(), pool.col_indices(), sel, oc, oi);
      us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(us.begin(), us.end());
    return us[us.size() / 2];
  };
  std::printf("pattern combination, %lld atoms, %lld x %lld grid, %lld heads, kv + q lists\n",
              (long long)pool.n_atoms(), (long long)n, (long long)n, (long long)kHeads);
  std::printf("%-6s %14s %22s\n", "device", "1 layer (us)", "24 layers, 1 call (us)");
  std::printf("%-6s %14.1f %22.1f\n", "cpu", time_cpu(kHeads), time_cpu(G));

#ifdef LONG_EXPOSURE_WITH_CUDA
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("cuda   (no GPU here)\n");
    return 0;
  }
  const int64_t A = pool.n_atoms();
  int32_t *d_lut[4], *d_counts, *d_indices;
  int64_t* d_sel;
  const TensorView host_luts[4] = {pool.row_counts(), pool.row_indices(), pool.col_counts(), pool.col_indices()};
  for (int t = 0; t < 4; ++t) {
    cudaMalloc(&d_lut[t], host_luts[t].numel() * 4);
    cudaMemcpy(d_lut[t], host_luts[t].data, host_luts[t].numel() * 4, cudaMemcpyHostToDevice);
  }
  cudaMalloc(&d_sel, selection.size() * 8);
  cudaMemcpy(d_sel, selection.data(), selection.size() * 8, cudaMemcpyHostToDevice);
  cudaMalloc(&d_counts, counts.size() * 4);
  cudaMalloc(&d_indices, indices.size() * 4);
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  auto time_cuda = [&](int64_t groups) {
    const auto dev = DeviceKind::kCUDA;
    TensorView luts[4] = {view(d_lut[0], {A, n}, DType::kInt32, dev), view(d_lut[1], {A, n, n}, DType::kInt32, dev),
                          view(d_lut[2], {A, n}, DType::kInt32, dev), view(d_lut[3], {A, n, n}, DType::kInt32, dev)};
    auto sel = view(d_sel, {groups, W}, DType::kInt64, dev);
    auto oc = view(d_counts, {groups, n}, DType::kInt32, dev);
    auto oi = view(d_indices, {groups, n, n}, DType::kInt32, dev);
    oc.stream = oi.stream = stream;
    cudaEvent_t start, stop;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
    std::vector<double> us;
    for (int rep = 0; rep < 51; ++rep) {
      cudaEventRecord(start, stream);
      combine_patterns(luts[0], luts[1], sel, oc, oi);
      combine_patterns(luts[2], luts[3], sel, oc, oi);
      cudaEventRecord(stop, stream);
      cudaEventSynchronize(stop);
      float ms = 0;
      cudaEventElapsedTime(&ms, start, stop);
      us.push_back(ms * 1e3);
    }
    std::sort(us.begin(), us.end());
    return us[us.size() / 2];
  };
  std::printf("%-6s %14.1f %22.1f\n", "cuda", time_cuda(kHeads), time_cuda(G));
#endif
  return 0;
}
