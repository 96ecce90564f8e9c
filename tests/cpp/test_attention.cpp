// The CPU block-sparse attention against a naive masked softmax, forward and backward.
#include <algorithm>
#include <limits>

#include "long_exposure/attention.h"
#include "testing.h"

using namespace long_exposure;
using testing::f32;
using testing::i32;

namespace {

TEST_CASE("forward and backward equal a naive masked softmax, with prefix") {
  const int64_t B = 2, H = 2, S = 13, D = 8, P = 3, block = 4, nq = 4;
  std::mt19937 rng(11);
  auto q = testing::random_vector(B * H * S * D, rng), k = testing::random_vector(B * H * S * D, rng);
  auto v = testing::random_vector(B * H * S * D, rng), pk = testing::random_vector(B * H * P * D, rng);
  auto pv = testing::random_vector(B * H * P * D, rng), dout = testing::random_vector(B * H * S * D, rng);
  // Shared layout over the batch; head 1 skips the diagonal of query block 2, which leaves
  // only the prefix for those queries.
  std::vector<int32_t> counts(H * nq), indices(H * nq * nq, -1);
  std::bernoulli_distribution keep(0.6);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t c = 0; c <= r; ++c)
        if (c == r ? !(h == 1 && r == 2) : keep(rng)) indices[(h * nq + r) * nq + counts[h * nq + r]++] = (int32_t)c;
  std::vector<float> out(B * H * S * D), lse(B * H * S), dq(q.size()), dk(k.size()), dv(v.size()),
      dpk(pk.size()), dpv(pv.size());
  AttentionForwardArgs fa;
  fa.q = f32(q, {B, H, S, D}); fa.k = f32(k, {B, H, S, D}); fa.v = f32(v, {B, H, S, D});
  fa.prefix_k = f32(pk, {B, H, P, D}); fa.prefix_v = f32(pv, {B, H, P, D});
  fa.layout = BlockLayout{i32(counts, {1, H, nq}), i32(indices, {1, H, nq, nq}), block};
  fa.scale = 0.35; fa.out = f32(out, {B, H, S, D}); fa.lse = f32(lse, {B, H, S});
  attention_forward(fa);
  AttentionBackwardArgs ba;
  ba.dout = f32(dout, {B, H, S, D}); ba.q = fa.q; ba.k = fa.k; ba.v = fa.v; ba.prefix_k = fa.prefix_k;
  ba.prefix_v = fa.prefix_v; ba.out = fa.out; ba.lse = fa.lse; ba.layout = fa.layout; ba.scale = fa.scale;
  ba.dq = f32(dq, {B, H, S, D}); ba.dk = f32(dk, {B, H, S, D}); ba.dv = f32(dv, {B, H, S, D});
  ba.dprefix_k = f32(dpk, {B, H, P, D}); ba.dprefix_v = f32(dpv, {B, H, P, D});
  attention_backward(ba);

