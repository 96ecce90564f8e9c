// The neuron-block MLP on tensor cores (contract: cpp/include/long_exposure/mlp.h). Four sparse
// products and two small dense ones, each a use of mma::accumulate:
//   forward   fc1: H[tile, block] = relu(X[tile] @ W1[block]^T (+ U1[tile] @ B1[block]^T) + b1)
//                  for active pairs;
//             fc2: [Y | V2][tile] = sum over the tile's active blocks of H[tile, block] @
//                  [W2 | A2][:, block]^T (+ b2 on Y) — the LoRA factor A2 rides along as extra
//                  output columns, so V2 = h @ A2^T costs no second pass over H;
//   backward  dH:  dH[tile, block] = (dY[tile] @ W2[:, block] (+ dV2[tile] @ A2[:, block])) * (H > 0)
//                  for active pairs, with db1's column sums folded into the
//                  epilogue;
//             dX:  [dX | dU1][tile] = sum over active blocks of dH[tile, block] @ [W1 | B1][block];
//             dB1 = dH^T @ U1 and dA2^T = H^T @ dV2: dense over tokens, over H and dH cleared
//                  outside the mask.
// One thread block owns Engine::BM tokens (64, or 128 where tiles are multiples of 128: a whole
// mask tile or a part of one), so a mask tile's block list is the same for all its rows, and
// Engine::BN output columns in Engine::kPieces pieces with B operands of their own: BN adjacent
// columns of Y, V2, dX or dU1 for fc2 and dX; for fc1 and dH, piece j on the j-th of the active
// (tile, block) pairs the thread block takes, so the 256-wide wgmma tile spans two of the tile's
// active 128-neuron blocks, and the second is padding where the count is odd.
// H and dH are written on active pairs only; the dense token sums behind dB1 and dA2 need zeros
// elsewhere, so the launcher clears H or dH first exactly when one of those is asked for.
#pragma once

#include <cuda.h>

#include "long_exposure/mlp.h"
#include "mma_gemm.cuh"

