// Device projection of block score maps onto a pattern pool: the greedy of project_patterns_cpu,
// one thread block per map, so a training step builds its masks with nothing read back by the
// host (and can be captured in a CUDA graph).
//
// The result is bit-identical to the CPU's: both count mass in fixed point (fixed_mass.h), whose
// sums are exact in any order, and the argmax applies the CPU's rule (highest mass per new block,
// then highest mass, then the lowest atom) as a total order, so any reduction finds its winner.
//
// Two kernels. The atom-bits kernel, wherever its shared memory fits (grids up to about 64 blocks
// at the default pool): each block first turns the lookup tables into one bitmap per atom and
// every atom's mass, then keeps each atom's uncovered mass and block count up to date, a thread
// per atom, subtracting only the cells the last taken atom newly covered. An iteration then reads
// nothing from global memory and holds one barrier. The list kernel otherwise: each iteration a
// warp per remaining atom walks its lists in global memory and sums its uncovered mass afresh.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda_check.cuh"
#include "fixed_mass.h"
#include "float_kernels.cuh"
#include "long_exposure/pattern_pool.h"

namespace long_exposure {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Where a map's cells stand. Staged: each cell's fixed-point mass in shared memory, -1 once
// covered. Bitmap: one covered bit per cell in shared memory and the mass recomputed from the
// scores in global memory, for grids whose staged copy would not fit.
template <bool kStaged>
struct Cells;

template <>
struct Cells<true> {
  int64_t* mass;
  const float* map;
  int exponent;
  __device__ void init(int cell) const { mass[cell] = fixed_mass::fixed(map[cell], exponent); }
  // The cell's mass, or -1 once it is covered.
  __device__ int64_t read(int cell) const { return mass[cell]; }
  // Cells of one atom are distinct, so the lanes covering them never write the same word.
  __device__ void cover(int cell) const { mass[cell] = -1; }
  __host__ __device__ static size_t bytes(int64_t cells) { return static_cast<size_t>(cells) * sizeof(int64_t); }
};

template <>
struct Cells<false> {
  uint32_t* bits;
  const float* map;
  int exponent;
  __device__ void init(int word) const { bits[word] = 0; }
  __device__ int64_t read(int cell) const {
    return (bits[cell >> 5] >> (cell & 31)) & 1u ? -1 : fixed_mass::fixed(__ldg(map + cell), exponent);
  }
  // Lanes covering distinct cells may share a word.
  __device__ void cover(int cell) const { atomicOr(bits + (cell >> 5), 1u << (cell & 31)); }
  __host__ __device__ static size_t bytes(int64_t cells) { return static_cast<size_t>((cells + 31) / 32) * sizeof(uint32_t); }
};

struct Candidate {
  double ratio;
  long long gain;
  int atom;   // -1: none
  int added;  // the blocks it would newly cover
};

__device__ __forceinline__ Candidate no_candidate() { return {0, 0, -1, 0}; }

// The CPU scan keeps the first atom of the highest (ratio, gain); as a total order with the atom
// number last, it gives the same winner whatever order a reduction compares candidates in.
__device__ __forceinline__ bool better(const Candidate& a, const Candidate& b) {
  if (a.atom < 0) return false;
  if (b.atom < 0) return true;
  if (a.ratio != b.ratio) return a.ratio > b.ratio;
  if (a.gain != b.gain) return a.gain > b.gain;
  return a.atom < b.atom;
}

__device__ __forceinline__ Candidate warp_best(Candidate c) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const Candidate other{__shfl_xor_sync(kFullMask, c.ratio, offset), __shfl_xor_sync(kFullMask, c.gain, offset),
                          __shfl_xor_sync(kFullMask, c.atom, offset), __shfl_xor_sync(kFullMask, c.added, offset)};
    if (better(other, c)) c = other;
  }
  return c;
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// The block's largest clamped score, which sets the scale of its fixed-point masses (a max is
// exact in any order). Ends with a barrier, so it also publishes the shared writes before it.
__device__ float block_largest(const float* map, int n_cells) {
  __shared__ float warp_largest[kWarps];
  float largest = 0.f;
  for (int c = threadIdx.x; c < n_cells; c += kThreads) largest = fmaxf(largest, fixed_mass::clamped(map[c]));
  for (int offset = 16; offset > 0; offset /= 2) largest = fmaxf(largest, __shfl_xor_sync(kFullMask, largest, offset));
  if (threadIdx.x % 32 == 0) warp_largest[threadIdx.x / 32] = largest;
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) largest = fmaxf(largest, warp_largest[w]);
  return largest;
}

