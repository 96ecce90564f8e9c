// The CPU token cross-entropy against a naive double-precision computation of its contract.
#include <cmath>

#include "long_exposure/cross_entropy.h"
#include "testing.h"

using namespace long_exposure;
using testing::f32;

namespace {

struct Problem {
  int64_t n, vocab;
  std::vector<float> logits, lse, loss, grad_loss, grad;
  std::vector<int64_t> labels;

  Problem(int64_t n_, int64_t vocab_, unsigned seed) : n(n_), vocab(vocab_) {
    std::mt19937 rng(seed);
    logits = testing::random_vector(n * vocab, rng, 4.0f);
    grad_loss = testing::random_vector(n, rng);
    for (int64_t r = 0; r < n; ++r) labels.push_back(r % 3 == 2 ? -100 : (r * 7) % vocab);
    lse.assign(n, 0.0f);
    loss.assign(n, 0.0f);
    grad.assign(n * vocab, 0.0f);
  }
  TensorView labels_view() { return make_view(labels.data(), DType::kInt64, {n}); }
  CrossEntropyForwardArgs forward_args() {
    CrossEntropyForwardArgs a;
    a.logits = f32(logits, {n, vocab}); a.labels = labels_view(); a.lse = f32(lse, {n}); a.loss = f32(loss, {n});
    return a;
  }
  CrossEntropyBackwardArgs backward_args() {
    CrossEntropyBackwardArgs a;
    a.logits = f32(logits, {n, vocab}); a.labels = labels_view(); a.lse = f32(lse, {n});
    a.grad_loss = f32(grad_loss, {n}); a.grad_logits = f32(grad, {n, vocab});
    return a;
  }
};

TEST_CASE("forward and backward match the softmax in double") {
  Problem p(7, 37, 1);
  cross_entropy_forward(p.forward_args());
  cross_entropy_backward(p.backward_args());
  for (int64_t r = 0; r < p.n; ++r) {
    const float* row = p.logits.data() + r * p.vocab;
    double sum = 0;
    for (int64_t j = 0; j < p.vocab; ++j) sum += std::exp(static_cast<double>(row[j]));
    const double lse = std::log(sum);
    const bool ignored = p.labels[r] == -100;
    CHECK_NEAR(p.lse[r], lse, 1e-5);
    CHECK_NEAR(p.loss[r], ignored ? 0.0 : lse - row[p.labels[r]], 2e-5);
    for (int64_t j = 0; j < p.vocab; ++j) {
      const double softmax = std::exp(row[j] - lse);
      const double expected = ignored ? 0.0 : (softmax - (j == p.labels[r] ? 1.0 : 0.0)) * p.grad_loss[r];
      CHECK_NEAR(p.grad[r * p.vocab + j], expected, 1e-6);
    }
  }
}

TEST_CASE("a label outside the vocabulary is a contract error") {
  Problem p(3, 5, 2);
  p.labels[1] = 5;
  CHECK_THROWS_CONTRACT(cross_entropy_forward(p.forward_args()), "outside the vocabulary");
  CHECK_THROWS_CONTRACT(cross_entropy_backward(p.backward_args()), "outside the vocabulary");
}

TEST_CASE("shapes and dtypes are checked") {
  Problem p(3, 5, 3);
  auto a = p.forward_args();
  a.loss = f32(p.loss, {2});
  CHECK_THROWS_CONTRACT(cross_entropy_forward(a), "loss");
  auto b = p.backward_args();
  b.labels = f32(p.lse, {3});
  CHECK_THROWS_CONTRACT(cross_entropy_backward(b), "int64 or int32");
}

}  // namespace

TEST_MAIN()
