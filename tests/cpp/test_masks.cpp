#include "long_exposure/masks.h"
#include "testing.h"

using namespace long_exposure;
using testing::i32;

namespace {

TEST_CASE("transposing block lists lists every (row, column) pair once, sorted") {
  std::mt19937 rng(5);
  for (int64_t rows : {1, 3, 17}) {
    for (int64_t columns : {1, 5, 16}) {
      const int64_t groups = 3;
      std::vector<int32_t> counts(groups * rows, 0), indices(groups * rows * columns, -1);
      std::bernoulli_distribution keep(0.4);
      std::vector<char> dense(groups * rows * columns, 0);
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < columns; ++c)
            if (keep(rng)) {
              indices[(g * rows + r) * columns + counts[g * rows + r]++] = (int32_t)c;
              dense[(g * rows + r) * columns + c] = 1;
            }
      std::vector<int32_t> out_counts(groups * columns), out_indices(groups * columns * rows);
      transpose_block_lists(i32(counts, {groups, rows}), i32(indices, {groups, rows, columns}),
                            i32(out_counts, {groups, columns}), i32(out_indices, {groups, columns, rows}));
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t c = 0; c < columns; ++c) {
          int32_t expected = 0;
          for (int64_t r = 0; r < rows; ++r)
            if (dense[(g * rows + r) * columns + c])
              CHECK(out_indices[(g * columns + c) * rows + expected++] == r);
          CHECK(out_counts[g * columns + c] == expected);
          for (int64_t i = expected; i < rows; ++i) CHECK(out_indices[(g * columns + c) * rows + i] == -1);
        }
    }
  }
}

TEST_CASE("transposition refuses an output capacity below the row count") {
  std::vector<int32_t> counts{1, 1}, indices{0, 0}, oc(1), oi(1);
  CHECK_THROWS_CONTRACT(transpose_block_lists(i32(counts, {2}), i32(indices, {2, 1}), i32(oc, {1}), i32(oi, {1, 1})),
                        "capacity must be at least");
}

}  // namespace

TEST_MAIN()