__device__ void write_outputs(int64_t g, int n, int words, const unsigned long long* chosen, long long mass,
                              int64_t blocks, long long total, unsigned long long* selection, float* density,
                              float* covered) {
  for (int w = threadIdx.x % 32; w < words; w += 32) selection[g * words + w] = chosen[w];
  if (threadIdx.x % 32 == 0) {
    const double causal_blocks = static_cast<double>(static_cast<int64_t>(n) * (n + 1) / 2);
    density[g] = static_cast<float>(blocks / causal_blocks);
    covered[g] = fixed_mass::covered_share(mass, total);
  }
}

// ---- The list kernel ----

// The uncovered mass and block count of atom a, summed over the whole warp (lane r takes rows
// r, r + 32, ...); with `cover`, those cells become covered too.
template <bool kStaged>
__device__ __forceinline__ void sweep_atom(int a, const int32_t* __restrict__ lut_counts,
                                           const int32_t* __restrict__ lut_indices, int n,
                                           const Cells<kStaged>& cells, bool cover, long long& gain, int& added) {
  gain = 0;
  added = 0;
  const int32_t* counts = lut_counts + static_cast<int64_t>(a) * n;
  const int32_t* lists = lut_indices + static_cast<int64_t>(a) * n * n;
  for (int r = threadIdx.x % 32; r < n; r += 32) {
    const int32_t* list = lists + static_cast<int64_t>(r) * n;
    for (int i = 0, count = counts[r]; i < count; ++i) {
      const int cell = r * n + list[i];
      const int64_t v = cells.read(cell);
      if (v < 0) continue;
      gain += v;
      ++added;
      if (cover) cells.cover(cell);
    }
  }
  gain = warp_sum(gain);
  added = warp_sum(added);
}

// The greedy over the lists, from cells with their masses in place and nothing chosen (chosen and
// done zero); writes the map's outputs. Every thread of the block calls it.
template <bool kStaged>
__device__ void greedy_over_lists(const int32_t* __restrict__ lut_counts, const int32_t* __restrict__ lut_indices,
                                  int diagonal_atom, double recall, int atoms, int n, int words,
                                  const Cells<kStaged>& cells, long long total, unsigned long long* chosen,
                                  unsigned char* done, unsigned long long* __restrict__ selection,
                                  float* __restrict__ density, float* __restrict__ covered) {
  __shared__ Candidate warp_slots[kWarps];
  __shared__ int stop;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // The running mass and block count live in warp 0, which takes the atoms.
  long long mass = 0;
  int64_t blocks = 0;
  auto take = [&](int a) {
    long long gain;
    int added;
    sweep_atom(a, lut_counts, lut_indices, n, cells, true, gain, added);
    mass += gain;
    blocks += added;
    if (lane == 0) {
      done[a] = 1;
      chosen[a / 64] |= 1ull << (a % 64);
      stop = fixed_mass::reached(mass, total, recall);
    }
  };
  if (warp == 0) take(diagonal_atom);
  __syncthreads();

  while (!stop) {
    Candidate best = no_candidate();
    for (int a = warp; a < atoms; a += kWarps) {
      if (done[a]) continue;
      long long gain;
      int added;
      sweep_atom(a, lut_counts, lut_indices, n, cells, false, gain, added);
      // Covering only removes cells, so an atom that adds no block or no mass now never will.
      if (added == 0 || gain <= 0) {
        __syncwarp();  // every lane has read done[a]: the write cannot overtake another lane's read
        if (lane == 0) done[a] = 1;
        continue;
      }
      const Candidate c{fixed_mass::ratio(gain, added), gain, a, added};
      if (better(c, best)) best = c;
    }
    if (lane == 0) warp_slots[warp] = best;
    __syncthreads();
    if (warp == 0) {
      const Candidate c = warp_best(lane < kWarps ? warp_slots[lane] : no_candidate());
      if (c.atom < 0) {
        if (lane == 0) stop = 1;  // no atom adds mass: the pool cannot cover the rest
      } else {
        take(c.atom);
      }
    }
    __syncthreads();
  }
  if (warp == 0) write_outputs(blockIdx.x, n, words, chosen, mass, blocks, total, selection, density, covered);
}

