// The CPU neuron-block MLP against a naive dense computation with masked-out blocks removed.
#include <algorithm>

#include "long_exposure/mlp.h"
#include "testing.h"

using namespace long_exposure;
using testing::f32;
using testing::i32;

namespace {

struct Problem {
  int64_t T, d, F, tm, bn, r1, r2;
  std::vector<float> x, w1, b1, w2, b2, u1, lb1, la2;
  std::vector<int32_t> counts, indices;
  std::vector<char> active;  // [n_tiles, n_blocks]

  Problem(int64_t T_, int64_t d_, int64_t F_, int64_t tm_, int64_t bn_, double density, unsigned seed)
      : T(T_), d(d_), F(F_), tm(tm_), bn(bn_), r1(3), r2(2) {
    std::mt19937 rng(seed);
    x = testing::random_vector(T * d, rng);
    w1 = testing::random_vector(F * d, rng, 0.3f);
    b1 = testing::random_vector(F, rng, 0.1f);
    w2 = testing::random_vector(d * F, rng, 0.3f);
    b2 = testing::random_vector(d, rng, 0.1f);
    u1 = testing::random_vector(T * r1, rng);
    lb1 = testing::random_vector(F * r1, rng, 0.2f);
    la2 = testing::random_vector(r2 * F, rng, 0.2f);
    const int64_t n_tiles = (T + tm - 1) / tm, n_blocks = (F + bn - 1) / bn;
    counts.assign(n_tiles, 0);
    indices.assign(n_tiles * n_blocks, -1);
    active.assign(n_tiles * n_blocks, 0);
    std::bernoulli_distribution keep(density);
    for (int64_t t = 0; t < n_tiles; ++t)
      for (int64_t b = 0; b < n_blocks; ++b)
        if (keep(rng)) {
          indices[t * n_blocks + counts[t]++] = static_cast<int32_t>(b);
          active[t * n_blocks + b] = 1;
        }
  }
  int64_t n_blocks() const { return (F + bn - 1) / bn; }
  bool is_active(int64_t t, int64_t f) const { return active[(t / tm) * n_blocks() + f / bn]; }
  MlpMask mask() {
    return MlpMask{i32(counts, {(int64_t)counts.size()}), i32(indices, {(int64_t)counts.size(), n_blocks()}), tm, bn};
  }
};

TEST_CASE("forward and backward equal the naive masked computation") {
  for (auto [T, tm, density] : {std::tuple{37, 8, 0.5}, {64, 16, 1.0}, {5, 8, 0.0}, {50, 16, 0.3}}) {
    Problem p(T, 12, 40, tm, 16, density, 7u + T);  // F=40 leaves a ragged last block
    std::vector<float> y(T * p.d), h(T * p.F), v2(T * p.r2);
    MlpForwardArgs fa;
    fa.x = f32(p.x, {T, p.d}); fa.w1 = f32(p.w1, {p.F, p.d}); fa.b1 = f32(p.b1, {p.F});
    fa.w2 = f32(p.w2, {p.d, p.F}); fa.b2 = f32(p.b2, {p.d}); fa.mask = p.mask();
    fa.lora1_u = f32(p.u1, {T, p.r1}); fa.lora1_b = f32(p.lb1, {p.F, p.r1});
    fa.lora2_a = f32(p.la2, {p.r2, p.F});
    fa.y = f32(y, {T, p.d}); fa.h = f32(h, {T, p.F}); fa.lora2_v = f32(v2, {T, p.r2});
    mlp_forward(fa);

    std::mt19937 rng(3);
    std::vector<float> dy = testing::random_vector(T * p.d, rng), dv2 = testing::random_vector(T * p.r2, rng);
    std::vector<float> dx(T * p.d), db1(p.F), db2(p.d), du1(T * p.r1), dlb1(p.F * p.r1), dla2(p.r2 * p.F);
    MlpBackwardArgs ba;
    ba.dy = f32(dy, {T, p.d}); ba.dlora2_v = f32(dv2, {T, p.r2}); ba.w1 = fa.w1;
    ba.w2 = fa.w2; ba.h = fa.h; ba.mask = fa.mask; ba.lora1_u = fa.lora1_u; ba.lora1_b = fa.lora1_b;
    ba.lora2_a = fa.lora2_a; ba.dx = f32(dx, {T, p.d}); ba.db1 = f32(db1, {p.F});
    ba.db2 = f32(db2, {p.d}); ba.dlora1_u = f32(du1, {T, p.r1}); ba.dlora1_b = f32(dlb1, {p.F, p.r1});
    ba.dlora2_a = f32(dla2, {p.r2, p.F});
    mlp_backward(ba);

    // Naive: pre, h, y, v2, then the chain rule by hand, in double.
    std::vector<double> hn(T * p.F, 0.0), dpre(T * p.F, 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t f = 0; f < p.F; ++f) {
        if (!p.is_active(t, f)) continue;
        double pre = p.b1[f];
        for (int64_t k = 0; k < p.d; ++k) pre += double(p.x[t * p.d + k]) * p.w1[f * p.d + k];
        for (int64_t j = 0; j < p.r1; ++j) pre += double(p.u1[t * p.r1 + j]) * p.lb1[f * p.r1 + j];
        hn[t * p.F + f] = std::max(pre, 0.0);
        CHECK_NEAR(h[t * p.F + f], hn[t * p.F + f], 1e-4);
      }
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t o = 0; o < p.d; ++o) {
        double acc = p.b2[o];
        for (int64_t f = 0; f < p.F; ++f) acc += hn[t * p.F + f] * p.w2[o * p.F + f];
        CHECK_NEAR(y[t * p.d + o], acc, 1e-4);
      }
      for (int64_t f = 0; f < p.F; ++f) {
        if (hn[t * p.F + f] <= 0) continue;
        double g = 0;
        for (int64_t o = 0; o < p.d; ++o) g += double(dy[t * p.d + o]) * p.w2[o * p.F + f];
        for (int64_t j = 0; j < p.r2; ++j) g += double(dv2[t * p.r2 + j]) * p.la2[j * p.F + f];
        dpre[t * p.F + f] = g;
      }
      for (int64_t k = 0; k < p.d; ++k) {
        double acc = 0;
        for (int64_t f = 0; f < p.F; ++f) acc += dpre[t * p.F + f] * p.w1[f * p.d + k];
        CHECK_NEAR(dx[t * p.d + k], acc, 1e-4);
      }
    }
    for (int64_t f = 0; f < p.F; ++f) {
      double acc = 0;
      for (int64_t t = 0; t < T; ++t) acc += dpre[t * p.F + f];
      CHECK_NEAR(db1[f], acc, 1e-4);
      for (int64_t j = 0; j < p.r2; ++j) {
        double a2 = 0;
        for (int64_t t = 0; t < T; ++t) a2 += double(dv2[t * p.r2 + j]) * hn[t * p.F + f];
        CHECK_NEAR(dla2[j * p.F + f], a2, 1e-4);
      }
    }
    for (int64_t o = 0; o < p.d; ++o) {
      double acc = 0;
      for (int64_t t = 0; t < T; ++t) acc += dy[t * p.d + o];
      CHECK_NEAR(db2[o], acc, 1e-4);
    }
  }
}

