// Device projection of block score maps onto a pattern pool: the greedy of project_patterns_cpu,
// one thread block per map, so a training step builds its masks with nothing read back by the
// host (and can be captured in a CUDA graph).
//
// The result is bit-identical to the CPU's, not merely close: near-ties between atoms are common
// (atoms that cover the same cells, maps of equal values), and a sum in another order can flip
// them, after which the two selections go their separate ways. So each candidate atom is scored by
// one thread that adds its uncovered cells in the CPU's order (rows, then each row's sorted list)
// in fp64, the chosen atom's cells are added to the covered mass one by one in that order too, and
// the block-wide argmax applies the CPU's rule (highest mass per new block, then highest mass,
// then the lowest atom). Threads run over atoms, not over an atom's cells: a split sum would
// change the rounding.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda_check.cuh"
#include "float_kernels.cuh"
#include "long_exposure/pattern_pool.h"

namespace long_exposure {

namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// std::max(0.0f, s) as the CPU clamps: NaN and -0 become +0.
__device__ __forceinline__ float clamped(float s) { return 0.f < s ? s : 0.f; }

// Where a map's cells stand. Staged: the clamped scores in shared memory, a covered cell marked
// negative, so scoring a candidate reads one shared word per cell. Bitmap: one covered bit per
// cell in shared memory and the scores read from global memory, for grids whose staged copy would
// need more than the default shared memory.
template <bool kStaged>
struct Cells;

template <>
struct Cells<true> {
  float* value;
  const float* map;
  __device__ void init(int cell) const { value[cell] = clamped(map[cell]); }
  // The cell's clamped score, or a negative number once it is covered.
  __device__ float read(int cell) const { return value[cell]; }
  __device__ void cover(int cell) const { value[cell] = -1.f; }
  __host__ __device__ static size_t bytes(int64_t cells) {
    return static_cast<size_t>(cells) * sizeof(float);
  }
};

template <>
struct Cells<false> {
  uint32_t* bits;
  const float* map;
  __device__ void init(int word) const { bits[word] = 0; }
  __device__ float read(int cell) const {
    return (bits[cell >> 5] >> (cell & 31)) & 1u ? -1.f : clamped(__ldg(map + cell));
  }
  __device__ void cover(int cell) const { bits[cell >> 5] |= 1u << (cell & 31); }
  __host__ __device__ static size_t bytes(int64_t cells) {
    return static_cast<size_t>((cells + 31) / 32) * sizeof(uint32_t);
  }
};

struct Candidate {
  double ratio, gain;
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
    const Candidate other{__shfl_xor_sync(kFullMask, c.ratio, offset),
                          __shfl_xor_sync(kFullMask, c.gain, offset),
                          __shfl_xor_sync(kFullMask, c.atom, offset)};
    if (better(other, c)) c = other;
  }
  return c;
}

// Adds atom a to the selection and its uncovered cells to the covered mass, one by one in the
// CPU's order (the stop rule compares that running sum).
template <bool kStaged>
__device__ __forceinline__ void take(int a, const int32_t* __restrict__ lut_counts,
                                     const int32_t* __restrict__ lut_indices, int n,
                                     const Cells<kStaged>& state, unsigned long long* chosen,
                                     unsigned char* done, double& mass, int64_t& blocks) {
  done[a] = 1;
  chosen[a / 64] |= 1ull << (a % 64);
  const int32_t* counts = lut_counts + static_cast<int64_t>(a) * n;
  const int32_t* lists = lut_indices + static_cast<int64_t>(a) * n * n;
  for (int r = 0; r < n; ++r) {
    const int32_t* list = lists + r * n;
    for (int i = 0, count = counts[r]; i < count; ++i) {
      const int cell = r * n + list[i];
      const float v = state.read(cell);
      if (v >= 0.f) {
        state.cover(cell);
        ++blocks;
        mass += v;
      }
    }
  }
}