// Four blocks per SM, so up to 64 registers: under the plain bound ptxas takes fewer and spills.
template <bool kStaged>
__global__ void __launch_bounds__(kThreads, 4)
    project_lists_kernel(const int32_t* __restrict__ lut_counts, const int32_t* __restrict__ lut_indices,
                         int diagonal_atom, const float* __restrict__ scores, double recall, int atoms,
                         int n, int words, unsigned long long* __restrict__ selection,
                         float* __restrict__ density, float* __restrict__ covered) {
  extern __shared__ unsigned long long shared[];
  __shared__ long long warp_total[kWarps];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int n_cells = n * n;
  const float* map = scores + static_cast<int64_t>(blockIdx.x) * n_cells;

  unsigned long long* chosen = shared;  // [words]: the selection being built
  void* cell_storage = chosen + words;
  // [atoms]: 1 once an atom can no longer be chosen (taken, or it adds nothing)
  unsigned char* done = static_cast<unsigned char*>(cell_storage) + Cells<kStaged>::bytes(n_cells);

  const float largest = block_largest(map, n_cells);
  Cells<kStaged> cells;
  cells.map = map;
  cells.exponent = fixed_mass::scale_exponent(largest, n_cells);
  if constexpr (kStaged)
    cells.mass = static_cast<int64_t*>(cell_storage);
  else
    cells.bits = static_cast<uint32_t*>(cell_storage);

  for (int w = tid; w < words; w += kThreads) chosen[w] = 0;
  for (int a = tid; a < atoms; a += kThreads) done[a] = 0;
  const int init_items = kStaged ? n_cells : (n_cells + 31) / 32;
  for (int i = tid; i < init_items; i += kThreads) cells.init(i);
  long long total = 0;  // the causal cells' mass
  for (int c = tid; c < n_cells; c += kThreads)
    if (c % n <= c / n) total += fixed_mass::fixed(map[c], cells.exponent);
  total = warp_sum(total);
  if (lane == 0) warp_total[warp] = total;
  __syncthreads();
  total = 0;
  for (int w = 0; w < kWarps; ++w) total += warp_total[w];

  greedy_over_lists(lut_counts, lut_indices, diagonal_atom, recall, atoms, n, words, cells, total, chosen, done,
                    selection, density, covered);
}

template <bool kStaged>
size_t list_kernel_bytes(int64_t atoms, int64_t n, int64_t words) {
  return static_cast<size_t>(words) * sizeof(unsigned long long) + Cells<kStaged>::bytes(n * n) +
         static_cast<size_t>(atoms);
}

// ---- The atom-bits kernel ----

// Its shared memory, as offsets into one allocation (8-byte arrays first). A map or an atom is a
// bitmap of n rows of row_words words; per-warp copies of the map's state let every warp take
// each chosen atom itself instead of waiting on one that does.
template <typename Int>
struct AtomBitsLayout {
  Int row_words, map_words, mask_words, atom_stride;
  Int chosen, mass, gain, fresh_mass, bits, covered, fresh, fresh_words, counts, added, done, bytes;

