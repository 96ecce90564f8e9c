#include "long_exposure/pattern_pool.h"

#include <algorithm>
#include <string>

#include "fixed_mass.h"
#include "long_exposure/masks.h"

namespace long_exposure {

std::string atom_name(const Atom& atom) {
  const std::string p = std::to_string(atom.param);
  switch (atom.kind) {
    case AtomKind::kLocal: return "local(" + p + ")";
    case AtomKind::kSink: return "sink(" + p + ")";
    case AtomKind::kStripe: return "stripe(" + p + ")";
    case AtomKind::kSlash: return "slash(" + p + ")";
    case AtomKind::kDense: return "dense";
  }
  return "unknown";
}

bool atom_covers(const Atom& atom, int64_t row, int64_t column) {
  if (column > row) return false;
  switch (atom.kind) {
    case AtomKind::kLocal: return row - column < atom.param;
    case AtomKind::kSink: return column < atom.param;
    case AtomKind::kStripe: return column == atom.param;
    case AtomKind::kSlash: return row - column == atom.param;
    case AtomKind::kDense: return true;
  }
  return false;
}

void check_atom(const Atom& atom, int64_t n_blocks) {
  const int kind = static_cast<int>(atom.kind);
  require(kind >= 0 && kind <= static_cast<int>(AtomKind::kDense),
          "unknown atom kind " + std::to_string(kind));
  switch (atom.kind) {
    case AtomKind::kLocal:
    case AtomKind::kSink:
      require(atom.param >= 1, atom_name(atom) + ": the width must be at least 1");
      break;
    case AtomKind::kStripe:
    case AtomKind::kSlash:
      require(atom.param >= 0 && atom.param < n_blocks,
              atom_name(atom) + " lies outside a grid of " + std::to_string(n_blocks) + " blocks");
      break;
    case AtomKind::kDense: break;
  }
}

namespace {

void require_lut(const TensorView& view, const char* name, std::initializer_list<int64_t> shape) {
  require_shape(view, name, shape);
  require_dtype(view, name, DType::kInt32);
  require(view.is_contiguous(), std::string(name) + " must be contiguous");
}

struct LutDims {
  int64_t atoms, n, words;
};

// One table of a pool: counts [A, n] and indices [A, n, n].
LutDims check_lut_pair(const TensorView& lut_counts, const TensorView& lut_indices) {
  require(lut_counts.defined() && lut_counts.ndim == 2, "lut_counts must have shape [atoms, n]");
  const int64_t A = lut_counts.size(0), n = lut_counts.size(1);
  require_lut(lut_counts, "lut_counts", {A, n});
  require_lut(lut_indices, "lut_indices", {A, n, n});
  return {A, n, (A + 63) / 64};
}

}  // namespace

void build_pattern_luts(const std::vector<Atom>& atoms, int64_t n, const TensorView& row_counts,
                        const TensorView& row_indices, const TensorView& col_counts,
                        const TensorView& col_indices) {
  require(n >= 1, "the grid needs at least one block");
  const int64_t A = static_cast<int64_t>(atoms.size());
  require(A >= 1, "a pattern pool needs at least one atom");
  require_lut(row_counts, "row_counts", {A, n});
  require_lut(row_indices, "row_indices", {A, n, n});
  require_lut(col_counts, "col_counts", {A, n});
  require_lut(col_indices, "col_indices", {A, n, n});
  for (const TensorView* v : {&row_counts, &row_indices, &col_counts, &col_indices})
    require(v->device == DeviceKind::kCPU, "lookup tables are built on the CPU");
  int32_t* rc = row_counts.ptr<int32_t>();
  int32_t* ri = row_indices.ptr<int32_t>();
  int32_t* cc = col_counts.ptr<int32_t>();
  int32_t* ci = col_indices.ptr<int32_t>();
  std::fill(ri, ri + A * n * n, -1);
  std::fill(ci, ci + A * n * n, -1);
  for (int64_t a = 0; a < A; ++a) {
    check_atom(atoms[a], n);
    for (int64_t r = 0; r < n; ++r) {
      int32_t count = 0;
      for (int64_t c = 0; c <= r; ++c)
        if (atom_covers(atoms[a], r, c)) ri[(a * n + r) * n + count++] = static_cast<int32_t>(c);
      rc[a * n + r] = count;
    }
    for (int64_t c = 0; c < n; ++c) {
      int32_t count = 0;
      for (int64_t r = c; r < n; ++r)
        if (atom_covers(atoms[a], r, c)) ci[(a * n + c) * n + count++] = static_cast<int32_t>(r);
      cc[a * n + c] = count;
    }
  }
}

PatternPool::PatternPool(std::vector<Atom> atoms, int64_t n_blocks)
    : atoms_(std::move(atoms)), n_(n_blocks) {
  require(n_ >= 1, "the grid needs at least one block");
  const int64_t A = n_atoms();
  row_counts_.resize(A * n_);
  col_counts_.resize(A * n_);
  row_indices_.resize(A * n_ * n_);
  col_indices_.resize(A * n_ * n_);
  build_pattern_luts(atoms_, n_, row_counts(), row_indices(), col_counts(), col_indices());
}

TensorView PatternPool::row_counts() const { return make_view(row_counts_.data(), DType::kInt32, {n_atoms(), n_}); }
TensorView PatternPool::row_indices() const { return make_view(row_indices_.data(), DType::kInt32, {n_atoms(), n_, n_}); }
TensorView PatternPool::col_counts() const { return make_view(col_counts_.data(), DType::kInt32, {n_atoms(), n_}); }
TensorView PatternPool::col_indices() const { return make_view(col_indices_.data(), DType::kInt32, {n_atoms(), n_, n_}); }

namespace {

struct CombineDims {
  int64_t atoms, n, words, groups, capacity;
};

CombineDims check_combine_args(const TensorView& lut_counts, const TensorView& lut_indices,
                               const TensorView& selection, const TensorView& out_counts,
                               const TensorView& out_indices) {
  const LutDims dims = check_lut_pair(lut_counts, lut_indices);
  const int64_t A = dims.atoms, n = dims.n, W = dims.words;
  require(selection.defined() && selection.ndim >= 1, "selection must have shape [..., words]");
  require_dtype(selection, "selection", DType::kInt64);
  require(selection.size(-1) == W, "selection has " + std::to_string(selection.size(-1)) +
                                       " words per head, expected " + std::to_string(W) + " for " +
                                       std::to_string(A) + " atoms");
  require(selection.is_contiguous(), "selection must be contiguous");
  require(out_counts.ndim == selection.ndim && out_indices.ndim == selection.ndim + 1,
          "out_counts must have shape [..., n] and out_indices [..., n, capacity] over selection's leading shape");
  for (int d = 0; d < selection.ndim - 1; ++d)
    require(out_counts.shape[d] == selection.shape[d] && out_indices.shape[d] == selection.shape[d],
            "outputs must share selection's leading shape");
  require(out_counts.size(-1) == n && out_indices.size(-2) == n, "outputs must have n rows");
  require(out_indices.size(-1) >= n, "out_indices capacity must be at least n = " + std::to_string(n));
  require_dtype(out_counts, "out_counts", DType::kInt32);
  require_dtype(out_indices, "out_indices", DType::kInt32);
  require(out_counts.is_contiguous() && out_indices.is_contiguous(), "outputs must be contiguous");
  for (const TensorView* v : {&lut_indices, &selection, &out_counts, &out_indices})
    require_same_device(*v, "pattern pool argument", lut_counts);
  return {A, n, W, selection.numel() / W, out_indices.size(-1)};
}

// C++17 has no std::countr_zero; every compiler the build supports has this builtin.
inline int lowest_bit(uint64_t word) { return __builtin_ctzll(word); }

}  // namespace

void combine_patterns_cpu(const TensorView& lut_counts, const TensorView& lut_indices,
                          const TensorView& selection, const TensorView& out_counts,
                          const TensorView& out_indices) {
  const int64_t A = lut_counts.size(0), n = lut_counts.size(1), W = (A + 63) / 64;
  const int64_t G = selection.numel() / W, cap = out_indices.size(-1);
  const int32_t* lc = lut_counts.ptr<const int32_t>();
  const int32_t* li = lut_indices.ptr<const int32_t>();
  const uint64_t* sel = selection.ptr<const uint64_t>();
  int32_t* oc = out_counts.ptr<int32_t>();
  int32_t* oi = out_indices.ptr<int32_t>();
  const int64_t row_words = (n + 63) / 64;
#pragma omp parallel
  {
    std::vector<uint64_t> bits(row_words);
#pragma omp for collapse(2) schedule(static)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < n; ++r) {
        // OR the selected atoms' lists into a bitmap of the row, then read it out in order.
        std::fill(bits.begin(), bits.end(), 0);
        for (int64_t a = 0; a < A; ++a) {
          if (!((sel[g * W + a / 64] >> (a % 64)) & 1u)) continue;
          const int32_t* list = li + (a * n + r) * n;
          for (int32_t i = 0; i < lc[a * n + r]; ++i) bits[list[i] / 64] |= uint64_t(1) << (list[i] % 64);
        }
        int32_t* out = oi + (g * n + r) * cap;
        int32_t count = 0;
        for (int64_t w = 0; w < row_words; ++w)
          for (uint64_t word = bits[w]; word; word &= word - 1)
            out[count++] = static_cast<int32_t>(w * 64 + lowest_bit(word));
        std::fill(out + count, out + cap, -1);
        oc[g * n + r] = count;
      }
  }
}

