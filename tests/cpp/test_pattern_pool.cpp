#include "long_exposure/pattern_pool.h"
#include "testing.h"

using namespace long_exposure;
using testing::i32;

namespace {

std::vector<Atom> some_atoms(int64_t n) {
  std::vector<Atom> atoms{{AtomKind::kLocal, 1}, {AtomKind::kLocal, 3}, {AtomKind::kSink, 2}, {AtomKind::kDense, 0}};
  for (int64_t o = 1; o < n && o < 4; ++o) atoms.push_back({AtomKind::kSlash, o});
  for (int64_t c = 0; c < n; c += 3) atoms.push_back({AtomKind::kStripe, c});
  return atoms;
}

TEST_CASE("combination equals the union of atom_covers, rows and columns") {
  std::mt19937 rng(2);
  for (int64_t n : {1, 4, 9, 40}) {
    PatternPool pool(some_atoms(n), n);
    const int64_t G = 5, W = pool.n_words(), A = pool.n_atoms();
    std::vector<int64_t> selection(G * W, 0);
    std::bernoulli_distribution pick(0.3);
    for (int64_t g = 1; g < G; ++g)  // group 0 selects nothing
      for (int64_t a = 0; a < A - 1; ++a)  // never dense, or every union is trivial
        if (pick(rng)) selection[g * W + a / 64] |= int64_t(1) << (a % 64);
    TensorView sel = testing::view_of(selection, {G, W}, DType::kInt64);
    std::vector<int32_t> counts(G * n), indices(G * n * n), q_counts(G * n), q_indices(G * n * n);
    combine_patterns(pool.row_counts(), pool.row_indices(), sel, i32(counts, {G, n}), i32(indices, {G, n, n}));
    combine_patterns(pool.col_counts(), pool.col_indices(), sel, i32(q_counts, {G, n}), i32(q_indices, {G, n, n}));
    for (int64_t g = 0; g < G; ++g) {
      auto in_union = [&](int64_t r, int64_t c) {
        for (int64_t a = 0; a < A; ++a)
          if (((selection[g * W + a / 64] >> (a % 64)) & 1) && atom_covers(pool.atoms()[a], r, c)) return true;
        return false;
      };
      for (int64_t r = 0; r < n; ++r) {
        int32_t k = 0;
        for (int64_t c = 0; c < n; ++c)
          if (in_union(r, c)) CHECK(indices[(g * n + r) * n + k++] == c);
        CHECK(counts[g * n + r] == k);
        k = 0;
        for (int64_t q = 0; q < n; ++q)
          if (in_union(q, r)) CHECK(q_indices[(g * n + r) * n + k++] == q);
        CHECK(q_counts[g * n + r] == k);
      }
    }
  }
}

TEST_CASE("projection covers its recall target and always the diagonal") {
  const int64_t n = 12, G = 6;
  PatternPool pool(some_atoms(n), n);
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> scores(G * n * n);
  for (float& s : scores) s = u(rng) * u(rng) * u(rng);
  std::vector<int64_t> selection(G * pool.n_words());
  std::vector<float> density(G), covered(G);
  for (double recall : {0.3, 0.8, 1.0}) {
    project_patterns(pool.row_counts(), pool.row_indices(), 0, testing::f32(scores, {G, n, n}), recall,
                     testing::view_of(selection, {G, pool.n_words()}, DType::kInt64), testing::f32(density, {G}),
                     testing::f32(covered, {G}));
    for (int64_t g = 0; g < G; ++g) {
      CHECK(covered[g] >= recall - 1e-6);
      CHECK(selection[g * pool.n_words()] & 1);  // atom 0, the diagonal
      CHECK(density[g] > 0 && density[g] <= 1);
    }
  }
}

TEST_CASE("atoms outside the grid are refused") {
  CHECK_THROWS_CONTRACT(PatternPool({{AtomKind::kStripe, 8}}, 8), "stripe(8) lies outside");
  CHECK_THROWS_CONTRACT(PatternPool({{AtomKind::kSink, 0}}, 8), "sink(0)");
}

}  // namespace

TEST_MAIN()