  __host__ __device__ AtomBitsLayout(Int atoms, Int n, Int words) {
    row_words = (n + 31) / 32;
    map_words = n * row_words;
    mask_words = (map_words + 31) / 32;
    atom_stride = map_words | 1;  // odd, so a warp reading one word of 32 atoms meets 32 banks
    Int at = 0;
    auto place = [&](Int count, Int size) {
      const Int offset = at;
      at += count * size;
      return offset;
    };
    chosen = place(words, 8);                   // u64 [words]: the selection being built
    mass = place(n * n, 8);                     // i64 [n * n]: each cell's fixed-point mass
    gain = place(atoms, 8);                     // u64 [atoms]: each atom's uncovered mass
    fresh_mass = place(kWarps * map_words, 8);  // i64 [warps][map_words]: the mass of fresh's words
    bits = place(atoms * atom_stride, 4);       // u32 [atoms][atom_stride]: each atom's cells
    covered = place(kWarps * map_words, 4);     // u32 [warps][map_words]: the covered cells
    fresh = place(kWarps * map_words, 4);       // u32 [warps][map_words]: the last take's new cells
    fresh_words = place(kWarps * mask_words, 4);  // u32 [warps][mask_words]: fresh's nonzero words
    counts = place(atoms * n, 4);               // i32 [atoms * n]: lut_counts, staged
    added = place(atoms, 4);                    // i32 [atoms]: each atom's uncovered blocks
    done = place(atoms, 1);                     // u8 [atoms]: for the list greedy only
    bytes = at;
  }
};

// Lists a thread reads at once, and the entries of each it loads before using any: a list is
// read once, and what that costs is the latency of its loads, so they are issued together.
constexpr int kListBatch = 8;
constexpr int kHeadEntries = 4;
constexpr int kTailEntries = 8;  // then the rest of a longer list, this many at a time