TEST_CASE("bad masks and shapes are refused with the argument named") {
  Problem p(16, 4, 32, 8, 16, 1.0, 1u);
  std::vector<float> y(16 * 4), h(16 * 32);
  MlpForwardArgs fa;
  fa.x = f32(p.x, {16, 4}); fa.w1 = f32(p.w1, {32, 4}); fa.w2 = f32(p.w2, {4, 32});
  fa.mask = p.mask(); fa.y = f32(y, {16, 4}); fa.h = f32(h, {16, 32});
  mlp_forward(fa);  // valid as built

  MlpForwardArgs bad = fa;
  bad.w2 = f32(p.w2, {32, 4});
  CHECK_THROWS_CONTRACT(mlp_forward(bad), "w2 (fc2 weight) has shape [32, 4]");

  p.indices[0] = 5;  // only blocks 0 and 1 exist
  CHECK_THROWS_CONTRACT(mlp_forward(fa), "lists block 5");
  p.indices[0] = 1; p.indices[1] = 0;
  CHECK_THROWS_CONTRACT(mlp_forward(fa), "not sorted");
  p.indices[0] = 0; p.indices[1] = 1;
  p.counts[1] = 3;
  CHECK_THROWS_CONTRACT(mlp_forward(fa), "has count 3");
  p.counts[1] = 2;

  bad = fa;
  bad.mask.tile_m = 4;  // now 4 tiles are expected, the mask has 2
  CHECK_THROWS_CONTRACT(mlp_forward(bad), "mask counts has shape [2]");
}

}  // namespace

TEST_MAIN()