template <bool kStaged>
__global__ void __launch_bounds__(kMaxThreads, 1)
    project_kernel(const int32_t* __restrict__ lut_counts, const int32_t* __restrict__ lut_indices,
                   int diagonal_atom, const float* __restrict__ scores, double recall, int atoms,
                   int n, int words, unsigned long long* __restrict__ selection,
                   float* __restrict__ density, float* __restrict__ covered) {
  extern __shared__ unsigned long long shared[];
  __shared__ Candidate warp_slots[kMaxWarps];
  __shared__ double shared_total;
  __shared__ int stop;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int threads = blockDim.x, warps = threads / 32;
  const int64_t g = blockIdx.x;
  const int cells = n * n;
  const float* map = scores + g * cells;

  unsigned long long* chosen = shared;  // [words]: the selection being built
  void* cell_storage = chosen + words;
  Cells<kStaged> state;
  state.map = map;
  if constexpr (kStaged)
    state.value = static_cast<float*>(cell_storage);
  else
    state.bits = static_cast<uint32_t*>(cell_storage);
  // [atoms]: 1 once an atom can no longer be chosen (taken, or it adds nothing)
  unsigned char* done = static_cast<unsigned char*>(cell_storage) + Cells<kStaged>::bytes(cells);

  for (int w = tid; w < words; w += threads) chosen[w] = 0;
  for (int a = tid; a < atoms; a += threads) done[a] = 0;
  const int init_items = kStaged ? cells : (cells + 31) / 32;
  for (int i = tid; i < init_items; i += threads) state.init(i);
  __syncthreads();

  // The running mass and block count live in thread 0, the only thread that takes atoms.
  double mass = 0;
  int64_t blocks = 0;

  // The map's total, in the CPU's order, by another warp while thread 0 takes the diagonal; it
  // reads global memory, which taking does not change.
  if (tid == (threads > 32 ? 32 : 0)) {
    double total = 0;
    for (int r = 0; r < n; ++r)
      for (int c = 0; c <= r; ++c) total += clamped(map[r * n + c]);
    shared_total = total;
  }
  if (tid == 0) take(diagonal_atom, lut_counts, lut_indices, n, state, chosen, done, mass, blocks);
  __syncthreads();
  const double total = shared_total;
  if (tid == 0) stop = !(mass < recall * total);
  __syncthreads();

  while (!stop) {
    Candidate best{0, 0, -1};
    for (int a = tid; a < atoms; a += threads) {
      if (done[a]) continue;
      const int32_t* counts = lut_counts + static_cast<int64_t>(a) * n;
      const int32_t* lists = lut_indices + static_cast<int64_t>(a) * n * n;
      double gain = 0;
      int added = 0;
      for (int r = 0; r < n; ++r) {
        const int32_t* list = lists + r * n;
        const int count = counts[r];
#pragma unroll 4
        for (int i = 0; i < count; ++i) {
          const float v = state.read(r * n + list[i]);
          // Adding +0 for a covered cell leaves a non-negative fp64 sum unchanged, so this is the
          // CPU's sum over the uncovered cells, without a branch around the add.
          added += v >= 0.f;
          gain += v >= 0.f ? static_cast<double>(v) : 0.0;
        }
      }
      // Covering only removes cells, and a rounded sum of fewer non-negative terms in the same
      // order is never larger: an atom that adds no block or no mass now never will again.
      if (added == 0 || gain <= 0) {
        done[a] = 1;
        continue;
      }
      const Candidate c{gain / static_cast<double>(added), gain, a};
      if (better(c, best)) best = c;
    }
    best = warp_best(best);
    if (lane == 0) warp_slots[warp] = best;
    __syncthreads();
    if (warp == 0) {
      Candidate c = lane < warps ? warp_slots[lane] : Candidate{0, 0, -1};
      c = warp_best(c);
      if (lane == 0) {
        if (c.atom < 0) {
          stop = 1;  // no atom adds mass: the pool cannot cover the rest
        } else {
          take(c.atom, lut_counts, lut_indices, n, state, chosen, done, mass, blocks);
          stop = !(mass < recall * total);
        }
      }
    }
    __syncthreads();
  }

  for (int w = tid; w < words; w += threads) selection[g * words + w] = chosen[w];
  if (tid == 0) {
    const double causal_blocks = static_cast<double>(static_cast<int64_t>(n) * (n + 1) / 2);
    density[g] = static_cast<float>(blocks / causal_blocks);
    covered[g] = static_cast<float>(total > 0 ? mass / total : 1.0);
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
  // A thread per atom, rounded to whole warps for the shuffles of the argmax.
  const int threads = static_cast<int>(
      std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (atoms + 31) / 32 * 32)));
  const cudaStream_t stream = stream_of(selection.stream);
  const size_t staged = shared_bytes<true>(atoms, n, words);
  // The default 48 KiB holds static and dynamic shared memory together; 1 KiB covers the static.
  constexpr size_t kStaticShared = 1024, kDefaultSharedMemory = 48 * 1024 - kStaticShared;
  auto launch = [&](auto kernel, size_t bytes) {
    kernel<<<static_cast<unsigned>(groups), threads, bytes, stream>>>(
        lut_counts.ptr<const int32_t>(), lut_indices.ptr<const int32_t>(),
        static_cast<int>(diagonal_atom), scores.ptr<const float>(), recall, static_cast<int>(atoms),
        static_cast<int>(n), static_cast<int>(words), selection.ptr<unsigned long long>(),
        density.ptr<float>(), covered.ptr<float>());
  };
  if (staged <= kDefaultSharedMemory) {
    launch(project_kernel<true>, staged);
  } else {
    const size_t bitmap = shared_bytes<false>(atoms, n, words);
    reserve_shared_memory(project_kernel<false>, bitmap + kStaticShared, scores.device_index,
                          "project_patterns");
    launch(project_kernel<false>, bitmap);
  }
  check_cuda(cudaGetLastError(), "project_patterns kernel launch");
}

}  // namespace long_exposure