  auto allowed = [&](int64_t h, int64_t i, int64_t j) {
    if (j > i) return false;
    const int64_t r = i / block;
    for (int32_t n = 0; n < counts[h * nq + r]; ++n) if (indices[(h * nq + r) * nq + n] == j / block) return true;
    return false;
  };
  std::vector<double> gk(k.size(), 0.0), gv(v.size(), 0.0), gpk(pk.size(), 0.0), gpv(pv.size(), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < S; ++i) {
        const int64_t base = (b * H + h);
        std::vector<double> s(P + S, -std::numeric_limits<double>::infinity());
        auto key = [&](int64_t n) -> const float* { return n < P ? &pk[(base * P + n) * D] : &k[(base * S + n - P) * D]; };
        auto val = [&](int64_t n) -> const float* { return n < P ? &pv[(base * P + n) * D] : &v[(base * S + n - P) * D]; };
        const float* qi = &q[(base * S + i) * D];
        const float* gi = &dout[(base * S + i) * D];
        double m = -std::numeric_limits<double>::infinity();
        for (int64_t n = 0; n < P + S; ++n) {
          if (n >= P && !allowed(h, i, n - P)) continue;
          double dotp = 0;
          for (int64_t e = 0; e < D; ++e) dotp += double(qi[e]) * key(n)[e];
          s[n] = 0.35 * dotp;
          m = std::max(m, s[n]);
        }
        double l = 0;
        for (double x : s) l += std::exp(x - m);
        CHECK_NEAR(lse[base * S + i], m + std::log(l), 1e-4);
        std::vector<double> o(D, 0.0), pr(P + S);
        for (int64_t n = 0; n < P + S; ++n) {
          pr[n] = std::exp(s[n] - m) / l;
          for (int64_t e = 0; e < D; ++e) o[e] += pr[n] * val(n)[e];
        }
        double delta = 0;
        for (int64_t e = 0; e < D; ++e) {
          CHECK_NEAR(out[(base * S + i) * D + e], o[e], 1e-4);
          delta += o[e] * gi[e];
        }
        std::vector<double> gq(D, 0.0);
        for (int64_t n = 0; n < P + S; ++n) {
          if (pr[n] == 0) continue;
          double dp = 0;
          for (int64_t e = 0; e < D; ++e) dp += double(gi[e]) * val(n)[e];
          const double ds = pr[n] * (dp - delta) * 0.35;
          for (int64_t e = 0; e < D; ++e) {
            gq[e] += ds * key(n)[e];
            double& gkey = n < P ? gpk[(base * P + n) * D + e] : gk[(base * S + n - P) * D + e];
            double& gval = n < P ? gpv[(base * P + n) * D + e] : gv[(base * S + n - P) * D + e];
            gkey += ds * qi[e];
            gval += pr[n] * gi[e];
          }
        }
        for (int64_t e = 0; e < D; ++e) CHECK_NEAR(dq[(base * S + i) * D + e], gq[e], 1e-4);
      }
  for (size_t n = 0; n < k.size(); ++n) { CHECK_NEAR(dk[n], gk[n], 1e-4); CHECK_NEAR(dv[n], gv[n], 1e-4); }
  for (size_t n = 0; n < pk.size(); ++n) { CHECK_NEAR(dpk[n], gpk[n], 1e-4); CHECK_NEAR(dpv[n], gpv[n], 1e-4); }
}

TEST_CASE("a query with nothing to attend gets zero output and -inf logsumexp") {
  const int64_t S = 4, D = 2;
  std::vector<float> q(S * D, 1.0f), k(S * D, 1.0f), v(S * D, 2.0f), out(S * D, 7.0f), lse(S);
  std::vector<int32_t> counts{0}, indices{0};
  AttentionForwardArgs fa;
  fa.q = f32(q, {1, 1, S, D}); fa.k = f32(k, {1, 1, S, D}); fa.v = f32(v, {1, 1, S, D});
  fa.layout = BlockLayout{i32(counts, {1, 1, 1}), i32(indices, {1, 1, 1, 1}), 4};
  fa.scale = 1.0; fa.out = f32(out, {1, 1, S, D}); fa.lse = f32(lse, {1, 1, S});
  attention_forward(fa);
  for (float o : out) CHECK(o == 0.0f);
  for (float l : lse) CHECK(std::isinf(l) && l < 0);
}

TEST_CASE("bad layouts are refused") {
  const int64_t S = 8, D = 2;
  std::vector<float> q(S * D), out(S * D), lse(S);
  std::vector<int32_t> counts{1, 1}, indices{0, 2};
  AttentionForwardArgs fa;
  fa.q = f32(q, {1, 1, S, D}); fa.k = fa.q; fa.v = fa.q;
  fa.layout = BlockLayout{i32(counts, {1, 1, 2}), i32(indices, {1, 1, 2, 1}), 4};
  fa.scale = 1.0; fa.out = f32(out, {1, 1, S, D}); fa.lse = f32(lse, {1, 1, S});
  CHECK_THROWS_CONTRACT(attention_forward(fa), "lists block 2");
  fa.layout.block = 2;  // 4 query blocks expected
  CHECK_THROWS_CONTRACT(attention_forward(fa), "layout counts has shape [1, 1, 2]");
  fa.layout.block = 4;
  indices[1] = 1;
  fa.scale = 0.0;
  CHECK_THROWS_CONTRACT(attention_forward(fa), "scale must be positive");
}

}  // namespace

TEST_MAIN()