// The mass of the cells of `bits` in one row word whose first cell is `first_cell`, four loads
// in flight at a time (a chain of dependent loads otherwise).
__device__ __forceinline__ long long mass_of_cells(uint32_t bits, const int64_t* mass_of, int first_cell) {
  long long sum = 0;
  while (bits) {
    int cell[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      cell[k] = bits ? first_cell + __ffs(bits) - 1 : -1;
      bits &= bits - 1;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (cell[k] >= 0) sum += mass_of[cell[k]];
  }
  return sum;
}

// The best of the candidates in lanes [0, lanes) of a warp (lanes beyond hold none), in every
// lane: fewer rounds than warp_best, then lane 0's result to all.
__device__ __forceinline__ Candidate best_of_lanes(Candidate c, int lanes) {
  for (int offset = 1; offset < lanes; offset *= 2) {
    const Candidate other{__shfl_xor_sync(kFullMask, c.ratio, offset), __shfl_xor_sync(kFullMask, c.gain, offset),
                          __shfl_xor_sync(kFullMask, c.atom, offset), __shfl_xor_sync(kFullMask, c.added, offset)};
    if (better(other, c)) c = other;
  }
  return {__shfl_sync(kFullMask, c.ratio, 0), __shfl_sync(kFullMask, c.gain, 0), __shfl_sync(kFullMask, c.atom, 0),
          __shfl_sync(kFullMask, c.added, 0)};
}

// warp_best as five reductions of 32-bit keys: the ratio's bits (a positive double's order is its
// bits' order), then the gain's, then the lowest atom among the lanes still tied.
__device__ __forceinline__ Candidate warp_best_by_keys(const Candidate& c) {
#if __CUDA_ARCH__ >= 800
  const unsigned long long ratio_bits = c.atom < 0 ? 0ull : static_cast<unsigned long long>(__double_as_longlong(c.ratio));
  const unsigned long long gain_bits = c.atom < 0 ? 0ull : static_cast<unsigned long long>(c.gain);
  unsigned key = static_cast<unsigned>(ratio_bits >> 32);
  const unsigned ratio_high = __reduce_max_sync(kFullMask, key);
  bool tied = key == ratio_high;
  key = tied ? static_cast<unsigned>(ratio_bits) : 0u;
  const unsigned ratio_low = __reduce_max_sync(kFullMask, key);
  tied = tied && key == ratio_low;
  key = tied ? static_cast<unsigned>(gain_bits >> 32) : 0u;
  const unsigned gain_high = __reduce_max_sync(kFullMask, key);
  tied = tied && key == gain_high;
  key = tied ? static_cast<unsigned>(gain_bits) : 0u;
  const unsigned gain_low = __reduce_max_sync(kFullMask, key);
  tied = tied && key == gain_low;
  const unsigned atom = __reduce_min_sync(kFullMask, tied && c.atom >= 0 ? static_cast<unsigned>(c.atom) : UINT_MAX);
  if (atom == UINT_MAX) return no_candidate();
  const int winner = __ffs(__ballot_sync(kFullMask, tied && static_cast<unsigned>(c.atom) == atom)) - 1;
  return {__longlong_as_double(static_cast<long long>((static_cast<unsigned long long>(ratio_high) << 32) | ratio_low)),
          static_cast<long long>((static_cast<unsigned long long>(gain_high) << 32) | gain_low), static_cast<int>(atom),
          __shfl_sync(kFullMask, c.added, winner)};
#else
  return warp_best(c);
#endif
}

__device__ __forceinline__ void barrier_of(int threads) {
  if (threads == 32)
    __syncwarp();
  else
    asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
}

// Two blocks per SM, so up to 128 registers: under the plain bound ptxas squeezes it into 64 and
// spills.
__global__ void __launch_bounds__(kThreads, 2)
    project_atom_bits_kernel(const int32_t* __restrict__ lut_counts, const int32_t* __restrict__ lut_indices,
                             int diagonal_atom, const float* __restrict__ scores, double recall, int atoms,
                             int n, int words, unsigned long long* __restrict__ selection,
                             float* __restrict__ density, float* __restrict__ covered_share) {
  extern __shared__ unsigned long long shared[];
  __shared__ long long warp_total[kWarps];
  // Double-buffered: a warp that has gone on to write the next iteration's slot cannot overwrite
  // one that a slower warp is still reading.
  __shared__ Candidate warp_slots[2][kWarps];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int n_cells = n * n;
  const float* map = scores + static_cast<int64_t>(blockIdx.x) * n_cells;
  const AtomBitsLayout<int> layout(atoms, n, words);
  unsigned char* base = reinterpret_cast<unsigned char*>(shared);
  unsigned long long* chosen = reinterpret_cast<unsigned long long*>(base + layout.chosen);
  int64_t* mass_of = reinterpret_cast<int64_t*>(base + layout.mass);
  unsigned long long* gain_of = reinterpret_cast<unsigned long long*>(base + layout.gain);
  uint32_t* atom_bits = reinterpret_cast<uint32_t*>(base + layout.bits);
  int32_t* counts = reinterpret_cast<int32_t*>(base + layout.counts);
  int32_t* added_of = reinterpret_cast<int32_t*>(base + layout.added);
  unsigned char* done = base + layout.done;
  const int row_words = layout.row_words, map_words = layout.map_words, mask_words = layout.mask_words;
  const int atom_stride = layout.atom_stride;

  // Tables this path cannot represent as bitmaps (a column listed twice in a row, one outside the
  // grid, a count over n) send the whole block to the list greedy, which reads them as the CPU does.
  bool irregular = false;
  for (int l = tid; l < atoms * n; l += kThreads) {
    const int32_t count = lut_counts[l];
    irregular |= count > n;
    counts[l] = count;
  }
  for (int w = tid; w < words; w += kThreads) chosen[w] = 0;
  for (int w = tid; w < atoms * atom_stride; w += kThreads) atom_bits[w] = 0;
  for (int w = tid; w < kWarps * map_words; w += kThreads) reinterpret_cast<uint32_t*>(base + layout.covered)[w] = 0;
  for (int a = tid; a < atoms; a += kThreads) {
    gain_of[a] = 0;
    added_of[a] = 0;
    done[a] = 0;
  }
  const int exponent = fixed_mass::scale_exponent(block_largest(map, n_cells), n_cells);

  long long total = 0;  // the causal cells' mass
  for (int c = tid; c < n_cells; c += kThreads) {
    const int64_t v = fixed_mass::fixed(map[c], exponent);
    mass_of[c] = v;
    if (c % n <= c / n) total += v;
  }
  total = warp_sum(total);
  if (lane == 0) warp_total[warp] = total;
  __syncthreads();
  total = 0;
  for (int w = 0; w < kWarps; ++w) total += warp_total[w];

  // The atoms' bitmaps and masses, a thread per list (the thread owns its row of bits). Lists go
  // row by row over the atoms, so that a warp's lanes add into different atoms.
  const int lists = n * atoms;
  for (int first = tid; first < lists; first += kListBatch * kThreads) {
    int32_t head[kListBatch][kHeadEntries];
#pragma unroll
    for (int j = 0; j < kListBatch; ++j) {
      const int item = first + j * kThreads;
      if (item >= lists) break;
      const int r = item / atoms, a = item - r * atoms;
      const int count = counts[a * n + r];
      const int32_t* list = lut_indices + (static_cast<int64_t>(a) * n + r) * n;
#pragma unroll
      for (int i = 0; i < kHeadEntries; ++i)
        if (i < count) head[j][i] = __ldg(list + i);
    }
#pragma unroll
    for (int j = 0; j < kListBatch; ++j) {
      const int item = first + j * kThreads;
      if (item >= lists) break;
      const int r = item / atoms, a = item - r * atoms;
      const int count = min(counts[a * n + r], n);
      const int32_t* list = lut_indices + (static_cast<int64_t>(a) * n + r) * n;
      uint32_t* row = atom_bits + a * atom_stride + r * row_words;
      uint32_t row_bits = 0;  // the row, while it is one word
      long long gain = 0;
      auto note = [&](int c) {
        if (c < 0 || c >= n) {
          irregular = true;
          return;
        }
        const uint32_t bit = 1u << (c % 32);
        if (row_words == 1) {
          irregular |= (row_bits & bit) != 0;
          row_bits |= bit;
        } else {
          const uint32_t word = row[c / 32];
          irregular |= (word & bit) != 0;
          row[c / 32] = word | bit;
        }
        gain += mass_of[r * n + c];
      };
#pragma unroll
      for (int i = 0; i < kHeadEntries; ++i)
        if (i < count) note(head[j][i]);
      for (int i = kHeadEntries; i < count; i += kTailEntries) {
        int32_t tail[kTailEntries];
#pragma unroll
        for (int t = 0; t < kTailEntries; ++t)
          if (i + t < count) tail[t] = __ldg(list + i + t);
#pragma unroll
        for (int t = 0; t < kTailEntries; ++t)
          if (i + t < count) note(tail[t]);
      }
      if (row_words == 1) row[0] = row_bits;
      if (count > 0) {
        atomicAdd(gain_of + a, static_cast<unsigned long long>(gain));
        atomicAdd(added_of + a, count);
      }
    }
  }
  irregular = __syncthreads_or(irregular);
  if (irregular) {
    const Cells<true> cells{mass_of, map, exponent};
    greedy_over_lists(lut_counts, lut_indices, diagonal_atom, recall, atoms, n, words, cells, total, chosen, done,
                      selection, density, covered_share);
    return;
  }
  // Read before any warp can go on to update the diagonal atom's count.
  const long long diagonal_gain = static_cast<long long>(gain_of[diagonal_atom]);
  const int diagonal_added = added_of[diagonal_atom];
  __syncthreads();

  // The greedy: a thread per atom, in the warps that hold atoms; every such warp takes each
  // chosen atom into its own copy of the map's state, so an iteration needs one barrier.
  const int greedy_warps = min(kWarps, (atoms + 31) / 32), greedy_threads = greedy_warps * 32;
  if (warp >= greedy_warps) return;
  uint32_t* covered = reinterpret_cast<uint32_t*>(base + layout.covered) + warp * map_words;
  uint32_t* fresh = reinterpret_cast<uint32_t*>(base + layout.fresh) + warp * map_words;
  int64_t* fresh_mass = reinterpret_cast<int64_t*>(base + layout.fresh_mass) + warp * map_words;
  uint32_t* fresh_words = reinterpret_cast<uint32_t*>(base + layout.fresh_words) + warp * mask_words;
  auto first_cell_of = [&](int q) { return row_words == 1 ? q * n : (q / row_words) * n + (q % row_words) * 32; };

  long long mass = 0;  // the same in every greedy warp
  int64_t blocks = 0;
  // Covers atom a's uncovered cells (`gain` and `added` of them); whether the recall is reached.
  auto take = [&](int a, long long gain, int added) {
    for (int k = 0; k < mask_words; ++k) {
      const int q = k * 32 + lane;
      uint32_t cells = 0;
      if (q < map_words) {
        cells = atom_bits[a * atom_stride + q] & ~covered[q];
        covered[q] |= cells;
        fresh[q] = cells;
        fresh_mass[q] = mass_of_cells(cells, mass_of, first_cell_of(q));
      }
      const uint32_t nonzero = __ballot_sync(kFullMask, cells != 0);
      if (lane == 0) fresh_words[k] = nonzero;
    }
    __syncwarp();
    mass += gain;
    blocks += added;
    if (warp == 0 && lane == 0) chosen[a / 64] |= 1ull << (a % 64);
    return fixed_mass::reached(mass, total, recall);
  };
  bool stop = take(diagonal_atom, diagonal_gain, diagonal_added);

  for (int parity = 0; !stop; parity ^= 1) {
    Candidate best = no_candidate();
    for (int a = tid; a < atoms; a += greedy_threads) {
      long long gain = static_cast<long long>(gain_of[a]);
      int added = added_of[a];
      // Covering only removes cells, so an atom that adds no block or no mass now never will
      // (a taken atom among them).
      if (added == 0 || gain <= 0) continue;
      const uint32_t* bits_of_a = atom_bits + a * atom_stride;
      for (int k = 0; k < mask_words; ++k) {
        // The words the last take changed, the same for every lane: eight at a time, loads first.
        for (uint32_t changed = fresh_words[k]; changed;) {
          int q[8];
          uint32_t lost[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            q[j] = changed ? k * 32 + __ffs(changed) - 1 : -1;
            changed &= changed - 1;
          }
          uint32_t new_cells[8];
          long long new_mass[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            new_cells[j] = q[j] >= 0 ? fresh[q[j]] : 0;
            lost[j] = q[j] >= 0 ? bits_of_a[q[j]] & new_cells[j] : 0;
            new_mass[j] = q[j] >= 0 ? fresh_mass[q[j]] : 0;
          }
          // An atom mostly loses all of a word's new cells or none: the word's mass, or nothing.
          bool partial = false;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            added -= __popc(lost[j]);
            gain -= lost[j] == new_cells[j] ? new_mass[j] : 0;
            partial |= lost[j] != 0 && lost[j] != new_cells[j];
          }
          if (partial) {
#pragma unroll
            for (int j = 0; j < 8; ++j)
              if (lost[j] != 0 && lost[j] != new_cells[j]) gain -= mass_of_cells(lost[j], mass_of, first_cell_of(q[j]));
          }
        }
      }
      gain_of[a] = static_cast<unsigned long long>(gain);
      added_of[a] = added;
      if (added == 0 || gain <= 0) continue;
      const Candidate c{fixed_mass::ratio(gain, added), gain, a, added};
      if (better(c, best)) best = c;
    }
    best = warp_best_by_keys(best);
    if (lane == 0) warp_slots[parity][warp] = best;
    barrier_of(greedy_threads);
    best = best_of_lanes(lane < greedy_warps ? warp_slots[parity][lane] : no_candidate(), greedy_warps);
    if (best.atom < 0) break;  // no atom adds mass: the pool cannot cover the rest
    stop = take(best.atom, best.gain, best.added);
  }
  if (warp == 0) {
    __syncwarp();
    write_outputs(blockIdx.x, n, words, chosen, mass, blocks, total, selection, density, covered_share);
  }
}

}  // namespace

