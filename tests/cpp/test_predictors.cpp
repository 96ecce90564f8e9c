// The CPU predictor ops against naive double-precision computations of their contracts.
#include <algorithm>
#include <limits>

#include "long_exposure/numeric.h"
#include "long_exposure/predictors.h"
#include "testing.h"

using namespace long_exposure;
using testing::f32;
using testing::i32;

namespace {

struct MlpPredictorProblem {
  int64_t T, d, r, nb, tm;
  std::vector<float> x, down, up, bias;
  std::vector<int32_t> counts, indices;
  std::vector<float> tile_max;

  MlpPredictorProblem(int64_t T_, int64_t d_, int64_t r_, int64_t nb_, int64_t tm_, unsigned seed)
      : T(T_), d(d_), r(r_), nb(nb_), tm(tm_) {
    std::mt19937 rng(seed);
    x = testing::random_vector(T * d, rng);
    down = testing::random_vector(r * d, rng, 0.3f);
    up = testing::random_vector(nb * r, rng, 0.4f);
    bias = testing::random_vector(nb, rng, 0.5f);
    counts.assign(n_tiles(), 0);
    indices.assign(n_tiles() * nb, 0);
    tile_max.assign(n_tiles() * nb, 0.0f);
  }
  int64_t n_tiles() const { return (T + tm - 1) / tm; }

  MlpPredictorArgs args(double threshold) {
    MlpPredictorArgs a;
    a.x = f32(x, {T, d}); a.down = f32(down, {r, d}); a.up = f32(up, {nb, r}); a.bias = f32(bias, {nb});
    a.threshold = threshold; a.tile_m = tm;
    a.counts = i32(counts, {n_tiles()}); a.indices = i32(indices, {n_tiles(), nb});
    a.tile_max = f32(tile_max, {n_tiles(), nb});
    return a;
  }

  // Tile maxima of the logits in double, with z optionally stored in bf16 first.
  std::vector<double> naive_tile_max(bool z_in_bf16) const {
    std::vector<double> out(n_tiles() * nb, -std::numeric_limits<double>::infinity()), z(r);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < r; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < d; ++k) acc += double(x[t * d + k]) * down[j * d + k];
        z[j] = z_in_bf16 ? bf16_to_float(float_to_bf16(static_cast<float>(acc))) : acc;
      }
      for (int64_t b = 0; b < nb; ++b) {
        double logit = bias[b];
        for (int64_t j = 0; j < r; ++j) logit += z[j] * up[b * r + j];
        double& m = out[(t / tm) * nb + b];
        m = std::max(m, logit);
      }
    }
    return out;
  }

  // The lists the contract asks for, from given maxima.
  void expect_lists(const std::vector<double>& maxima, double threshold) const {
    for (int64_t tile = 0; tile < n_tiles(); ++tile) {
      std::vector<int32_t> expected;
      for (int64_t b = 0; b < nb; ++b)
        if (maxima[tile * nb + b] > threshold) expected.push_back(static_cast<int32_t>(b));
      if (expected.empty()) {
        const double* row = &maxima[tile * nb];
        expected.push_back(static_cast<int32_t>(std::max_element(row, row + nb) - row));
      }
      CHECK(counts[tile] == static_cast<int32_t>(expected.size()));
      for (int64_t i = 0; i < nb; ++i)
        CHECK(indices[tile * nb + i] == (i < counts[tile] ? expected[i] : -1));
    }
  }
};

// The middle of the widest gap between the sorted maxima around their median: no implementation
// difference smaller than half the gap can move a block across it.
double threshold_in_gap(std::vector<double> maxima) {
  std::sort(maxima.begin(), maxima.end());
  const size_t lo = maxima.size() / 4, hi = 3 * maxima.size() / 4;
  size_t best = lo;
  for (size_t i = lo; i < hi; ++i)
    if (maxima[i + 1] - maxima[i] > maxima[best + 1] - maxima[best]) best = i;
  CHECK(maxima[best + 1] - maxima[best] > 1e-3);
  return (maxima[best] + maxima[best + 1]) / 2;
}

TEST_CASE("MLP predictor masks follow the naive tile maxima, ragged tiles included") {
  for (auto [T, tm] : {std::pair{64, 16}, {37, 8}, {50, 64}, {5, 2}}) {
    MlpPredictorProblem p(T, 12, 5, 9, tm, 11u + T);
    const std::vector<double> maxima = p.naive_tile_max(false);
    const double top = *std::max_element(maxima.begin(), maxima.end());
    const double bottom = *std::min_element(maxima.begin(), maxima.end());
    for (double threshold : {threshold_in_gap(maxima), top + 1.0, bottom - 1.0}) {
      mlp_predictor_mask(p.args(threshold));
      for (size_t i = 0; i < maxima.size(); ++i) CHECK_NEAR(p.tile_max[i], maxima[i], 1e-4);
      p.expect_lists(maxima, threshold);
    }
    // Above every logit each tile keeps one block; below every logit it keeps them all.
    mlp_predictor_mask(p.args(top + 1.0));
    CHECK(std::all_of(p.counts.begin(), p.counts.end(), [](int32_t c) { return c == 1; }));
    mlp_predictor_mask(p.args(bottom - 1.0));
    CHECK(std::all_of(p.counts.begin(), p.counts.end(), [&](int32_t c) { return c == p.nb; }));
  }
}

