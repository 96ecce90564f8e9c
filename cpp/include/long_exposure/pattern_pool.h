// The attention pattern pool (DESIGN.md section 4): atomic patterns over the causal block grid,
// each with precomputed layout lookup tables, combined per (batch, head) at run time.
//
// A pool of A atoms on an n x n grid of query blocks x key blocks holds, per atom,
//   rows:    counts [A, n], indices [A, n, n]  key blocks of each query block, sorted
//   columns: counts [A, n], indices [A, n, n]  query blocks of each key block, sorted
// (padding -1). A head's layout is a set of atoms, given as a bitset over the pool:
// selection [G, W] int64 with W = ceil(A / 64), bit a of word a / 64 set when atom a is used.
#pragma once

#include <string>
#include <vector>

#include "long_exposure/tensor_view.h"

namespace long_exposure {

enum class AtomKind : int32_t {
  kLocal = 0,   // the last `param` blocks up to and including the diagonal: r - param < c <= r
  kSink = 1,    // the first `param` key blocks: c < param (and c <= r)
  kStripe = 2,  // one key block column: c == param (for rows r >= param)
  kSlash = 3,   // one diagonal line: c == r - param
  kDense = 4,   // every causal block
};

struct Atom {
  AtomKind kind;
  int64_t param;
};

std::string atom_name(const Atom& atom);
// Whether (row, column) of the causal grid belongs to the atom; false above the diagonal.
bool atom_covers(const Atom& atom, int64_t row, int64_t column);
void check_atom(const Atom& atom, int64_t n_blocks);

// Fills the lookup tables of `atoms` on an n_blocks grid into CPU int32 views of the shapes above.
void build_pattern_luts(const std::vector<Atom>& atoms, int64_t n_blocks, const TensorView& row_counts,
                        const TensorView& row_indices, const TensorView& col_counts,
                        const TensorView& col_indices);

// Owns a pool's tables on the CPU (for C++ callers; Python keeps them as torch tensors).
class PatternPool {
 public:
  PatternPool(std::vector<Atom> atoms, int64_t n_blocks);
  int64_t n_blocks() const { return n_; }
  int64_t n_atoms() const { return static_cast<int64_t>(atoms_.size()); }
  int64_t n_words() const { return (n_atoms() + 63) / 64; }
  const std::vector<Atom>& atoms() const { return atoms_; }
  TensorView row_counts() const;
  TensorView row_indices() const;
  TensorView col_counts() const;
  TensorView col_indices() const;

 private:
  std::vector<Atom> atoms_;
  int64_t n_;
  mutable std::vector<int32_t> row_counts_, row_indices_, col_counts_, col_indices_;
};

// Merge the selected atoms' lists of one table (rows: kv lists; columns: q lists) into
// fixed-capacity lists: out_counts [G, n], out_indices [G, n, cap] with cap >= n, sorted, no
// duplicates, padding -1. G is any leading shape shared by selection and outputs. Dispatches on
// the device; the CUDA version runs on the outputs' stream with no host synchronisation.
void combine_patterns(const TensorView& lut_counts, const TensorView& lut_indices,
                      const TensorView& selection, const TensorView& out_counts,
                      const TensorView& out_indices);
void combine_patterns_cpu(const TensorView& lut_counts, const TensorView& lut_indices,
                          const TensorView& selection, const TensorView& out_counts,
                          const TensorView& out_indices);
void combine_patterns_cuda(const TensorView& lut_counts, const TensorView& lut_indices,
                           const TensorView& selection, const TensorView& out_counts,
                           const TensorView& out_indices);

// Projection of block score maps onto the pool. For each of G maps (scores [G, n, n] fp32,
// non-negative; only the causal part counts) choose atoms greedily, starting from
// `diagonal_atom` (which must cover the diagonal), each time the atom that adds the most
// uncovered mass per newly covered block, until the covered share of the map's mass reaches
// `recall`. Writes selection [G, W] int64, density [G] fp32 (active share of the causal grid)
// and covered [G] fp32 (share of the mass covered). Ties go to the higher mass, then the lower
// atom number. Masses are summed exactly, in fixed point scaled to each map's largest score
// (cpp/src/fixed_mass.h); scores below 2^-52 of it count as zero. Dispatches on the device (all arguments on one); the CUDA version gives the CPU's
// results bit for bit, runs on the outputs' stream with no host synchronisation, and does not
// check that diagonal_atom covers the diagonal (that would read the tables back).
void project_patterns(const TensorView& lut_counts, const TensorView& lut_indices,
                      int64_t diagonal_atom, const TensorView& scores, double recall,
                      const TensorView& selection, const TensorView& density,
                      const TensorView& covered);
void project_patterns_cpu(const TensorView& lut_counts, const TensorView& lut_indices,
                          int64_t diagonal_atom, const TensorView& scores, double recall,
                          const TensorView& selection, const TensorView& density,
                          const TensorView& covered);
void project_patterns_cuda(const TensorView& lut_counts, const TensorView& lut_indices,
                           int64_t diagonal_atom, const TensorView& scores, double recall,
                           const TensorView& selection, const TensorView& density,
                           const TensorView& covered);

}  // namespace long_exposure
