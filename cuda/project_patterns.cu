// Device projection of block score maps onto a pattern pool: the greedy of project_patterns_cpu,
// one thread block per map, so a training step builds its masks with nothing read back by the
// host (and can be captured in a CUDA graph).
//
// The result is bit-identical to the CPU's: both count mass in fixed point (fixed_mass.h), whose
// sums are exact in any order, so a warp scores a candidate atom with a lane per row of it and
// covers the chosen atom's cells the same way, and the block-wide argmax applies the CPU's rule
// (highest mass per new block, then highest mass, then the lowest atom). Each iteration of the
// greedy costs a few microseconds; with fp32 sums in the CPU's order, which fixed one thread per
// atom, it had cost about a hundred.
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
  int atom;  // -1: none
};

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
                          __shfl_xor_sync(kFullMask, c.atom, offset)};
    if (better(other, c)) c = other;
  }
  return c;
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

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

template <bool kStaged>
__global__ void __launch_bounds__(kThreads)
    project_kernel(const int32_t* __restrict__ lut_counts, const int32_t* __restrict__ lut_indices,
                   int diagonal_atom, const float* __restrict__ scores, double recall, int atoms,
                   int n, int words, unsigned long long* __restrict__ selection,
                   float* __restrict__ density, float* __restrict__ covered) {
  extern __shared__ unsigned long long shared[];
  __shared__ Candidate warp_slots[kWarps];
  __shared__ float warp_largest[kWarps];
  __shared__ long long warp_total[kWarps];
  __shared__ int stop;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t g = blockIdx.x;
  const int n_cells = n * n;
  const float* map = scores + g * n_cells;

  unsigned long long* chosen = shared;  // [words]: the selection being built
  void* cell_storage = chosen + words;
  // [atoms]: 1 once an atom can no longer be chosen (taken, or it adds nothing)
  unsigned char* done = static_cast<unsigned char*>(cell_storage) + Cells<kStaged>::bytes(n_cells);

  // The scale of the map's fixed-point masses, from its largest value (a max is exact in any order).
  float largest = 0.f;
  for (int c = tid; c < n_cells; c += kThreads) largest = fmaxf(largest, fixed_mass::clamped(map[c]));
  for (int offset = 16; offset > 0; offset /= 2) largest = fmaxf(largest, __shfl_xor_sync(kFullMask, largest, offset));
  if (lane == 0) warp_largest[warp] = largest;
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) largest = fmaxf(largest, warp_largest[w]);
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
    Candidate best{0, 0, -1};
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
      const Candidate c{fixed_mass::ratio(gain, added), gain, a};
      if (better(c, best)) best = c;
    }
    if (lane == 0) warp_slots[warp] = best;
    __syncthreads();
    if (warp == 0) {
      const Candidate c = warp_best(lane < kWarps ? warp_slots[lane] : Candidate{0, 0, -1});
      if (c.atom < 0) {
        if (lane == 0) stop = 1;  // no atom adds mass: the pool cannot cover the rest
      } else {
        take(c.atom);
      }
    }
    __syncthreads();
  }

  for (int w = tid; w < words; w += kThreads) selection[g * words + w] = chosen[w];
  if (tid == 0) {
    const double causal_blocks = static_cast<double>(static_cast<int64_t>(n) * (n + 1) / 2);
    density[g] = static_cast<float>(blocks / causal_blocks);
    covered[g] = fixed_mass::covered_share(mass, total);
  }
}

template <bool kStaged>
size_t shared_bytes(int64_t atoms, int64_t n, int64_t words) {
  return static_cast<size_t>(words) * sizeof(unsigned long long) + Cells<kStaged>::bytes(n * n) +
         static_cast<size_t>(atoms);
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
  // Staged up to grids of about 110 blocks (sequences of 7000 tokens at 64-token blocks).
  constexpr size_t kStagedLimit = 96 * 1024;
  const size_t staged = shared_bytes<true>(atoms, n, words);
  if (staged <= kStagedLimit)
    launch(project_kernel<true>, staged);
  else
    launch(project_kernel<false>, shared_bytes<false>(atoms, n, words));
  check_cuda(cudaGetLastError(), "project_patterns kernel launch");
}

}  // namespace long_exposure