TEST_CASE("a tile where no block passes keeps the lowest of its tied best blocks") {
  MlpPredictorProblem p(16, 4, 2, 5, 8, 3u);
  std::fill(p.up.begin(), p.up.end(), 0.0f);  // every logit is its bias
  p.bias = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f};
  mlp_predictor_mask(p.args(3.0));
  for (int64_t tile = 0; tile < 2; ++tile) {
    CHECK(p.counts[tile] == 1);
    CHECK(p.indices[tile * 5] == 1);
    CHECK(p.tile_max[tile * 5 + 3] == 2.0f);
  }
}

TEST_CASE("bf16 inputs store z in bf16 between the two products") {
  MlpPredictorProblem p(40, 16, 6, 7, 16, 5u);
  // Make the inputs bf16-representable, so that only the storage of z separates the two naive sums.
  for (std::vector<float>* v : {&p.x, &p.down, &p.up, &p.bias})
    for (float& value : *v) value = bf16_to_float(float_to_bf16(value));
  auto to_bf16 = [](const std::vector<float>& v) {
    std::vector<bfloat16> out(v.size());
    std::transform(v.begin(), v.end(), out.begin(), float_to_bf16);
    return out;
  };
  std::vector<bfloat16> x = to_bf16(p.x), down = to_bf16(p.down), up = to_bf16(p.up), bias = to_bf16(p.bias);
  MlpPredictorArgs a = p.args(0.0);
  a.x = testing::view_of(x, {p.T, p.d}, DType::kBFloat16);
  a.down = testing::view_of(down, {p.r, p.d}, DType::kBFloat16);
  a.up = testing::view_of(up, {p.nb, p.r}, DType::kBFloat16);
  a.bias = testing::view_of(bias, {p.nb}, DType::kBFloat16);
  mlp_predictor_mask(a);
  const std::vector<double> stored = p.naive_tile_max(true), exact = p.naive_tile_max(false);
  double from_stored = 0, from_exact = 0;
  for (size_t i = 0; i < stored.size(); ++i) {
    from_stored = std::max(from_stored, std::fabs(p.tile_max[i] - stored[i]));
    from_exact = std::max(from_exact, std::fabs(p.tile_max[i] - exact[i]));
  }
  // A z that rounds the other way after a different fp32 summation order moves a logit by about
  // one bf16 step of z times up; anything else is fp32 noise.
  CHECK(from_stored < 0.1 * from_exact);
  p.expect_lists(std::vector<double>(p.tile_max.begin(), p.tile_max.end()), 0.0);
}

struct AttentionProblem {
  int64_t B, S, d, H, r, block;
  std::vector<float> hidden, wq, wk, pooled, scores;

  AttentionProblem(int64_t B_, int64_t S_, int64_t d_, int64_t H_, int64_t r_, int64_t block_, unsigned seed)
      : B(B_), S(S_), d(d_), H(H_), r(r_), block(block_) {
    std::mt19937 rng(seed);
    hidden = testing::random_vector(B * S * d, rng);
    wq = testing::random_vector(H * r * d, rng, 0.4f);
    wk = testing::random_vector(H * r * d, rng, 0.4f);
    pooled.assign(B * n() * d, 0.0f);
    scores.assign(B * H * n() * n(), -1.0f);
  }
  int64_t n() const { return (S + block - 1) / block; }

  AttentionBlockScoresArgs args() {
    AttentionBlockScoresArgs a;
    a.hidden = f32(hidden, {B, S, d}); a.wq = f32(wq, {H, r, d}); a.wk = f32(wk, {H, r, d});
    a.block = block; a.pooled = f32(pooled, {B, n(), d}); a.scores = f32(scores, {B, H, n(), n()});
    return a;
  }
};