void combine_patterns(const TensorView& lut_counts, const TensorView& lut_indices,
                      const TensorView& selection, const TensorView& out_counts,
                      const TensorView& out_indices) {
  check_combine_args(lut_counts, lut_indices, selection, out_counts, out_indices);
  if (lut_counts.device == DeviceKind::kCUDA)
    combine_patterns_cuda(lut_counts, lut_indices, selection, out_counts, out_indices);
  else
    combine_patterns_cpu(lut_counts, lut_indices, selection, out_counts, out_indices);
}

void project_patterns(const TensorView& lut_counts, const TensorView& lut_indices,
                      int64_t diagonal_atom, const TensorView& scores, double recall,
                      const TensorView& selection, const TensorView& density,
                      const TensorView& covered) {
  const LutDims dims = check_lut_pair(lut_counts, lut_indices);
  const int64_t A = dims.atoms, n = dims.n, W = dims.words;
  require(scores.defined() && scores.ndim == 3, "scores must have shape [maps, n, n]");
  const int64_t G = scores.size(0);
  require_shape(scores, "scores", {G, n, n});
  require_dtype(scores, "scores", DType::kFloat32);
  require(scores.is_contiguous(), "scores must be contiguous");
  require_shape(selection, "selection", {G, W});
  require_dtype(selection, "selection", DType::kInt64);
  require_shape(density, "density", {G});
  require_dtype(density, "density", DType::kFloat32);
  require_shape(covered, "covered", {G});
  require_dtype(covered, "covered", DType::kFloat32);
  require(selection.is_contiguous() && density.is_contiguous() && covered.is_contiguous(),
          "selection, density and covered must be contiguous");
  require(recall >= 0.0 && recall <= 1.0, "recall must lie in [0, 1], got " + std::to_string(recall));
  require(diagonal_atom >= 0 && diagonal_atom < A, "diagonal_atom is not an atom of the pool");
  for (const TensorView* v : {&lut_indices, &scores, &selection, &density, &covered})
    require_same_device(*v, "pattern projection argument", lut_counts);
  if (lut_counts.device == DeviceKind::kCUDA) {
    // Checking that diagonal_atom covers the diagonal would read the tables back to the host;
    // the device greedy is well defined without it.
    project_patterns_cuda(lut_counts, lut_indices, diagonal_atom, scores, recall, selection,
                          density, covered);
    return;
  }
  const int32_t* lc = lut_counts.ptr<const int32_t>();
  const int32_t* li = lut_indices.ptr<const int32_t>();
  for (int64_t r = 0; r < n; ++r) {
    const int32_t* list = li + (diagonal_atom * n + r) * n;
    require(std::find(list, list + lc[diagonal_atom * n + r], r) != list + lc[diagonal_atom * n + r],
            "diagonal_atom does not cover the diagonal");
  }
  project_patterns_cpu(lut_counts, lut_indices, diagonal_atom, scores, recall, selection,
                       density, covered);
}

