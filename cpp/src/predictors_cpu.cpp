// CPU predictor inference: the reference the CUDA kernels are held to, so it favours plain loops
// in the order the contract states (sums over k, then j, each from index 0). Threads split token
// tiles (MLP) or block rows and (batch, head) pairs (attention), so no two write one element.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dtype_dispatch.h"
#include "long_exposure/predictors.h"

namespace long_exposure {

namespace {

// One tile's block list from its maxima: the blocks above the threshold, or else the best one.
void select_blocks(const float* tile_max, int64_t n_blocks, float threshold, int32_t* count,
                   int32_t* list) {
  int32_t n = 0;
  for (int64_t b = 0; b < n_blocks; ++b)
    if (tile_max[b] > threshold) list[n++] = static_cast<int32_t>(b);
  if (n == 0) {
    int64_t best = 0;
    for (int64_t b = 1; b < n_blocks; ++b)
      if (tile_max[b] > tile_max[best]) best = b;  // strict: the lowest block wins a tie
    list[n++] = static_cast<int32_t>(best);
  }
  std::fill(list + n, list + n_blocks, -1);
  *count = n;
}

template <typename T>
void mlp_predictor(const MlpPredictorArgs& a) {
  const int64_t tokens = a.x.size(0), d = a.x.size(1), rank = a.down.size(0), nb = a.up.size(0);
  const int64_t tm = a.tile_m, n_tiles = a.counts.size(0);
  const float threshold = static_cast<float>(a.threshold);
  const T* x = a.x.ptr<const T>();
  const T* down = a.down.ptr<const T>();
  const T* up = a.up.ptr<const T>();
  const T* bias = a.bias.ptr<const T>();

#pragma omp parallel
  {
    std::vector<float> x_row(d), z(rank);
#pragma omp for schedule(dynamic)
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      float* tile_max = a.tile_max.ptr<float>() + tile * nb;
      std::fill(tile_max, tile_max + nb, -std::numeric_limits<float>::infinity());
      for (int64_t t = tile * tm; t < std::min(tokens, (tile + 1) * tm); ++t) {
        for (int64_t k = 0; k < d; ++k) x_row[k] = load<float>(x + t * d + k);
        // z is what a bf16 model would store between the two products.
        for (int64_t j = 0; j < rank; ++j) z[j] = round_through<T>(dot(x_row.data(), down + j * d, d));
        for (int64_t b = 0; b < nb; ++b) {
          const float logit = dot(z.data(), up + b * rank, rank) + load<float>(bias + b);
          tile_max[b] = std::max(tile_max[b], logit);
        }
      }
      select_blocks(tile_max, nb, threshold, a.counts.ptr<int32_t>() + tile,
                    a.indices.ptr<int32_t>() + tile * nb);
    }
  }
}

template <typename T>
void block_scores(const AttentionBlockScoresArgs& a) {
  const int64_t batch = a.hidden.size(0), seq = a.hidden.size(1), d = a.hidden.size(2);
  const int64_t heads = a.wq.size(0), rank = a.wq.size(1), n = a.pooled.size(1);
  const T* hidden = a.hidden.ptr<const T>();
  const T* wq = a.wq.ptr<const T>();
  const T* wk = a.wk.ptr<const T>();
  float* pooled = a.pooled.ptr<float>();

#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < batch * n; ++item) {
    const int64_t b = item / n, first = (item % n) * a.block;
    const int64_t end = std::min(seq, first + a.block);
    float* mean = pooled + item * d;
    std::fill(mean, mean + d, 0.0f);
    for (int64_t t = first; t < end; ++t) axpy(mean, 1.0f, hidden + (b * seq + t) * d, d);
    const float count = static_cast<float>(end - first);
    for (int64_t k = 0; k < d; ++k) mean[k] /= count;
  }

  const float norm = std::sqrt(static_cast<float>(rank));
#pragma omp parallel
  {
    std::vector<float> qs(n * rank), ks(n * rank);
#pragma omp for schedule(dynamic)
    for (int64_t g = 0; g < batch * heads; ++g) {
      const int64_t b = g / heads, h = g % heads;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < rank; ++j) {
          qs[i * rank + j] = dot(pooled + (b * n + i) * d, wq + (h * rank + j) * d, d);
          ks[i * rank + j] = dot(pooled + (b * n + i) * d, wk + (h * rank + j) * d, d);
        }
      for (int64_t i = 0; i < n; ++i) {
        float* row = a.scores.ptr<float>() + (g * n + i) * n;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= i; ++j) {
          row[j] = dot(&qs[i * rank], &ks[j * rank], rank) / norm;
          top = std::max(top, row[j]);
        }
        float sum = 0.0f;
        for (int64_t j = 0; j <= i; ++j) sum += (row[j] = std::exp(row[j] - top));
        for (int64_t j = 0; j <= i; ++j) row[j] /= sum;
        std::fill(row + i + 1, row + n, 0.0f);
      }
    }
  }
}

}  // namespace

void mlp_predictor_mask_cpu(const MlpPredictorArgs& args) {
  dispatch_float(args.x.dtype, "mlp_predictor_mask", [&](auto tag) { mlp_predictor<decltype(tag)>(args); });
}

void attention_block_scores_cpu(const AttentionBlockScoresArgs& args) {
  dispatch_float(args.hidden.dtype, "attention_block_scores",
                 [&](auto tag) { block_scores<decltype(tag)>(args); });
}

}  // namespace long_exposure