TEST_CASE("attention block scores equal the naive causal softmax of pooled sketches") {
  for (auto [S, block] : {std::pair{64, 16}, {45, 8}, {7, 16}, {100, 3}}) {
    AttentionProblem p(2, S, 10, 3, 4, block, 17u + S);
    attention_block_scores(p.args());
    const int64_t n = p.n();
    std::vector<double> mean(n * p.d), qs(n * p.r), ks(n * p.r);
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t first = i * block, end = std::min<int64_t>(S, first + block);
        for (int64_t k = 0; k < p.d; ++k) {
          double sum = 0;
          for (int64_t t = first; t < end; ++t) sum += p.hidden[(b * S + t) * p.d + k];
          mean[i * p.d + k] = sum / double(end - first);
          CHECK_NEAR(p.pooled[(b * n + i) * p.d + k], mean[i * p.d + k], 1e-5);
        }
      }
      for (int64_t h = 0; h < p.H; ++h) {
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < p.r; ++j) {
            double q = 0, k = 0;
            for (int64_t c = 0; c < p.d; ++c) {
              q += mean[i * p.d + c] * p.wq[(h * p.r + j) * p.d + c];
              k += mean[i * p.d + c] * p.wk[(h * p.r + j) * p.d + c];
            }
            qs[i * p.r + j] = q;
            ks[i * p.r + j] = k;
          }
        for (int64_t i = 0; i < n; ++i) {
          std::vector<double> s(i + 1);
          for (int64_t j = 0; j <= i; ++j) {
            for (int64_t c = 0; c < p.r; ++c) s[j] += qs[i * p.r + c] * ks[j * p.r + c];
            s[j] /= std::sqrt(double(p.r));
          }
          const double top = *std::max_element(s.begin(), s.end());
          double total = 0;
          for (double& v : s) total += (v = std::exp(v - top));
          const float* row = &p.scores[((b * p.H + h) * n + i) * n];
          for (int64_t j = 0; j < n; ++j) {
            if (j <= i) CHECK_NEAR(row[j], s[j] / total, 1e-5);
            else CHECK(row[j] == 0.0f);
          }
        }
      }
    }
  }
}

TEST_CASE("bad predictor arguments are refused with the argument named") {
  MlpPredictorProblem p(16, 4, 2, 3, 8, 1u);
  mlp_predictor_mask(p.args(0.0));  // valid as built

  MlpPredictorArgs bad = p.args(0.0);
  bad.up = f32(p.up, {2, 3});
  CHECK_THROWS_CONTRACT(mlp_predictor_mask(bad), "up has shape [2, 3]");
  bad = p.args(0.0);
  bad.indices = i32(p.indices, {2, 2});
  CHECK_THROWS_CONTRACT(mlp_predictor_mask(bad), "indices has shape [2, 2], expected [2, 3]");
  bad = p.args(0.0);
  bad.tile_m = 0;
  CHECK_THROWS_CONTRACT(mlp_predictor_mask(bad), "tile_m must be positive");
  bad = p.args(std::numeric_limits<double>::quiet_NaN());
  CHECK_THROWS_CONTRACT(mlp_predictor_mask(bad), "threshold must be a number");
  bad = p.args(0.0);
  bad.tile_max = i32(p.counts, {2, 3});
  CHECK_THROWS_CONTRACT(mlp_predictor_mask(bad), "tile_max has dtype int32, expected float32");
  std::vector<double> wide(16 * 4);
  bad = p.args(0.0);
  bad.x = testing::view_of(wide, {16, 4}, DType::kFloat64);
  CHECK_THROWS_CONTRACT(mlp_predictor_mask(bad), "x has dtype float64, expected float32 or bfloat16");

  AttentionProblem q(1, 20, 4, 2, 3, 8, 2u);
  attention_block_scores(q.args());  // valid as built
  AttentionBlockScoresArgs wrong = q.args();
  wrong.wk = f32(q.wk, {2, 4, 3});
  CHECK_THROWS_CONTRACT(attention_block_scores(wrong), "wk has shape [2, 4, 3], expected [2, 3, 4]");
  wrong = q.args();
  wrong.scores = f32(q.scores, {1, 2, 3, 2});
  CHECK_THROWS_CONTRACT(attention_block_scores(wrong), "scores has shape [1, 2, 3, 2]");
  wrong = q.args();
  wrong.block = 0;
  CHECK_THROWS_CONTRACT(attention_block_scores(wrong), "block must be positive");
  // The CPU ignores a workspace but still holds it to its contract: [splits, B, n, 2, H, r].
  std::vector<float> scratch(2 * 1 * 3 * 2 * 2 * 3);
  wrong = q.args();
  wrong.workspace = f32(scratch, {2, 1, 3, 2, 2, 3});
  attention_block_scores(wrong);
  wrong.workspace = f32(scratch, {2, 1, 3, 2, 3, 2});
  CHECK_THROWS_CONTRACT(attention_block_scores(wrong), "workspace has shape [2, 1, 3, 2, 3, 2], expected [2, 1, 3, 2, 2, 3]");
  wrong.workspace = f32(scratch, {2, 1, 3, 2, 6});
  CHECK_THROWS_CONTRACT(attention_block_scores(wrong), "splits >= 1");
}

}  // namespace

TEST_MAIN()
