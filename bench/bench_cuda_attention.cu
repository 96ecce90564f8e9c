// CUDA block-sparse causal attention, forward and forward + backward, at OPT-1.3B (32 heads x 64)
// and OPT-2.7B (32 x 80) attention shapes, batch 4, 2048 tokens, 64-token blocks, bf16: the full
// causal layout and a local-window + sink-column layout of density about 0.2. Prints time, TFLOP/s
// of the pairs computed, and the ratio to our own full layout. The ratios to cuDNN SDPA and
// FlexAttention that the targets name come from bench/attention_kernels.py, which runs them in
// the same process through torch. Without a GPU it says so and passes, so CI can run it.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#include "cuda_bench.cuh"
#include "long_exposure/attention.h"

using namespace long_exposure;
using namespace long_exposure::bench;

namespace {

// kv lists per query block, shared by every head (layout batch 1): all causal blocks, or the
// `window` blocks up to the diagonal plus the first `sinks`.
struct HostLayout {
  std::vector<int32_t> counts, indices;
  int64_t active = 0;
};

HostLayout make_layout(int64_t heads, int64_t n, int64_t window, int64_t sinks) {
  HostLayout l;
  l.counts.assign(heads * n, 0);
  l.indices.assign(heads * n * n, -1);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < n; ++i) {
      int32_t c = 0;
      for (int64_t j = 0; j <= i; ++j)
        if (window <= 0 || j < sinks || j > i - window) l.indices[(h * n + i) * n + c++] = static_cast<int32_t>(j);
      l.counts[h * n + i] = c;
      l.active += c;
    }
  return l;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("bench_cuda_attention: no CUDA device here; nothing to time\n");
    return 0;
  }
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int64_t B = 4, H = 32, S = 2048, block = 64, n = S / block;
  std::printf("CUDA block-sparse attention, %s, batch %lld, seq %lld, block %lld, bf16 (cuDNN and flex ratios: "
              "bench/attention_kernels.py)\n", prop.name, (long long)B, (long long)S, (long long)block);
  std::printf("%-10s %8s %10s %10s %10s %12s %12s %12s\n", "shape", "density", "fwd ms", "fwd TF/s", "f+b ms",
              "f+b TF/s", "fwd vs d=1", "f+b vs d=1");
  const struct { const char* name; int64_t D; } shapes[] = {{"OPT-1.3B", 64}, {"OPT-2.7B", 80}};
  for (const auto& s : shapes) {
    const int64_t D = s.D, elems = B * H * S * D;
    __nv_bfloat16 *q = random_buffer(elems, 1.f, 11), *k = random_buffer(elems, 1.f, 12),
                  *v = random_buffer(elems, 1.f, 13), *dout = random_buffer(elems, 1.f, 14);
    __nv_bfloat16 *out, *dq, *dk, *dv;
    float *lse, *delta;
    int32_t *counts, *indices, *q_counts, *q_indices;
    for (__nv_bfloat16** p : {&out, &dq, &dk, &dv}) CHECK(cudaMalloc(p, elems * 2));
    CHECK(cudaMalloc(&lse, B * H * S * 4));
    CHECK(cudaMalloc(&delta, B * H * S * 4));
    CHECK(cudaMalloc(&counts, H * n * 4));
    CHECK(cudaMalloc(&indices, H * n * n * 4));
    CHECK(cudaMalloc(&q_counts, H * n * 4));
    CHECK(cudaMalloc(&q_indices, H * n * n * 4));
    float full_fwd = 0.f, full_both = 0.f;
    for (const auto [window, sinks] : {std::pair<int64_t, int64_t>{0, 0}, {4, 2}}) {
      const HostLayout host = make_layout(H, n, window, sinks);
      CHECK(cudaMemcpy(counts, host.counts.data(), host.counts.size() * 4, cudaMemcpyHostToDevice));
      CHECK(cudaMemcpy(indices, host.indices.data(), host.indices.size() * 4, cudaMemcpyHostToDevice));
      const BlockLayout layout{device_view(counts, DType::kInt32, {1, H, n}),
                               device_view(indices, DType::kInt32, {1, H, n, n}), block};
      AttentionForwardArgs fa;
      fa.q = device_view(q, DType::kBFloat16, {B, H, S, D});
      fa.k = device_view(k, DType::kBFloat16, {B, H, S, D});
      fa.v = device_view(v, DType::kBFloat16, {B, H, S, D});
      fa.layout = layout;
      fa.scale = 0.125;
      fa.out = device_view(out, DType::kBFloat16, {B, H, S, D});
      fa.lse = device_view(lse, DType::kFloat32, {B, H, S});
      AttentionBackwardArgs ba;
      ba.dout = device_view(dout, DType::kBFloat16, {B, H, S, D});
      ba.q = fa.q, ba.k = fa.k, ba.v = fa.v, ba.out = fa.out, ba.lse = fa.lse, ba.layout = layout, ba.scale = fa.scale;
      ba.dq = device_view(dq, DType::kBFloat16, {B, H, S, D});
      ba.dk = device_view(dk, DType::kBFloat16, {B, H, S, D});
      ba.dv = device_view(dv, DType::kBFloat16, {B, H, S, D});
      ba.ws_delta = device_view(delta, DType::kFloat32, {B, H, S});
      ba.ws_q_counts = device_view(q_counts, DType::kInt32, {1, H, n});
      ba.ws_q_indices = device_view(q_indices, DType::kInt32, {1, H, n, n});
      const float fwd = median_ms([&] { attention_forward(fa); });
      const float both = median_ms([&] {
        attention_forward(fa);
        attention_backward(ba);
      });
      if (window == 0) full_fwd = fwd, full_both = both;
      // Pairs computed: active blocks x block^2 per head and sequence (the diagonal counted whole).
      const double pairs = static_cast<double>(B) * host.active * block * block;
      const double fwd_flops = 4.0 * pairs * D, density = static_cast<double>(host.active) / (H * n * (n + 1) / 2);
      std::printf("%-10s %8.3f %10.3f %10.0f %10.3f %12.0f %12.3f %12.3f\n", s.name, density, fwd,
                  fwd_flops / fwd / 1e9, both, 3.5 * fwd_flops / both / 1e9, fwd / full_fwd, both / full_both);
    }
    for (void* p : {(void*)q, (void*)k, (void*)v, (void*)dout, (void*)out, (void*)dq, (void*)dk, (void*)dv, (void*)lse,
                    (void*)delta, (void*)counts, (void*)indices, (void*)q_counts, (void*)q_indices})
      CHECK(cudaFree(p));
  }
  return 0;
}