namespace long_exposure {
namespace neuron_block {

constexpr int kStages = 4;

// The shapes every kernel of one call reads, in elements.
struct Dims {
  int64_t tokens, model, neurons, r1, r2, tile_m, block_n, capacity;
  int tile_group;  // grouped_pair_position's
};

// The operands' tensor maps, encoded by the launcher for engines that load by TMA only; named
// as the pointers are, a map per use where the box differs.
struct ForwardMaps {
  CUtensorMap x, w1, lora1_u, lora1_b, h, w2, lora2_a;
};
struct BackwardMaps {
  CUtensorMap dy, dlora2_v, w2, lora2_a, dh, w1, lora1_b;
};

template <typename T>
struct ForwardParams {
  Dims dims;
  const T *x, *w1, *b1, *w2, *b2, *lora1_u, *lora1_b, *lora2_a;
  const int32_t *counts, *indices;
  T *y, *h, *lora2_v;
  ForwardMaps maps;
};

template <typename T>
struct BackwardParams {
  Dims dims;
  const T *dy, *dlora2_v, *w1, *w2, *h, *lora1_u, *lora1_b, *lora2_a;
  const int32_t *counts, *indices;
  T *dh, *dx, *dlora1_u;
  float* db1_sum;  // [neurons] fp32, zeroed by the launcher; null when db1 is not asked for
  BackwardMaps maps;
};

template <typename T>
__device__ __forceinline__ void store_pair(T* out, int64_t ld, int64_t rows, int64_t cols, int64_t row, int64_t col,
                                           float v0, float v1) {
  using P = mma::Pair<T>;
  if (row < rows && col < cols) *reinterpret_cast<typename P::type*>(out + row * ld + col) = P::make(v0, v1);
}

// a[j] for a j known only at run time, as a chain of selects: indexing a small array by a
// run-time value would move it to local memory.
template <typename V, int N>
__device__ __forceinline__ V pick(const V (&a)[N], int j) {
  V v = a[0];
#pragma unroll
  for (int k = 1; k < N; ++k)
    if (j == k) v = a[k];
  return v;
}

// fc1's and fc2's biases are read before the products: in the epilogue each read was a global
// load the next instruction waited on, one column pair at a time, and those waits were a quarter
// of fc1's stall samples (bench/RESULTS.md). Read first, their latency hides behind the first TMA
// stages instead. They go to shared memory, past the engine's ring (the launcher reserves
// EpilogueShared::kBytes for it): kept in registers they cost fc1 30 of them and spilled in the
// 64-token configurations. (dH's ReLU mask, read from H the same way, was also tried read early,
// into bits: the backward did not move, so it stays in the epilogue.)
template <typename Engine>
struct EpilogueShared {
  static constexpr int kOffset = Engine::shared_bytes();  // past the ring
  static constexpr int kBytes = Engine::BN * static_cast<int>(sizeof(float));
};

// s_bias[col] = bias[base(col)] for each of the thread block's BN output columns, zero where
// column_base gives a negative base (past the tensor, or no bias); ends with a barrier.
template <typename Engine, typename T, typename ColumnBase>
__device__ __forceinline__ float* stage_bias(unsigned char* shared, const T* bias, ColumnBase column_base) {
  float* s_bias = reinterpret_cast<float*>(shared + EpilogueShared<Engine>::kOffset);
  for (int col = threadIdx.x; col < Engine::BN; col += Engine::kThreads) {
    const int64_t base = bias ? column_base(col) : -1;
    s_bias[col] = base >= 0 ? static_cast<float>(bias[base]) : 0.0f;
  }
  __syncthreads();
  return s_bias;
}

using LoraGradConfig = mma::Config<64, 64, 2, 2, kStages, false, false>;

// The kernels take an Engine (mma::Engine or, on sm_90a, wgmma::Engine): a BM x BN block tile
// whose B side is kPieces operands of kPieceN columns, its accumulator, the chunk loop and the
// accumulator visitor.

// The output of an fc1 or dH thread block: BM tokens from m0 (rows of them inside the tensor),
// and per B piece j, kPieceN neurons from n0[j], cols[j] of them inside the tensor; cols[j] = 0
// marks a padding piece, whose slot is past the tile's count or whose neurons are past d_ffn.
// Neuron indices are 32-bit (the entry points require d_ffn < 2^31): the epilogues keep these
// live beside the accumulator, where every register counts.
template <int PIECES>
struct PairPieces {
  int64_t m0, rows;
  int n0[PIECES], cols[PIECES];
};

// Each active block of a tile splits into block_n / kPieceN units of kPieceN neurons, numbered
// slot by slot; thread block x takes units kPieces x onwards. Grids span slots, not blocks, so
// inactive pairs cost a thread block that exits at once (false: nothing to compute), and H and dH
// are written on active pairs only. With 128-neuron blocks and two pieces, a thread block takes
// slots 2 x and 2 x + 1 of its tile.
//
// The launch order groups token tiles: a group's tiles take slot group x side by side before any
// takes x + 1 (`group` 1: the grid's own order, each tile's slots side by side). With each tile's
// slots side by side, the thread blocks in flight spanned a few tiles and every block of W1, which
// then streamed from DRAM once per wave (bench/RESULTS.md, session 19: fc1 read 572 MB where
// cuBLAS read 142).
struct PairPosition {
  unsigned x, y;
};
__device__ __forceinline__ PairPosition grouped_pair_position(unsigned group) {
  const unsigned width = gridDim.x, linear = blockIdx.y * width + blockIdx.x;
  const unsigned g = linear / (group * width), in_group = linear - g * group * width;
  const unsigned height = min(group, gridDim.y - g * group);  // the last group may be short
  return {in_group / height, g * group + in_group % height};
}

template <typename Engine>
__device__ __forceinline__ bool active_pair_pieces(const Dims& d, const int32_t* counts, const int32_t* indices,
                                                   PairPieces<Engine::kPieces>& out) {
  const PairPosition at = grouped_pair_position(static_cast<unsigned>(d.tile_group));
  out.m0 = static_cast<int64_t>(at.y) * Engine::BM;
  out.rows = d.tokens - out.m0;
  const int64_t tile = out.m0 / d.tile_m, count = counts[tile], units_per_block = d.block_n / Engine::kPieceN;
  bool any = false;
#pragma unroll
  for (int j = 0; j < Engine::kPieces; ++j) {
    const int64_t unit = static_cast<int64_t>(at.x) * Engine::kPieces + j, slot = unit / units_per_block;
    out.n0[j] = 0;
    out.cols[j] = 0;
    if (slot >= count) continue;
    const int64_t n0 = static_cast<int64_t>(indices[tile * d.capacity + slot]) * d.block_n +
                       (unit % units_per_block) * Engine::kPieceN;
    if (n0 >= d.neurons) continue;
    out.n0[j] = static_cast<int>(n0);
    out.cols[j] = static_cast<int>(min(static_cast<int64_t>(Engine::kPieceN), d.neurons - n0));
    any = true;
  }
  return any;
}

// acc = A @ B^T over k (the frozen weight's product) plus A2 @ B2^T over k2 (the LoRA factors'
// product; k2 = 0 without them), in one chunk loop so both land in one accumulator. B piece j of
// both products gives the same output columns.
template <typename Engine, typename T>
__device__ __forceinline__ void product_with_lora(typename Engine::Acc& acc, const typename Engine::Chunk& frozen,
                                                  int64_t k, const typename Engine::Chunk& lora, int64_t k2,
                                                  unsigned char* shared) {
  const int main_chunks = static_cast<int>((k + mma::kBK - 1) / mma::kBK);
  const int lora_chunks = static_cast<int>((k2 + mma::kBK - 1) / mma::kBK);
  Engine::zero(acc);
  Engine::accumulate(acc, main_chunks + lora_chunks, [&](int i) {
    typename Engine::Chunk c = i < main_chunks ? frozen : lora;
    c.k0 = static_cast<int64_t>(i < main_chunks ? i : i - main_chunks) * mma::kBK;
    return c;
  }, shared);
}

// fc1 over one thread block's pieces of active pairs. grid: (mask slots x block_n / kPieceN /
// kPieces rounded up, tokens / BM).
template <typename T, typename Engine>
__global__ void __launch_bounds__(Engine::kThreads, Engine::kMinBlocks) fc1_kernel(const __grid_constant__ ForwardParams<T> p) {
  constexpr int PN = Engine::kPieceN;
  extern __shared__ __align__(128) unsigned char shared[];
  const Dims& d = p.dims;
  PairPieces<Engine::kPieces> pairs;
  if (!active_pair_pieces<Engine>(d, p.counts, p.indices, pairs)) return;
  const int64_t m0 = pairs.m0, rows = pairs.rows;
  const int origin = static_cast<int>(m0);
  typename Engine::Chunk frozen{{p.x + m0 * d.model, d.model, rows, d.model, &p.maps.x, origin}, {}, 0};
  typename Engine::Chunk lora{{p.lora1_u + m0 * d.r1, d.r1, rows, d.r1, &p.maps.lora1_u, origin}, {}, 0};
#pragma unroll
  for (int j = 0; j < Engine::kPieces; ++j) {
    // A padding piece keeps a valid base (the weight's) with no rows.
    frozen.b[j] = {p.w1 + static_cast<int64_t>(pairs.n0[j]) * d.model, d.model, pairs.cols[j], d.model, &p.maps.w1,
                   pairs.n0[j]};
    lora.b[j] = {p.lora1_b + static_cast<int64_t>(pairs.n0[j]) * d.r1, d.r1, pairs.cols[j], d.r1, &p.maps.lora1_b,
                 pairs.n0[j]};
  }
  const float* s_bias = stage_bias<Engine, T>(shared, p.b1, [&](int col) -> int64_t {
    const int j = col / PN, c = col % PN;
    return c < pick(pairs.cols, j) ? pick(pairs.n0, j) + c : -1;
  });
  typename Engine::Acc acc;
  product_with_lora<Engine, T>(acc, frozen, d.model, lora, p.lora1_u ? d.r1 : 0, shared);
  Engine::for_each_pair(acc, [&](int row, int col, float v0, float v1, int) {
    const int j = col / PN, c = col % PN;
    const int cols = pick(pairs.cols, j);
    const int64_t n0 = pick(pairs.n0, j);
    if (c >= cols) return;
    store_pair(p.h + m0 * d.neurons + n0, d.neurons, rows, cols, row, c, fmaxf(v0 + s_bias[col], 0.0f),
               fmaxf(v1 + s_bias[col + 1], 0.0f));
  });
}

// A K loop over the active blocks of one mask tile, in chunks of kBK neurons: the same operands
// throughout, the K offset jumping from block to block.
template <typename Chunk>
struct GatheredK {
  const int32_t* list;
  int64_t block_n;
  int chunks_per_block;
  Chunk chunk;
  __device__ Chunk operator()(int i) const {
    Chunk c = chunk;
    c.k0 = static_cast<int64_t>(list[i / chunks_per_block]) * block_n +
           static_cast<int64_t>(i % chunks_per_block) * mma::kBK;
    return c;
  }
};

// The B pieces of BN output columns from n0 of a weight whose row n starts at weight + n *
// n_stride (n0 + j kPieceN onwards for piece j), cols of them inside it: pieces past the end are
// empty. `map` is the weight's tensor map (for TMA engines).
template <typename Engine, typename T>
__device__ __forceinline__ void column_pieces(typename Engine::Chunk& chunk, const T* weight, const CUtensorMap* map,
                                              int64_t n_stride, int64_t ld, int64_t n0, int64_t cols,
                                              int64_t k_size) {
#pragma unroll
  for (int j = 0; j < Engine::kPieces; ++j) {
    const int64_t start = static_cast<int64_t>(j) * Engine::kPieceN, piece_cols = cols - start;
    chunk.b[j] = piece_cols > 0 ? mma::Operand<T>{weight + (n0 + start) * n_stride, ld, piece_cols, k_size, map,
                                                  static_cast<int>(n0 + start)}
                                : mma::Operand<T>{weight, ld, 0, k_size, map, 0};
  }
}

// fc2 and its LoRA columns over one (BM tokens, BN outputs) tile. grid.x counts the Y column
// tiles first, then the lora2_v ones.
template <typename T, typename Engine>
__global__ void __launch_bounds__(Engine::kThreads, Engine::kMinBlocks) fc2_kernel(const __grid_constant__ ForwardParams<T> p) {
  constexpr int BN = Engine::BN;
  extern __shared__ __align__(128) unsigned char shared[];
  const Dims& d = p.dims;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * Engine::BM, rows = d.tokens - m0;
  const int64_t y_tiles = (d.model + BN - 1) / BN;
  const bool is_y = blockIdx.x < y_tiles;
  const int64_t n0 = (is_y ? blockIdx.x : blockIdx.x - y_tiles) * BN;
  const int64_t cols = (is_y ? d.model : d.r2) - n0;
  typename Engine::Chunk chunk{{p.h + m0 * d.neurons, d.neurons, rows, d.neurons, &p.maps.h, static_cast<int>(m0)},
                              {}, 0};
  column_pieces<Engine, T>(chunk, is_y ? p.w2 : p.lora2_a, is_y ? &p.maps.w2 : &p.maps.lora2_a, d.neurons, d.neurons,
                           n0, cols, d.neurons);
  const int64_t tile = m0 / d.tile_m;
  const int cpb = static_cast<int>(d.block_n / mma::kBK);
  const int n_chunks = p.counts[tile] * cpb;
  const float* s_bias = stage_bias<Engine, T>(shared, is_y ? p.b2 : nullptr, [&](int col) -> int64_t {
    return col < cols ? n0 + col : -1;
  });
  typename Engine::Acc acc;
  Engine::zero(acc);
  Engine::accumulate(acc, n_chunks,
                     GatheredK<typename Engine::Chunk>{p.indices + tile * d.capacity, d.block_n, cpb, chunk}, shared);
  T* out = is_y ? p.y + m0 * d.model + n0 : p.lora2_v + m0 * d.r2 + n0;
  const int64_t ld = is_y ? d.model : d.r2;
  Engine::for_each_pair(acc, [&](int row, int col, float v0, float v1, int) {
    if (col >= cols) return;
    store_pair(out, ld, rows, cols, row, col, v0 + s_bias[col], v1 + s_bias[col + 1]);
  });
}

// dH over one thread block's pieces of active pairs, and their share of db1.
template <typename T, typename Engine>
__global__ void __launch_bounds__(Engine::kThreads, Engine::kMinBlocks) dh_kernel(const __grid_constant__ BackwardParams<T> p) {
  constexpr int PN = Engine::kPieceN;
  extern __shared__ __align__(128) unsigned char shared[];
  const Dims& d = p.dims;
  PairPieces<Engine::kPieces> pairs;
  if (!active_pair_pieces<Engine>(d, p.counts, p.indices, pairs)) return;
  const int64_t m0 = pairs.m0, rows = pairs.rows;
  // W2 is [model, neurons]: read as B[n = neuron, k = model] it is MN-major, as is A2 [r2, neurons].
  const int origin = static_cast<int>(m0);
  typename Engine::Chunk frozen{{p.dy + m0 * d.model, d.model, rows, d.model, &p.maps.dy, origin}, {}, 0};
  typename Engine::Chunk lora{{p.dlora2_v + m0 * d.r2, d.r2, rows, d.r2, &p.maps.dlora2_v, origin}, {}, 0};
#pragma unroll
  for (int j = 0; j < Engine::kPieces; ++j) {
    frozen.b[j] = {p.w2 + pairs.n0[j], d.neurons, pairs.cols[j], d.model, &p.maps.w2, pairs.n0[j]};
    lora.b[j] = {p.lora2_a + pairs.n0[j], d.neurons, pairs.cols[j], d.r2, &p.maps.lora2_a, pairs.n0[j]};
  }
  typename Engine::Acc acc;
  product_with_lora<Engine, T>(acc, frozen, d.model, lora, p.dlora2_v ? d.r2 : 0, shared);
  using P = mma::Pair<T>;
  // Column sums of the stored (rounded) dH, as the reference sums it, per column pair held.
  float sums[Engine::kSlots][2] = {};
  Engine::for_each_pair(acc, [&](int row, int col, float v0, float v1, int slot) {
    const int j = col / PN, c = col % PN;
    if (row >= rows || c >= pick(pairs.cols, j)) return;
    const int64_t n = m0 * d.neurons + pick(pairs.n0, j) + c;
    const float2 hv = P::to_float2(*reinterpret_cast<const typename P::type*>(p.h + n + row * d.neurons));
    const typename P::type g = P::make(hv.x > 0.0f ? v0 : 0.0f, hv.y > 0.0f ? v1 : 0.0f);
    *reinterpret_cast<typename P::type*>(p.dh + n + row * d.neurons) = g;
    const float2 gf = P::to_float2(g);
    sums[slot][0] += gf.x;
    sums[slot][1] += gf.y;
  });
  if (!p.db1_sum) return;
  // Lanes with the same lane % 4 hold the same columns: fold the 8 row groups, then one atomic
  // per column.
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int slot = 0; slot < Engine::kSlots; ++slot) {
    float s0 = sums[slot][0], s1 = sums[slot][1];
    for (int offset = 4; offset < 32; offset *= 2) {
      s0 += __shfl_xor_sync(0xffffffffu, s0, offset);
      s1 += __shfl_xor_sync(0xffffffffu, s1, offset);
    }
    const int col = Engine::slot_column(slot), j = col / PN, c = col % PN;
    if (lane < 4 && c < pick(pairs.cols, j)) {
      const int64_t n = pick(pairs.n0, j) + c;
      atomicAdd(p.db1_sum + n, s0);
      atomicAdd(p.db1_sum + n + 1, s1);
    }
  }
}

// dX and dU1 over one (BM tokens, BN outputs) tile: grid.x counts the dX tiles, then dU1's.
template <typename T, typename Engine>
__global__ void __launch_bounds__(Engine::kThreads, Engine::kMinBlocks) dx_kernel(const __grid_constant__ BackwardParams<T> p) {
  constexpr int BN = Engine::BN;
  extern __shared__ __align__(128) unsigned char shared[];
  const Dims& d = p.dims;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * Engine::BM, rows = d.tokens - m0;
  const int64_t x_tiles = (d.model + BN - 1) / BN;
  const bool is_x = blockIdx.x < x_tiles;
  const int64_t n0 = (is_x ? blockIdx.x : blockIdx.x - x_tiles) * BN;
  const int64_t width = is_x ? d.model : d.r1, cols = width - n0;
  // W1 [neurons, model] read as B[n = model, k = neuron] is MN-major; so is B1 [neurons, r1].
  typename Engine::Chunk chunk{{p.dh + m0 * d.neurons, d.neurons, rows, d.neurons, &p.maps.dh, static_cast<int>(m0)},
                              {}, 0};
  column_pieces<Engine, T>(chunk, is_x ? p.w1 : p.lora1_b, is_x ? &p.maps.w1 : &p.maps.lora1_b, 1, width, n0, cols,
                           d.neurons);
  const int64_t tile = m0 / d.tile_m;
  const int cpb = static_cast<int>(d.block_n / mma::kBK);
  const int n_chunks = p.counts[tile] * cpb;
  typename Engine::Acc acc;
  Engine::zero(acc);
  Engine::accumulate(acc, n_chunks,
                     GatheredK<typename Engine::Chunk>{p.indices + tile * d.capacity, d.block_n, cpb, chunk}, shared);
  T* out = (is_x ? p.dx : p.dlora1_u) + m0 * width + n0;
  Engine::for_each_pair(acc, [&](int row, int col, float v0, float v1, int) {
    store_pair(out, width, rows, cols, row, col, v0, v1);
  });
}

// out[m * out_m + n * out_n] = sum over tokens t of a[t, m] * b[t, n], a [tokens, M], b [tokens, N]:
// the LoRA factor gradients dB1 (a = dH, b = U1) and dA2 (a = H, b = dV2, stored transposed).
template <typename T>
__global__ void __launch_bounds__(128) token_sum_kernel(const T* a, const T* b, int64_t tokens, int64_t m_size,
                                                         int64_t n_size, T* out, int64_t out_m, int64_t out_n) {
  using Cfg = LoraGradConfig;
  extern __shared__ __align__(128) unsigned char shared_raw[];
  T* shared = reinterpret_cast<T*>(shared_raw);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * Cfg::BM, n0 = static_cast<int64_t>(blockIdx.y) * Cfg::BN;
  const mma::Operand<T> a_op{a + m0, m_size, m_size - m0, tokens};
  const mma::Operand<T> b_op{b + n0, n_size, n_size - n0, tokens};
  const int n_chunks = static_cast<int>((tokens + mma::kBK - 1) / mma::kBK);
  float acc[Cfg::MI][Cfg::NI][4];
  mma::zero<Cfg>(acc);
  mma::accumulate<Cfg, T>(acc, n_chunks, [&](int i) {
    return mma::Chunk<T>{a_op, b_op, static_cast<int64_t>(i) * mma::kBK};
  }, shared);
  mma::for_each_pair<Cfg>(acc, [&](int row, int col, float v0, float v1, int) {
    const int64_t m = m0 + row, n = n0 + col;
    if (m >= m_size || n >= n_size) return;
    out[m * out_m + n * out_n] = static_cast<T>(v0);
    out[m * out_m + (n + 1) * out_n] = static_cast<T>(v1);
  });
}

// sums[c] += column sums of a [rows, cols] over a slab of rows; grid (cols / 256 rounded up, slabs).
template <typename T>
__global__ void column_sum_kernel(const T* a, int64_t rows, int64_t cols, int64_t slab, float* sums) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * slab, r1 = min(rows, r0 + slab);
  float s = 0.0f;
  for (int64_t r = r0; r < r1; ++r) s += static_cast<float>(a[r * cols + c]);
  atomicAdd(sums + c, s);
}

template <typename T>
__global__ void round_kernel(const float* in, T* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = static_cast<T>(in[i]);
}

// Per element type: mma.sync kernels (any chip), and wgmma ones (sm_90a builds, Hopper devices).
template <typename T>
void forward(const MlpForwardArgs& args);
template <typename T>
void backward(const MlpBackwardArgs& args);
template <typename T>
void forward_sm90(const MlpForwardArgs& args);
template <typename T>
void backward_sm90(const MlpBackwardArgs& args);

}  // namespace neuron_block
}  // namespace long_exposure