void project_patterns_cpu(const TensorView& lut_counts, const TensorView& lut_indices,
                          int64_t diagonal_atom, const TensorView& scores, double recall,
                          const TensorView& selection, const TensorView& density,
                          const TensorView& covered) {
  const int64_t A = lut_counts.size(0), n = lut_counts.size(1), W = (A + 63) / 64;
  const int64_t G = scores.size(0);
  const int32_t* lc = lut_counts.ptr<const int32_t>();
  const int32_t* li = lut_indices.ptr<const int32_t>();
  const float* score = scores.ptr<const float>();
  uint64_t* sel = selection.ptr<uint64_t>();
  const double causal_blocks = static_cast<double>(n * (n + 1) / 2);

#pragma omp parallel
  {
    // Each cell's mass in fixed point (fixed_mass.h), or -1 once covered.
    std::vector<int64_t> mass_of(n * n);
    std::vector<char> used(A);
#pragma omp for schedule(dynamic)
    for (int64_t g = 0; g < G; ++g) {
      const float* map = score + g * n * n;
      std::fill(used.begin(), used.end(), 0);
      std::fill(sel + g * W, sel + (g + 1) * W, 0);
      float largest = 0.f;
      for (int64_t c = 0; c < n * n; ++c) largest = std::max(largest, fixed_mass::clamped(map[c]));
      const int exponent = fixed_mass::scale_exponent(largest, n * n);
      for (int64_t c = 0; c < n * n; ++c) mass_of[c] = fixed_mass::fixed(map[c], exponent);
      int64_t total = 0;
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c <= r; ++c) total += mass_of[r * n + c];
      int64_t mass = 0, blocks = 0;
      // f(cell) for each cell of atom a.
      auto for_each_cell = [&](int64_t a, auto f) {
        for (int64_t r = 0; r < n; ++r) {
          const int32_t* list = li + (a * n + r) * n;
          for (int32_t i = 0; i < lc[a * n + r]; ++i) f(r * n + list[i]);
        }
      };
      auto take = [&](int64_t a) {
        used[a] = 1;
        sel[g * W + a / 64] |= uint64_t(1) << (a % 64);
        for_each_cell(a, [&](int64_t cell) {
          if (mass_of[cell] < 0) return;
          mass += mass_of[cell];
          ++blocks;
          mass_of[cell] = -1;
        });
      };
      take(diagonal_atom);
      while (!fixed_mass::reached(mass, total, recall)) {
        int64_t best = -1, best_gain = 0;
        double best_ratio = 0;
        for (int64_t a = 0; a < A; ++a) {
          if (used[a]) continue;
          int64_t gain = 0, added = 0;
          for_each_cell(a, [&](int64_t cell) {
            if (mass_of[cell] < 0) return;
            ++added;
            gain += mass_of[cell];
          });
          if (added == 0 || gain <= 0) continue;
          const double ratio = fixed_mass::ratio(gain, added);
          if (ratio > best_ratio || (ratio == best_ratio && gain > best_gain)) {
            best = a;
            best_ratio = ratio;
            best_gain = gain;
          }
        }
        if (best < 0) break;  // no atom adds mass: the pool cannot cover the rest
        take(best);
      }
      density.ptr<float>()[g] = static_cast<float>(blocks / causal_blocks);
      covered.ptr<float>()[g] = fixed_mass::covered_share(mass, total);
    }
  }
}

}  // namespace long_exposure
