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
  int tile_group;  // grouped_pair_position's; 0: the engine's choice (tile_group())
  bool grid_order;  // the persistent engine's fc2 and dX walk the grid's order, not heavy rows first
};

// The operands' tensor maps, encoded by the launcher for engines that load by TMA only; named
// as the pointers are, a map per use where the box differs.
struct ForwardMaps {
  CUtensorMap x, w1, lora1_u, lora1_b, h, w2, lora2_a, y;
};
struct BackwardMaps {
  CUtensorMap dy, dlora2_v, w2, lora2_a, dh, w1, lora1_b, dx;
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

// The epilogues visit the accumulator in runs of consecutive columns of one row: pairs on the
// engines that give no wider runs, Engine::kRun columns on those that do.
template <typename Engine, typename = void>
struct Runs {
  static constexpr int kWidth = 2, kSlots = Engine::kSlots;
  template <typename F>
  __device__ static __forceinline__ void each(const typename Engine::Acc& acc, F f) {
    Engine::for_each_pair(acc, [&](int row, int col, float v0, float v1, int slot) {
      const float v[2] = {v0, v1};
      f(row, col, v, slot);
    });
  }
  __device__ static __forceinline__ int column(int slot) { return Engine::slot_column(slot); }
};
template <typename Engine>
struct Runs<Engine, std::void_t<decltype(Engine::kRun)>> {
  static constexpr int kWidth = Engine::kRun, kSlots = Engine::kRunSlots, kCount = Engine::kRuns;
  template <typename F>
  __device__ static __forceinline__ void each(const typename Engine::Acc& acc, F f) {
    Engine::for_each_run(acc, f);
  }
  template <typename F>
  __device__ static __forceinline__ void positions(F f) {
    Engine::for_each_run_position(f);
  }
  __device__ static __forceinline__ int column(int slot) { return Engine::run_column(slot); }
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T>
__device__ __forceinline__ uint32_t pair_bits(float a, float b) {
  const typename mma::Pair<T>::type pair = mma::Pair<T>::make(a, b);
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

// dst[k] = v[k] for the k < n (n even where below W): whole runs of 8 in 16-byte stores.
template <typename T, int W>
__device__ __forceinline__ void store_run(T* dst, int n, const float (&v)[W]) {
  if constexpr (W % 8 == 0) {
    if (n >= W && aligned16(dst)) {
#pragma unroll
      for (int k = 0; k < W; k += 8)
        *reinterpret_cast<uint4*>(dst + k) = make_uint4(pair_bits<T>(v[k], v[k + 1]), pair_bits<T>(v[k + 2], v[k + 3]),
                                                        pair_bits<T>(v[k + 4], v[k + 5]), pair_bits<T>(v[k + 6], v[k + 7]));
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < W; k += 2)
    if (k < n) *reinterpret_cast<typename mma::Pair<T>::type*>(dst + k) = mma::Pair<T>::make(v[k], v[k + 1]);
}

// An epilogue's sink for the run of outputs at (row, col) of the tile, dst in global memory, n of
// its columns inside the output: stored at once. (The persistent engine's sink may stage it.)
struct StoreNow {
  template <typename T, int W>
  __device__ __forceinline__ void operator()(int, int, T* dst, int n, const float (&v)[W]) const {
    store_run<T>(dst, n, v);
  }
};

// Bit k set where the k-th of the 8 values in `word` is positive.
template <typename T>
__device__ __forceinline__ uint32_t positive_bits(const uint4& word) {
  using P = mma::Pair<T>;
  uint32_t bits = 0;
  const uint32_t pairs[4] = {word.x, word.y, word.z, word.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    typename P::type pair;
    memcpy(&pair, &pairs[k], sizeof(pair));
    const float2 f = P::to_float2(pair);
    bits |= (f.x > 0.0f ? 1u << (2 * k) : 0u) | (f.y > 0.0f ? 2u << (2 * k) : 0u);
  }
  return bits;
}

// Bit k set where src[k] > 0, for the k < n (n even, at most 8).
template <typename T>
__device__ __forceinline__ uint32_t positive_bits(const T* src, int n) {
  if (n >= 8 && aligned16(src)) return positive_bits<T>(*reinterpret_cast<const uint4*>(src));
  auto pair = [&](int k) { return k < n ? *reinterpret_cast<const uint32_t*>(src + k) : 0u; };
  return positive_bits<T>(make_uint4(pair(0), pair(2), pair(4), pair(6)));
}

// A value as it is stored.
template <typename T>
__device__ __forceinline__ float rounded(float x) {
  return static_cast<float>(static_cast<T>(x));
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

// What a persistent engine keeps in EpilogueShared (none on the others): the mask's counts for up
// to `counts` tiles and `ahead_buffers` buffers for Work::read_ahead.
struct Kept {
  int counts, ahead_buffers;
};
template <typename Engine>
constexpr Kept kept() {
  if constexpr (Engine::kPersistent)
    return {Engine::kCountsKept, Engine::kAheadBuffers};
  else
    return {0, 0};
}

// fc1's and fc2's biases are read before the products: in the epilogue each read was a global
// load the next instruction waited on, one column pair at a time, and those waits were a quarter
// of fc1's stall samples (bench/RESULTS.md). Read first, their latency hides behind the first TMA
// stages instead. They go to shared memory, past the engine's ring (the launcher reserves
// EpilogueShared::kBytes for it): kept in registers they cost fc1 30 of them and spilled in the
// 64-token configurations. (dH's ReLU mask, read from H by the consumers the same way, into bits,
// did not move the backward; on the persistent engine other warps read it, see kAheadBytes.)
template <typename Engine>
struct EpilogueShared {
  static constexpr int kOffset = Engine::shared_bytes();  // past the ring
  // A persistent engine's consumers stage the next tile's bias while slower ones may still read
  // this tile's: two buffers, used in turn.
  static constexpr int kBuffers = Engine::kPersistent ? 2 : 1;
  // A persistent engine also keeps the mask's counts (up to kCounts tiles) where each tile's test
  // for work is a shared-memory read, not a global load that thread waits on before the next, and
  // for fc1 and dH the first active tile of each token row (up to kCounts - 1 rows).
  static constexpr int kCounts = kept<Engine>().counts;
  // And for a Work that reads ahead (dH): kAheadBuffers buffers of a byte per 8 output columns,
  // filled by the producer's idle warps before the epilogue that reads them, each with a full and
  // an empty barrier.
  static constexpr int kAheadBuffers = kept<Engine>().ahead_buffers;
  static constexpr int kAheadBytes = Engine::BM * Engine::BN / 8;
  static constexpr int kBarriersOffset = kOffset + (kBuffers * Engine::BN + 2 * kCounts) * 4;
  static constexpr int kAheadOffset = kBarriersOffset + 2 * kAheadBuffers * 8;
  static_assert(kBarriersOffset % 8 == 0 && kAheadOffset % 16 == 0, "barrier and 16-byte alignment");
  static constexpr int kBytes = kAheadOffset + kAheadBuffers * kAheadBytes - kOffset;
  __device__ static __forceinline__ float* buffer(unsigned char* shared, int i) {
    return reinterpret_cast<float*>(shared + kOffset) + (i % kBuffers) * Engine::BN;
  }
  __device__ static __forceinline__ int32_t* counts(unsigned char* shared) {
    return reinterpret_cast<int32_t*>(shared + kOffset) + kBuffers * Engine::BN;
  }
  __device__ static __forceinline__ int32_t* row_starts(unsigned char* shared) { return counts(shared) + kCounts; }
  // Buffer i's full barrier; its empty one is kAheadBuffers further.
  __device__ static __forceinline__ uint64_t* ahead_barrier(unsigned char* shared, int i) {
    return reinterpret_cast<uint64_t*>(shared + kBarriersOffset) + i;
  }
  __device__ static __forceinline__ unsigned char* ahead(unsigned char* shared, int i) {
    return shared + kAheadOffset + (i % (kAheadBuffers > 0 ? kAheadBuffers : 1)) * kAheadBytes;
  }
};

// s_bias[col] for each of the tile's BN output columns: the work's bias at bias_column(tile, col),
// zero where that is negative (past the tensor) or the work has no bias; `threads` threads from
// `thread` share the columns, and the caller puts the barrier after.
template <typename Engine, typename Work>
__device__ __forceinline__ void stage_bias(float* s_bias, const Work& work, const typename Work::Tile& t, int thread,
                                           int threads) {
  const auto* bias = work.bias();
  for (int col = thread; col < Engine::BN; col += threads) {
    const int64_t base = bias ? work.bias_column(t, col) : -1;
    s_bias[col] = base >= 0 ? static_cast<float>(bias[base]) : 0.0f;
  }
}

using LoraGradConfig = mma::Config<64, 64, 2, 2, kStages, false, false>;

// The kernels take an Engine (mma::Engine or, on sm_90a, a wgmma engine): a BM x BN block tile
// whose B side is kPieces operands of kPieceN columns, its accumulator, the chunk loop and the
// accumulator visitor. Each of the four products is a Work: the grid of output tiles it spans
// (width x height, numbered linearly), and per tile its operands chunk by chunk, its bias and its
// epilogue. An engine with kPersistent runs the whole grid itself (Engine::run); any other takes
// one tile per thread block (run_tile).
//
// A Work provides:
//   static width(params), height(params) the grid, in tiles (height counts BM-token rows of them);
//   tile(linear, Tile&) -> bool         the tile's operands; false: nothing to compute there;
//   chunks(tile), chunk(tile, i)        its K loop;
//   live(tile, j)                       whether B piece j has columns (the same for every chunk);
//   counts                              the mask's counts, which a persistent engine may point at
//                                       a copy in shared memory;
//   kPairs, pairs_in(y), pair_starts,   for fc1 and dH: the active tiles of token row y, where a
//   group                               persistent engine may have each row's first one numbered,
//                                       and otherwise the token-tile group of their order.
//   bias(), bias_column(tile, col)      kBiased works only;
//   kReadsAhead, read_ahead(tile, buf,  what a persistent engine's idle producer warps bring into
//     thread, threads)                  shared memory ahead of the epilogue (dH: H's signs);
//   staged(tile), store_boxes(tile, f)  whether a persistent engine may store the tile's outputs
//                                       through shared memory, and the TMA boxes it stores;
//   epilogue(tile, acc, s_bias, ahead,  its outputs, each run handed to sink(row, col, dst, n, v)
//            sink)                      (ahead: read_ahead's buffer, or null).

template <typename Engine>
__host__ __device__ __forceinline__ unsigned token_tiles(const Dims& d) {
  return static_cast<unsigned>((d.tokens + Engine::BM - 1) / Engine::BM);
}
// Each mask slot splits into block_n / kPieceN units, and a tile takes kPieces of them.
template <typename Engine>
__host__ __device__ __forceinline__ unsigned pair_width(const Dims& d) {
  return static_cast<unsigned>((d.capacity * (d.block_n / Engine::kPieceN) + Engine::kPieces - 1) / Engine::kPieces);
}
// BN-column tiles of two outputs side by side: `first` columns, then `second` ones.
template <typename Engine>
__host__ __device__ __forceinline__ unsigned column_width(int64_t first, int64_t second) {
  return static_cast<unsigned>((first + Engine::BN - 1) / Engine::BN + (second + Engine::BN - 1) / Engine::BN);
}

// The output of an fc1 or dH tile: BM tokens from m0 (rows of them inside the tensor), and per B
// piece j, kPieceN neurons from n0[j], cols[j] of them inside the tensor; cols[j] = 0 marks a
// padding piece, whose slot is past the tile's count or whose neurons are past d_ffn. Neuron
// indices are 32-bit (the entry points require d_ffn < 2^31): the epilogues keep these live
// beside the accumulator, where every register counts.
template <int PIECES>
struct PairPieces {
  int64_t m0, rows;
  int n0[PIECES], cols[PIECES];
};

// Each active block of a tile splits into block_n / kPieceN units of kPieceN neurons, numbered
// slot by slot; output tile x takes units kPieces x onwards. Grids span slots, not blocks, so
// inactive pairs cost a tile that is skipped at once, and H and dH are written on active pairs
// only. With 128-neuron blocks and two pieces, tile x takes slots 2 x and 2 x + 1 of its tokens.
//
// The order groups token tiles: a group's tiles take slot group x side by side before any takes
// x + 1 (`group` 1: each tile's slots side by side). With each tile's slots side by side, the tiles
// in flight spanned a few token tiles and every block of W1, which then streamed from DRAM once
// per wave (bench/RESULTS.md, session 19: fc1 read 572 MB where cuBLAS read 142).
struct PairPosition {
  unsigned x, y;
};
__host__ __device__ __forceinline__ PairPosition grouped_pair_position(unsigned linear, unsigned width,
                                                                       unsigned height, unsigned group) {
  const unsigned g = linear / (group * width), in_group = linear - g * group * width;
  const unsigned left = height - g * group, rows = group < left ? group : left;  // the last group may be short
  return {in_group / rows, g * group + in_group % rows};
}

// The pairs (tiles) of token row y: its mask tile's count of blocks, in units, kPieces a tile.
template <typename Engine>
__device__ __forceinline__ int pairs_in_row(const Dims& d, const int32_t* counts, unsigned y) {
  const int64_t units = counts[static_cast<int64_t>(y) * Engine::BM / d.tile_m] * (d.block_n / Engine::kPieceN);
  return static_cast<int>((units + Engine::kPieces - 1) / Engine::kPieces);
}

// Where tile `linear` lies: in the grouped order over the whole grid, or, given starts[y] (the
// number of pairs in rows before y, for every row), in the order of the active pairs alone, row by
// row: then every linear index below starts[height] is an active tile.
template <typename Engine>
__device__ __forceinline__ PairPosition pair_position(const Dims& d, unsigned linear, const int32_t* starts,
                                                      unsigned group) {
  const unsigned height = token_tiles<Engine>(d);
  if (!starts) return grouped_pair_position(linear, pair_width<Engine>(d), height, group);
  unsigned lo = 0, hi = height - 1;  // the last row whose start is at most linear
  while (lo < hi) {
    const unsigned mid = (lo + hi + 1) / 2;
    if (static_cast<unsigned>(starts[mid]) <= linear)
      lo = mid;
    else
      hi = mid - 1;
  }
  return {linear - static_cast<unsigned>(starts[lo]), lo};
}

template <typename Engine>
__device__ __forceinline__ bool active_pair_pieces(const Dims& d, PairPosition at, const int32_t* counts,
                                                   const int32_t* indices, PairPieces<Engine::kPieces>& out) {
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

// Chunk i of A @ B^T over k (the frozen weight's product, `main` chunks) followed by A2 @ B2^T
// over k2 (the LoRA factors'), so that both land in one accumulator; B piece j of both products
// gives the same output columns.
template <typename Chunk>
__device__ __forceinline__ Chunk frozen_then_lora(const Chunk& frozen, const Chunk& lora, int main, int i) {
  Chunk c = i < main ? frozen : lora;
  c.k0 = static_cast<int64_t>(i < main ? i : i - main) * mma::kBK;
  return c;
}
__host__ __device__ __forceinline__ int chunks_of(int64_t k) { return static_cast<int>((k + mma::kBK - 1) / mma::kBK); }

// What fc1 and dH share: tiles of active (token tile, block pair) positions, each with its
// frozen weight's product followed by the LoRA factors'.
template <typename Engine, typename ParamsT>
struct PairWork {
  using Chunk = typename Engine::Chunk;
  using Params = ParamsT;
  struct Tile {
    PairPieces<Engine::kPieces> pairs;
    Chunk frozen, lora;
    int main, extra;
  };
  static constexpr bool kPairs = true, kReadsAhead = false;
  const Params& p;
  const int32_t* counts = p.counts;  // the mask's, or a copy of them in shared memory
  const int32_t* pair_starts = nullptr;  // pair_position's
  unsigned group = p.dims.tile_group > 0 ? static_cast<unsigned>(p.dims.tile_group) : 1u;  // without pair_starts

  __host__ __device__ static unsigned width(const Params& q) { return pair_width<Engine>(q.dims); }
  __host__ __device__ static unsigned height(const Params& q) { return token_tiles<Engine>(q.dims); }
  __device__ int pairs_in(unsigned y) const { return pairs_in_row<Engine>(p.dims, counts, y); }
  // The tile's pairs; false where it has none.
  __device__ bool pieces(unsigned linear, Tile& t) const {
    const Dims& d = p.dims;
    return active_pair_pieces<Engine>(d, pair_position<Engine>(d, linear, pair_starts, group), counts, p.indices, t.pairs);
  }
  __device__ int chunks(const Tile& t) const { return t.main + t.extra; }
  __device__ bool live(const Tile& t, int j) const { return pick(t.pairs.cols, j) > 0; }
  __device__ Chunk chunk(const Tile& t, int i) const { return frozen_then_lora(t.frozen, t.lora, t.main, i); }
  // f(box, column, row) for each 64-column box of the tile's outputs in a [tokens, neurons] matrix
  // (box b: the tile's columns 64 b..), both halves of each piece with columns.
  template <typename F>
  __device__ void pair_boxes(const Tile& t, F f) const {
    constexpr int kHalves = Engine::kPieceN / 64;
#pragma unroll
    for (int j = 0; j < Engine::kPieces; ++j)
#pragma unroll
      for (int h = 0; h < kHalves; ++h)
        if (t.pairs.cols[j] > 64 * h) f(j * kHalves + h, t.pairs.n0[j] + 64 * h, static_cast<int>(t.pairs.m0));
  }
};

// fc1 over active pairs: relu(X @ W1^T (+ U1 @ B1^T) + b1) into H.
template <typename T, typename Engine>
struct Fc1 : PairWork<Engine, ForwardParams<T>> {
  using Base = PairWork<Engine, ForwardParams<T>>;
  using typename Base::Chunk;
  using typename Base::Tile;
  using Base::p;
  static constexpr bool kBiased = true;

  __device__ bool tile(unsigned linear, Tile& t) const {
    if (!Base::pieces(linear, t)) return false;
    const Dims& d = p.dims;
    const int64_t m0 = t.pairs.m0, rows = t.pairs.rows;
    const int origin = static_cast<int>(m0);
    t.frozen = Chunk{{p.x + m0 * d.model, d.model, rows, d.model, &p.maps.x, origin}, {}, 0};
    t.lora = Chunk{{p.lora1_u + m0 * d.r1, d.r1, rows, d.r1, &p.maps.lora1_u, origin}, {}, 0};
#pragma unroll
    for (int j = 0; j < Engine::kPieces; ++j) {
      // A padding piece keeps a valid base (the weight's) with no rows.
      const int n0 = t.pairs.n0[j], cols = t.pairs.cols[j];
      t.frozen.b[j] = {p.w1 + static_cast<int64_t>(n0) * d.model, d.model, cols, d.model, &p.maps.w1, n0};
      t.lora.b[j] = {p.lora1_b + static_cast<int64_t>(n0) * d.r1, d.r1, cols, d.r1, &p.maps.lora1_b, n0};
    }
    t.main = chunks_of(d.model);
    t.extra = p.lora1_u ? chunks_of(d.r1) : 0;
    return true;
  }
  __device__ const T* bias() const { return p.b1; }
  // A persistent engine may store the tile through shared memory, box by box (store_boxes).
  __device__ bool staged(const Tile&) const { return true; }
  template <typename F>
  __device__ void store_boxes(const Tile& t, F f) const {
    Base::pair_boxes(t, [&](int b, int c0, int c1) { f(&p.maps.h, b, c0, c1); });
  }
  __device__ int64_t bias_column(const Tile& t, int col) const {
    const int j = col / Engine::kPieceN, c = col % Engine::kPieceN;
    return c < pick(t.pairs.cols, j) ? pick(t.pairs.n0, j) + c : -1;
  }
  template <typename Sink>
  __device__ void epilogue(const Tile& t, const typename Engine::Acc& acc, const float* s_bias, const unsigned char*,
                           Sink& sink) const {
    using R = Runs<Engine>;
    constexpr int W = R::kWidth, PN = Engine::kPieceN;
    const Dims& d = p.dims;
    const int64_t m0 = t.pairs.m0, rows = t.pairs.rows;
    R::each(acc, [&](int row, int col, const float (&v)[W], int) {
      const int j = col / PN, c = col % PN;
      const int cols = pick(t.pairs.cols, j);
      if (row >= rows || c >= cols) return;
      float out[W];
#pragma unroll
      for (int k = 0; k < W; ++k) out[k] = fmaxf(v[k] + s_bias[col + k], 0.0f);
      sink(row, col, p.h + (m0 + row) * d.neurons + pick(t.pairs.n0, j) + c, cols - c, out);
    });
  }
};

// A K loop over the active blocks of one mask tile, in chunks of kBK neurons: the same operands
// throughout, the K offset jumping from block to block.
template <typename Chunk>
__device__ __forceinline__ Chunk gathered_chunk(const Chunk& chunk, const int32_t* list, int64_t block_n,
                                                int chunks_per_block, int i) {
  Chunk c = chunk;
  c.k0 = static_cast<int64_t>(list[i / chunks_per_block]) * block_n +
         static_cast<int64_t>(i % chunks_per_block) * mma::kBK;
  return c;
}

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

// A (BM tokens, BN outputs) tile of a product summed over a mask tile's active blocks (fc2, dX):
// its operands, its active-block list, and where its outputs go. `first` is true on the tiles of
// the frozen weight's output (Y, dX), false on the LoRA factor's (V2, dU1).
template <typename Chunk, int PIECES>
struct GatheredTile {
  Chunk chunk;
  const int32_t* list;
  int64_t m0, rows, n0, cols;
  int n_chunks;
  bool first;
  bool live[PIECES];  // B pieces with columns inside the output
};

// Tile `linear` of a grid whose x counts `first` columns' tiles, then `second` ones'.
struct ColumnPosition {
  int64_t m0, n0;
  bool first;
};
template <typename Engine>
__device__ __forceinline__ ColumnPosition column_position(unsigned linear, unsigned width, int64_t first) {
  const unsigned x = linear % width, y = linear / width;
  const int64_t first_tiles = (first + Engine::BN - 1) / Engine::BN;
  const bool is_first = x < first_tiles;
  return {static_cast<int64_t>(y) * Engine::BM, (is_first ? x : x - first_tiles) * Engine::BN, is_first};
}

// What fc2 and dX share: (BM tokens, BN outputs) tiles of the frozen weight's output, then of the
// LoRA factor's, each summed over its mask tile's active blocks.
template <typename Engine, typename ParamsT>
struct GatheredWork {
  using Chunk = typename Engine::Chunk;
  using Params = ParamsT;
  using Tile = GatheredTile<Chunk, Engine::kPieces>;
  static constexpr bool kPairs = false, kReadsAhead = false;
  const Params& p;
  const int32_t* counts = p.counts;  // the mask's, or a copy of them in shared memory

  __host__ __device__ static unsigned height(const Params& q) { return token_tiles<Engine>(q.dims); }
  // Tile `linear` of a grid `width` tiles wide over `first` columns of a [K, first] operand `a`
  // (its map `a_map`) times `first_weight` and then `second` columns of `second_weight`, each
  // weight's row n at n * n_stride, its K rows ld apart.
  template <typename T>
  __device__ void place(unsigned linear, unsigned width, Tile& t, const T* a, const CUtensorMap* a_map,
                        int64_t first, const T* first_weight, const CUtensorMap* first_map, int64_t second,
                        const T* second_weight, const CUtensorMap* second_map, int64_t n_stride,
                        bool ld_is_width) const {
    const Dims& d = p.dims;
    const ColumnPosition at = column_position<Engine>(linear, width, first);
    const int64_t full = at.first ? first : second;
    t.m0 = at.m0;
    t.rows = d.tokens - at.m0;
    t.n0 = at.n0;
    t.first = at.first;
    t.cols = full - at.n0;
    t.chunk = Chunk{{a + t.m0 * d.neurons, d.neurons, t.rows, d.neurons, a_map, static_cast<int>(t.m0)}, {}, 0};
    column_pieces<Engine, T>(t.chunk, at.first ? first_weight : second_weight, at.first ? first_map : second_map,
                             n_stride, ld_is_width ? full : d.neurons, t.n0, t.cols, d.neurons);
#pragma unroll
    for (int j = 0; j < Engine::kPieces; ++j) t.live[j] = t.chunk.b[j].rows > 0;
    const int64_t tile = t.m0 / d.tile_m;
    t.list = p.indices + tile * d.capacity;
    t.n_chunks = counts[tile] * static_cast<int>(d.block_n / mma::kBK);
  }
  // f(box, column, row) for each 64-column box of the tile's outputs that has columns.
  template <typename F>
  __device__ void column_boxes(const Tile& t, F f) const {
#pragma unroll
    for (int b = 0; b < Engine::BN / 64; ++b)
      if (t.cols > 64 * b) f(b, static_cast<int>(t.n0) + 64 * b, static_cast<int>(t.m0));
  }
  __device__ int chunks(const Tile& t) const { return t.n_chunks; }
  __device__ bool live(const Tile& t, int j) const { return t.live[j]; }
  __device__ Chunk chunk(const Tile& t, int i) const {
    return gathered_chunk(t.chunk, t.list, p.dims.block_n, static_cast<int>(p.dims.block_n / mma::kBK), i);
  }
};

// fc2 and its LoRA columns: [Y | V2] = H @ [W2 | A2]^T over the tile's active blocks, + b2 on Y.
template <typename T, typename Engine>
struct Fc2 : GatheredWork<Engine, ForwardParams<T>> {
  using Base = GatheredWork<Engine, ForwardParams<T>>;
  using typename Base::Params;
  using typename Base::Tile;
  using Base::p;
  static constexpr bool kBiased = true;

  __host__ __device__ static unsigned width(const Params& q) { return column_width<Engine>(q.dims.model, q.dims.r2); }
  __device__ bool tile(unsigned linear, Tile& t) const {
    const Dims& d = p.dims;
    // W2 [model, neurons] and A2 [r2, neurons] are K-major: output column n's row at n * neurons.
    Base::place(linear, width(p), t, p.h, &p.maps.h, d.model, p.w2, &p.maps.w2, d.r2, p.lora2_a, &p.maps.lora2_a,
                d.neurons, false);
    return true;
  }
  __device__ const T* bias() const { return p.b2; }
  // Y's tiles through shared memory; V2's (a few LoRA columns, rows of a TMA box's width at most)
  // from registers.
  __device__ bool staged(const Tile& t) const { return t.first; }
  template <typename F>
  __device__ void store_boxes(const Tile& t, F f) const {
    Base::column_boxes(t, [&](int b, int c0, int c1) { f(&p.maps.y, b, c0, c1); });
  }
  __device__ int64_t bias_column(const Tile& t, int col) const { return t.first && col < t.cols ? t.n0 + col : -1; }
  template <typename Sink>
  __device__ void epilogue(const Tile& t, const typename Engine::Acc& acc, const float* s_bias, const unsigned char*,
                           Sink& sink) const {
    const Dims& d = p.dims;
    T* out = t.first ? p.y + t.m0 * d.model + t.n0 : p.lora2_v + t.m0 * d.r2 + t.n0;
    const int64_t ld = t.first ? d.model : d.r2, rows = t.rows, cols = t.cols;
    using R = Runs<Engine>;
    constexpr int W = R::kWidth;
    R::each(acc, [&](int row, int col, const float (&v)[W], int) {
      if (row >= rows || col >= cols) return;
      float biased[W];
#pragma unroll
      for (int k = 0; k < W; ++k) biased[k] = v[k] + s_bias[col + k];
      sink(row, col, out + row * ld + col, static_cast<int>(cols - col), biased);
    });
  }
};

// dH over active pairs: (dY @ W2 (+ dV2 @ A2)) * (H > 0), and its share of db1.
template <typename T, typename Engine>
struct Dh : PairWork<Engine, BackwardParams<T>> {
  using Base = PairWork<Engine, BackwardParams<T>>;
  using typename Base::Chunk;
  using typename Base::Tile;
  using Base::p;
  static constexpr bool kBiased = false;

  __device__ bool tile(unsigned linear, Tile& t) const {
    if (!Base::pieces(linear, t)) return false;
    const Dims& d = p.dims;
    const int64_t m0 = t.pairs.m0, rows = t.pairs.rows;
    // W2 is [model, neurons]: read as B[n = neuron, k = model] it is MN-major, as is A2 [r2, neurons].
    const int origin = static_cast<int>(m0);
    t.frozen = Chunk{{p.dy + m0 * d.model, d.model, rows, d.model, &p.maps.dy, origin}, {}, 0};
    t.lora = Chunk{{p.dlora2_v + m0 * d.r2, d.r2, rows, d.r2, &p.maps.dlora2_v, origin}, {}, 0};
#pragma unroll
    for (int j = 0; j < Engine::kPieces; ++j) {
      const int n0 = t.pairs.n0[j], cols = t.pairs.cols[j];
      t.frozen.b[j] = {p.w2 + n0, d.neurons, cols, d.model, &p.maps.w2, n0};
      t.lora.b[j] = {p.lora2_a + n0, d.neurons, cols, d.r2, &p.maps.lora2_a, n0};
    }
    t.main = chunks_of(d.model);
    t.extra = p.dlora2_v ? chunks_of(d.r2) : 0;
    return true;
  }
  __device__ const T* bias() const { return nullptr; }
  __device__ int64_t bias_column(const Tile&, int) const { return -1; }
  // A persistent engine's idle producer warps read H's signs for each tile ahead of its epilogue
  // (read_ahead), a byte per run of 8 columns. Read by the consumers, after the products, each
  // tile's epilogue waited out memory round trips with no other thread block to fill the SM: at
  // OPT-1.3B, density 1, dH took 705 us pair by pair, 578 in runs with all of H's loads issued
  // before any store, and 349 with no epilogue at all (session 21). Read ahead, the backward at
  // density 1 went from 1.015 to 0.888 ms (H100, session 22).
  static constexpr bool kReadsAhead = true;
  __device__ bool staged(const Tile&) const { return true; }
  template <typename F>
  __device__ void store_boxes(const Tile& t, F f) const {
    Base::pair_boxes(t, [&](int b, int c0, int c1) { f(&p.maps.dh, b, c0, c1); });
  }
  // signs[row * BN / 8 + col / 8] for each run of 8 columns of the tile; `threads` threads from
  // `thread` share them, a multiple of BN / 8: each thread keeps one column run, a warp one row.
  // The producer warps' registers (Engine::kAheadRegisters) hold little more than one address
  // and kInFlight loads per thread.
  __device__ void read_ahead(const Tile& t, unsigned char* signs, int thread, int threads) const {
    constexpr int PN = Engine::kPieceN, kRow = Engine::BN / 8, kInFlight = 4;
    const Dims& d = p.dims;
    const int col = (thread % kRow) * 8, j = col / PN, c = col % PN, step = threads / kRow;
    const int n = max(pick(t.pairs.cols, j) - c, 0), rows = t.pairs.rows < Engine::BM ? static_cast<int>(t.pairs.rows) : Engine::BM;
    const T* base = p.h + t.pairs.m0 * d.neurons + pick(t.pairs.n0, j) + c;
    const bool whole = n >= 8 && aligned16(base) && d.neurons % 8 == 0;
    // kInFlight loads issued before any is used: one at a time, 96 threads kept about 1.5 KB in
    // flight, too little to bring a 64 KB tile of H within a tile's products.
    for (int first = thread / kRow; first < Engine::BM; first += kInFlight * step) {
      uint4 words[kInFlight];
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) {
        const int row = first + k * step;
        words[k] = whole && row < rows ? *reinterpret_cast<const uint4*>(base + row * d.neurons) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) {
        const int row = first + k * step;
        if (row >= Engine::BM) break;
        const uint32_t bits = whole ? positive_bits<T>(words[k])
                                    : row < rows && n > 0 ? positive_bits<T>(base + row * d.neurons, n) : 0u;
        signs[row * kRow + col / 8] = static_cast<unsigned char>(bits);
      }
    }
  }
  template <typename Sink>
  __device__ void epilogue(const Tile& t, const typename Engine::Acc& acc, const float*, const unsigned char* signs,
                           Sink& sink) const {
    if constexpr (Engine::kPersistent)
      epilogue_runs(t, acc, signs, sink);
    else
      epilogue_pairs(t, acc);
  }
  template <typename Sink>
  __device__ void epilogue_runs(const Tile& t, const typename Engine::Acc& acc, const unsigned char* signs,
                                Sink& sink) const {
    using R = Runs<Engine>;
    constexpr int W = R::kWidth, PN = Engine::kPieceN;
    static_assert(W == 8, "a sign byte per run");
    const Dims& d = p.dims;
    const int64_t m0 = t.pairs.m0, rows = t.pairs.rows;
    // H's signs: read ahead into shared memory by the producer's warps (an AHEAD engine), or here,
    // every run's before any dH is stored: the compiler may not move a load of H past a store to dH
    // (they might alias), and pair by pair each tile waited out one memory round trip after
    // another. (Issuing the loads with no branch between them changed nothing, session 21.)
    // A run's offset in H and dH, and how many of its columns exist (none: 0).
    auto place = [&](int row, int col, int64_t& at) {
      const int j = col / PN, c = col % PN;
      at = (m0 + row) * d.neurons + pick(t.pairs.n0, j) + c;
      return row < rows ? max(pick(t.pairs.cols, j) - c, 0) : 0;
    };
    constexpr bool kAhead = EpilogueShared<Engine>::kAheadBuffers > 0;
    uint32_t positive[kAhead ? 1 : R::kCount];
    if constexpr (!kAhead) {
      int index = 0;
      R::positions([&](int row, int col) {
        int64_t at;
        const int n = place(row, col, at);
        positive[index++] = n > 0 ? positive_bits<T>(p.h + at, n) : 0u;
      });
    }
    // Column sums of the stored (rounded) dH, as the reference sums it, per column set held.
    float sums[R::kSlots][W] = {};
    int index = 0;
    R::each(acc, [&](int row, int col, const float (&v)[W], int slot) {
      int64_t at;
      const int n = place(row, col, at), run = index++;
      if (n <= 0) return;
      uint32_t bits;
      if constexpr (kAhead)
        bits = signs[row * (Engine::BN / 8) + col / 8];
      else
        bits = positive[run];
      float g[W];
#pragma unroll
      for (int k = 0; k < W; ++k) {
        g[k] = rounded<T>((bits >> k) & 1 ? v[k] : 0.0f);
        sums[slot][k] += g[k];
      }
      sink(row, col, p.dh + at, n, g);
    });
    if (!p.db1_sum) return;
    // Lanes with the same lane % 4 hold the same columns: fold the 8 row groups, then one atomic
    // per column.
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int slot = 0; slot < R::kSlots; ++slot) {
      const int col = R::column(slot), j = col / PN, c = col % PN, cols = pick(t.pairs.cols, j);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        float sum = sums[slot][k];
        for (int offset = 4; offset < 32; offset *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        if (lane < 4 && c + k < cols) atomicAdd(p.db1_sum + pick(t.pairs.n0, j) + c + k, sum);
      }
    }
  }
  // The one-tile engines: pair by pair, H read where each pair is stored (another thread block on
  // the SM hides the wait).
  __device__ void epilogue_pairs(const Tile& t, const typename Engine::Acc& acc) const {
    constexpr int PN = Engine::kPieceN;
    const Dims& d = p.dims;
    const int64_t m0 = t.pairs.m0, rows = t.pairs.rows;
    using P = mma::Pair<T>;
    // Column sums of the stored (rounded) dH, as the reference sums it, per column pair held.
    float sums[Engine::kSlots][2] = {};
    Engine::for_each_pair(acc, [&](int row, int col, float v0, float v1, int slot) {
      const int j = col / PN, c = col % PN;
      if (row >= rows || c >= pick(t.pairs.cols, j)) return;
      const int64_t n = m0 * d.neurons + pick(t.pairs.n0, j) + c;
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
      if (lane < 4 && c < pick(t.pairs.cols, j)) {
        const int64_t n = pick(t.pairs.n0, j) + c;
        atomicAdd(p.db1_sum + n, s0);
        atomicAdd(p.db1_sum + n + 1, s1);
      }
    }
  }
};

// dX and dU1: [dX | dU1] = dH @ [W1 | B1] over the tile's active blocks.
template <typename T, typename Engine>
struct Dx : GatheredWork<Engine, BackwardParams<T>> {
  using Base = GatheredWork<Engine, BackwardParams<T>>;
  using typename Base::Params;
  using typename Base::Tile;
  using Base::p;
  static constexpr bool kBiased = false;

  // dU1's tiles only where it is asked for.
  __host__ __device__ static unsigned width(const Params& q) {
    return column_width<Engine>(q.dims.model, q.dlora1_u ? q.dims.r1 : 0);
  }
  __device__ bool tile(unsigned linear, Tile& t) const {
    const Dims& d = p.dims;
    // W1 [neurons, model] read as B[n = model, k = neuron] is MN-major; so is B1 [neurons, r1]:
    // output column n at n, K rows a whole output row apart.
    Base::place(linear, width(p), t, static_cast<const T*>(p.dh), &p.maps.dh, d.model, p.w1, &p.maps.w1, d.r1,
                p.lora1_b, &p.maps.lora1_b, 1, true);
    return true;
  }
  __device__ bool staged(const Tile& t) const { return t.first; }
  template <typename F>
  __device__ void store_boxes(const Tile& t, F f) const {
    Base::column_boxes(t, [&](int b, int c0, int c1) { f(&p.maps.dx, b, c0, c1); });
  }
  __device__ const T* bias() const { return nullptr; }
  __device__ int64_t bias_column(const Tile&, int) const { return -1; }
  template <typename Sink>
  __device__ void epilogue(const Tile& t, const typename Engine::Acc& acc, const float*, const unsigned char*,
                           Sink& sink) const {
    const Dims& d = p.dims;
    const int64_t width = t.first ? d.model : d.r1, rows = t.rows, cols = t.cols;
    T* out = (t.first ? p.dx : p.dlora1_u) + t.m0 * width + t.n0;
    using R = Runs<Engine>;
    R::each(acc, [&](int row, int col, const float (&v)[R::kWidth], int) {
      if (row < rows && col < cols) sink(row, col, out + row * width + col, static_cast<int>(cols - col), v);
    });
  }
};

// One tile per thread block, numbered as the grid is.
template <typename Engine, typename Work>
__device__ __forceinline__ void run_tile(const Work& work, unsigned char* shared) {
  typename Work::Tile t;
  if (!work.tile(blockIdx.y * gridDim.x + blockIdx.x, t)) return;
  float* s_bias = EpilogueShared<Engine>::buffer(shared, 0);
  if constexpr (Work::kBiased) {
    stage_bias<Engine>(s_bias, work, t, threadIdx.x, Engine::kThreads);
    __syncthreads();
  }
  typename Engine::Acc acc;
  Engine::zero(acc);
  Engine::accumulate(acc, work.chunks(t), [&](int i) { return work.chunk(t, i); }, shared);
  StoreNow sink;
  work.epilogue(t, acc, s_bias, nullptr, sink);
}

template <typename Engine, typename Work>
__device__ __forceinline__ void run(const Work& work, unsigned char* shared) {
  if constexpr (Engine::kPersistent)
    Engine::run(work, shared);
  else
    run_tile<Engine>(work, shared);
}

// The four products' kernels. grid: (Work::width, Work::height), or for a persistent engine as
// many thread blocks as fit at once.
template <typename T, typename Engine>
__global__ void __launch_bounds__(Engine::kThreads, Engine::kMinBlocks) fc1_kernel(const __grid_constant__ ForwardParams<T> p) {
  extern __shared__ __align__(128) unsigned char shared[];
  run<Engine>(Fc1<T, Engine>{{p}}, shared);
}
template <typename T, typename Engine>
__global__ void __launch_bounds__(Engine::kThreads, Engine::kMinBlocks) fc2_kernel(const __grid_constant__ ForwardParams<T> p) {
  extern __shared__ __align__(128) unsigned char shared[];
  run<Engine>(Fc2<T, Engine>{{p}}, shared);
}
template <typename T, typename Engine>
__global__ void __launch_bounds__(Engine::kThreads, Engine::kMinBlocks) dh_kernel(const __grid_constant__ BackwardParams<T> p) {
  extern __shared__ __align__(128) unsigned char shared[];
  run<Engine>(Dh<T, Engine>{{p}}, shared);
}
template <typename T, typename Engine>
__global__ void __launch_bounds__(Engine::kThreads, Engine::kMinBlocks) dx_kernel(const __grid_constant__ BackwardParams<T> p) {
  extern __shared__ __align__(128) unsigned char shared[];
  run<Engine>(Dx<T, Engine>{{p}}, shared);
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