void project_patterns_cuda(const TensorView& lut_counts, const TensorView& lut_indices,
                           int64_t diagonal_atom, const TensorView& scores, double recall,
                           const TensorView& selection, const TensorView& density,
                           const TensorView& covered) {
  const int64_t atoms = lut_counts.size(0), n = lut_counts.size(1), words = selection.size(1);
  const int64_t groups = scores.size(0);
  require(n <= 46340, "CUDA pattern projection indexes a map's cells with 32-bit integers; a grid "
                      "of " + std::to_string(n) + " blocks is too large");
  require(atoms <= INT_MAX && groups <= INT_MAX,
          "CUDA pattern projection supports at most 2^31 - 1 atoms and maps");
  if (groups == 0) return;
  DeviceGuard guard(scores.device_index);
  const cudaStream_t stream = stream_of(selection.stream);
  auto launch = [&](auto kernel, size_t bytes) {
    reserve_shared_memory(kernel, bytes, scores.device_index, "project_patterns");
    kernel<<<static_cast<unsigned>(groups), kThreads, bytes, stream>>>(
        lut_counts.ptr<const int32_t>(), lut_indices.ptr<const int32_t>(),
        static_cast<int>(diagonal_atom), scores.ptr<const float>(), recall, static_cast<int>(atoms),
        static_cast<int>(n), static_cast<int>(words), selection.ptr<unsigned long long>(),
        density.ptr<float>(), covered.ptr<float>());
  };
  // Atom bits wherever they fit: at the default pool up to grids of 64 blocks on an H100 or A100
  // (about 110 KB), 32 blocks on GPUs of 100 KB per block.
  int shared_limit = 0;
  check_cuda(cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, scores.device_index),
             "cudaDeviceGetAttribute");
  // The kernel's static shared memory is fixed at compile time: looked up once, not every step.
  static const int64_t static_bytes = [] {
    cudaFuncAttributes attributes{};
    check_cuda(cudaFuncGetAttributes(&attributes, project_atom_bits_kernel), "cudaFuncGetAttributes");
    return static_cast<int64_t>(attributes.sharedSizeBytes);
  }();
  const int64_t atom_bits = AtomBitsLayout<int64_t>(atoms, n, words).bytes;
  // Staged up to grids of about 110 blocks (sequences of 7000 tokens at 64-token blocks).
  constexpr size_t kStagedLimit = 96 * 1024;
  const size_t staged = list_kernel_bytes<true>(atoms, n, words);
  if (atom_bits + static_bytes <= shared_limit)
    launch(project_atom_bits_kernel, static_cast<size_t>(atom_bits));
  else if (staged <= kStagedLimit)
    launch(project_lists_kernel<true>, staged);
  else
    launch(project_lists_kernel<false>, list_kernel_bytes<false>(atoms, n, words));
  check_cuda(cudaGetLastError(), "project_patterns kernel launch");
}

}  // namespace long_exposure
