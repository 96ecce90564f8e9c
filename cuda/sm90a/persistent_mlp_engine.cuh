// A persistent, warp-specialised engine for the neuron-block MLP's four products (sm_90a only):
// 128 x 256 output tiles, one thread block per SM walking the whole grid of tiles.
//
// Why: at 128 x 128 per thread block (two blocks per SM), fc1 brought 1 MB from L2 per tile, 4.3 GB
// in all at OPT-1.3B, 8.5 TB/s over its 505 us: near what L2 delivers, while the tensor pipe sat
// idle a third of the time (bench/RESULTS.md). A 128 x 256 tile brings 25% fewer bytes per FLOP.
// One such tile per thread block filled an SM alone and left the tensor cores idle through every
// prologue and epilogue (LONG_EXPOSURE_MLP_KERNEL=tma-128x256 measured no faster). Here a producer
// warpgroup, one thread of it issuing TMA copies, runs through the thread block's tiles chunk by
// chunk as far ahead as the ring allows, across tile boundaries: while the two consumer warpgroups
// store one tile's results, the next tile's first chunks are already landing. The consumers never
// issue a copy, so neither waits on the other's progress, only on the ring.
//
// Work is divided as in the one-tile-per-block kernels (neuron_block_mlp.cuh: the Work structs);
// thread block b takes tiles b, b + gridDim.x, ... of the linear numbering.
#pragma once

#include <cub/block/block_scan.cuh>

#include "neuron_block_mlp.cuh"
#include "tma.cuh"
#include "wgmma_gemm.cuh"
#include "wgmma_tma_gemm.cuh"

namespace long_exposure {
namespace neuron_block {

template <int N>
__device__ __forceinline__ void raise_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void lower_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
// The consumer warpgroups' barrier (id 1; __syncthreads takes 0), without the producer's.
__device__ __forceinline__ void consumers_sync(int threads) {
  asm volatile("bar.sync 1, %0;\n" ::"r"(threads) : "memory");
}

// starts[i] = the sum of value(j) for j < i, for i up to n (< kMaxRows); returns starts[n]. All
// kThreads threads call it; it ends with a barrier.
template <int kThreads, int kMaxRows, typename Value>
__device__ __forceinline__ unsigned prefix_sums(int32_t* starts, unsigned n, Value value) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage storage;
  constexpr int kItems = (kMaxRows + kThreads - 1) / kThreads;
  int items[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const unsigned row = threadIdx.x * kItems + i;
    items[i] = row < n ? value(row) : 0;
  }
  int total = 0;
  Scan(storage).ExclusiveSum(items, items, total);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const unsigned row = threadIdx.x * kItems + i;
    if (row < n) starts[row] = items[i];
  }
  if (threadIdx.x == 0) starts[n] = total;
  __syncthreads();
  return static_cast<unsigned>(total);
}

// AHEAD: dH's producer warps read H's signs ahead of its epilogue (Work::read_ahead). STAGED: the
// consumers store fc1's, dH's and the frozen weights' columns of fc2's and dX's outputs through
// shared memory by TMA (Work::store_boxes). The default has AHEAD alone (neuron_block_mlp_sm90.cuh).
template <typename T, bool B_KMAJOR, int STAGES, bool AHEAD = false, bool STAGED = false>
struct PersistentEngine {
  static_assert(STAGES >= 2, "one stage computing, one loading");
  // Two consumer warpgroups of 64 rows, each multiplying its rows by both 128-column B pieces.
  static constexpr int kConsumers = 2, kPieces = 2, kPieceN = wgmma::kN;
  static constexpr int BM = wgmma::kM * kConsumers, BN = kPieceN * kPieces;
  using Chunk = mma::SplitChunk<T, kPieces>;
  static constexpr bool kLoadsByTma = true, kPersistent = true;
  static constexpr int kThreads = wgmma::kThreads * (kConsumers + 1), kMinBlocks = 1;
  static constexpr int kConsumerThreads = wgmma::kThreads * kConsumers;
  // 384 threads share 168 registers each at launch: the producer gives up what the accumulators
  // need. A Work that reads ahead (dH) gives its producer warps more, the consumers keeping 224
  // with no spill: at 40, four loads in flight spilled.
  static constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;
  static constexpr int kAheadRegisters = 56, kAheadConsumerRegisters = 224;
  static_assert(kProducerRegisters * wgmma::kThreads + kConsumerRegisters * kConsumerThreads <= 168 * kThreads &&
                    kAheadRegisters * wgmma::kThreads + kAheadConsumerRegisters * kConsumerThreads <= 168 * kThreads,
                "the registers the thread block is launched with");
  static constexpr int kABoxRows = BM, kBBoxRows = B_KMAJOR ? wgmma::kN : mma::kBK;
  using ATile = mma::SwizzledTile<BM, mma::kBK>;
  using BTile = std::conditional_t<B_KMAJOR, mma::SwizzledTile<wgmma::kN, mma::kBK>, wgmma::PanelTile<mma::kBK>>;
  static constexpr int kStageElements = ATile::kElements + kPieces * BTile::kElements;
  static constexpr uint32_t kABytes = ATile::kElements * sizeof(T), kPieceBytes = BTile::kElements * sizeof(T);
  // The consumers' outputs on their way to global memory: BN / 64 boxes of BM rows by 64 columns,
  // swizzled as TMA's 128-byte swizzle reads them.
  static constexpr int kStagingElements = STAGED ? BM * BN : 0;
  // What EpilogueShared keeps: the mask's counts for up to kCountsKept tiles, and kAheadBuffers
  // buffers of H's signs; fewer beside the staging boxes, to fit.
  static constexpr int kCountsKept = STAGED ? 1024 : 2048, kAheadBuffers = AHEAD ? (STAGED ? 1 : 2) : 0;
  // The ring, the staging boxes, their 1 KiB alignment slack, and a full and an empty barrier per
  // stage.
  static constexpr int shared_bytes() {
    return (STAGES * kStageElements + kStagingElements) * static_cast<int>(sizeof(T)) + 1024 + 2 * STAGES * 8;
  }
  static constexpr int kSlots = kPieces * wgmma::kN / 8;  // column pairs each consumer thread holds
  static constexpr unsigned kDenseGroup = 8;  // run()'s order of fc1's and dH's tiles on a full grid
  // fc2 and dX rank their token rows by weight where there are at most this many (each thread
  // compares its rows with all: 512 rows cost 384 threads under 700 reads each).
  static constexpr unsigned kRankedRows = 512;
  struct Acc {
    float d[kPieces][64];
  };

  __device__ static __forceinline__ void zero(Acc& acc) {
#pragma unroll
    for (int j = 0; j < kPieces; ++j)
#pragma unroll
      for (int i = 0; i < 64; ++i) acc.d[j][i] = 0.0f;
  }

  // As wgmma::Engine::for_each_pair, per piece: consumer c holds rows 64 c.., and slot 16 j + i
  // is its column pair i of piece j.
  template <typename F>
  __device__ static __forceinline__ void for_each_pair(const Acc& acc, F f) {
    const int consumer = threadIdx.x / wgmma::kThreads - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int row = consumer * wgmma::kM + warp * 16 + lane / 4;
#pragma unroll
    for (int j = 0; j < kPieces; ++j) {
      const int col = j * kPieceN + (lane % 4) * 2;
#pragma unroll
      for (int i = 0; i < wgmma::kN / 8; ++i) {
        f(row, col + i * 8, acc.d[j][i * 4], acc.d[j][i * 4 + 1], j * (wgmma::kN / 8) + i);
        f(row + 8, col + i * 8, acc.d[j][i * 4 + 2], acc.d[j][i * 4 + 3], j * (wgmma::kN / 8) + i);
      }
    }
  }
  __device__ static __forceinline__ int slot_column(int slot) {
    return (slot / (wgmma::kN / 8)) * kPieceN + (slot % (wgmma::kN / 8)) * 8 + (threadIdx.x % 4) * 2;
  }

  // The epilogues' view of the accumulator: runs of kRun consecutive columns of one row, one 16-byte
  // store each. The wgmma layout gives each thread column pairs 8 apart; a 4 x 4 transpose across
  // the four lanes of a row turns four such pairs per lane into one run per lane. Pair by pair, a
  // warp's store wrote 16 bytes of each of 8 rows: fc1 took 454 us with its epilogue and 358 us
  // without; in runs, 407 (OPT-1.3B, density 1, session 21).
  static constexpr int kRun = 8, kRunSlots = kPieces * wgmma::kN / 32;
  // f(row, col, v, slot) for v[0..8) at columns col.., slot numbering the thread's column sets (the
  // rows row and row + 8 share one). Call it from whole warps: the transpose is a warp shuffle.
  template <typename F>
  __device__ static __forceinline__ void for_each_run(const Acc& acc, F f) {
    const int q = threadIdx.x % 4;
#pragma unroll
    for (int j = 0; j < kPieces; ++j)
#pragma unroll
      for (int g = 0; g < wgmma::kN / 32; ++g)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float v[kRun];
#pragma unroll
          for (int m = 0; m < 4; ++m) {
            v[2 * m] = acc.d[j][(4 * g + m) * 4 + 2 * h];
            v[2 * m + 1] = acc.d[j][(4 * g + m) * 4 + 2 * h + 1];
          }
          exchange<2>(v, q & 2);
          exchange<1>(v, q & 1);
          f(run_row() + 8 * h, j * kPieceN + 32 * g + 8 * q, v, j * (wgmma::kN / 32) + g);
        }
  }
  // The epilogues' sink for a tile stored by TMA: each run into the staging boxes. A warp's 32
  // runs (8 rows, 4 chunks each) land on 32 distinct 16-byte bank groups: no conflicts.
  struct StageSink {
    T* staging;
    template <int W>
    __device__ __forceinline__ void operator()(int row, int col, T*, int, const float (&v)[W]) const {
      static_assert(W == kRun, "runs of 8");
      const int chunk = ((col % 64) / 8) ^ (row % 8);
      *reinterpret_cast<uint4*>(staging + (col / 64) * (BM * 64) + row * 64 + chunk * 8) =
          make_uint4(pair_bits<T>(v[0], v[1]), pair_bits<T>(v[2], v[3]), pair_bits<T>(v[4], v[5]),
                     pair_bits<T>(v[6], v[7]));
    }
  };
  // f(row, col) for each run, in for_each_run's order, without the values.
  static constexpr int kRuns = 2 * kRunSlots;
  template <typename F>
  __device__ static __forceinline__ void for_each_run_position(F f) {
#pragma unroll
    for (int slot = 0; slot < kRunSlots; ++slot)
#pragma unroll
      for (int h = 0; h < 2; ++h) f(run_row() + 8 * h, run_column(slot));
  }
  __device__ static __forceinline__ int run_column(int slot) {
    return (slot / (wgmma::kN / 32)) * kPieceN + (slot % (wgmma::kN / 32)) * 32 + (threadIdx.x % 4) * 8;
  }
  __device__ static __forceinline__ int run_row() {
    const int consumer = threadIdx.x / wgmma::kThreads - 1, warp = (threadIdx.x / 32) % 4;
    return consumer * wgmma::kM + warp * 16 + (threadIdx.x % 32) / 4;
  }
  // One step of the transpose: lanes K apart swap the two pairs whose index bit K differs from the
  // lane's own, each lane writing what it receives where it sent from.
  template <int K>
  __device__ static __forceinline__ void exchange(float (&v)[kRun], bool set) {
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int clear = K == 2 ? t : 2 * t, with = clear + K;  // pair indices with bit K clear / set
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float sent = set ? v[2 * clear + e] : v[2 * with + e];
        const float received = __shfl_xor_sync(0xffffffffu, sent, K);
        v[2 * clear + e] = set ? received : v[2 * clear + e];
        v[2 * with + e] = set ? v[2 * with + e] : received;
      }
    }
  }

  // acc (PIECES of them) += this consumer's 64 rows of the A tile times the first PIECES B pieces,
  // one committed group left in flight.
  template <int PIECES>
  __device__ static __forceinline__ void multiply(Acc& acc, const T* a, const T* b) {
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < mma::kBK; kk += 16) {
      const uint64_t da = wgmma::descriptor(a + kk, 16, 1024);
#pragma unroll
      for (int j = 0; j < PIECES; ++j) {
        const T* piece = b + j * BTile::kElements;
        const uint64_t db = B_KMAJOR ? wgmma::descriptor(piece + kk, 16, 1024)
                                     : wgmma::descriptor(piece + kk * 64, mma::kBK * 64 * sizeof(T), 1024);
        wgmma::Wgmma64x128<T, !B_KMAJOR>::run(acc.d[j], da, db);
      }
    }
    wgmma::commit();
  }

  template <typename Work>
  __device__ static void run(const Work& mask_work, unsigned char* raw) {
    constexpr bool kAhead = AHEAD && Work::kReadsAhead;
    using Epilogue = EpilogueShared<PersistentEngine>;
    Work work = mask_work;
    const unsigned width = Work::width(work.p);
    unsigned tiles = width * Work::height(work.p);
    const int32_t* work_order = nullptr;  // fc2's and dX's token rows, heaviest first
    const int64_t mask_tiles = (work.p.dims.tokens + work.p.dims.tile_m - 1) / work.p.dims.tile_m;
    if (mask_tiles <= Epilogue::kCounts) {
      int32_t* counts = Epilogue::counts(raw);
      for (int64_t i = threadIdx.x; i < mask_tiles; i += kThreads) counts[i] = work.counts[i];
      work.counts = counts;
      __syncthreads();
      // fc1 and dH, unless LONG_EXPOSURE_MLP_TILE_GROUP names groups of 2 or more: number the
      // active tiles alone, so that thread block b's share (b, b + gridDim.x, ...) holds only work.
      // Over the whole grid, a thread block's tiles fell on the same few slots of every row, and
      // at low density some thread blocks drew several active tiles while others drew none (fc1
      // 105 us against 72 for one tile per thread block at density 0.1, bench/RESULTS.md session 20).
      //
      // Where every tile of the grid is active and the variable names no group, no thread block
      // can draw more than its share, and the grid's own order in groups of kDenseGroup token tiles
      // keeps the tiles in flight on fewer rows and blocks: with each row's slots side by side, the
      // 132 tiles in flight read all of W1 once per four token rows (fc1 read 487 MB from DRAM at
      // OPT-1.3B, density 1, where cuBLAS read 142; groups of 8 were 1.6-3.7% faster there,
      // session 20).
      if constexpr (Work::kPairs) {
        const unsigned rows = Work::height(work.p);
        const int group = work.p.dims.tile_group;  // 0: ours to choose
        if (rows < Epilogue::kCounts && group <= 1) {
          int32_t* starts = Epilogue::row_starts(raw);
          const unsigned active =
              prefix_sums<kThreads, Epilogue::kCounts>(starts, rows, [&](unsigned y) { return work.pairs_in(y); });
          if (active == tiles && group == 0) {
            work.group = kDenseGroup;
          } else {
            tiles = active;
            work.pair_starts = starts;
          }
        }
      }
      if constexpr (!Work::kPairs) {
        const unsigned rows = Work::height(work.p);
        if (rows <= kRankedRows && !work.p.dims.grid_order) {
          // fc2 and dX: a tile's chunks are its token row's active blocks, so at mid densities the
          // rows differ by tens of percent, and thread block b's share (b, b + gridDim.x, ...)
          // drew unequal sums. Ranked heaviest first (ties by row), each row's tiles side by side.
          int32_t* order = Epilogue::row_starts(raw);
          auto cost = [&](unsigned y) { return work.counts[static_cast<int64_t>(y) * BM / work.p.dims.tile_m]; };
          for (unsigned y = threadIdx.x; y < rows; y += kThreads) {
            const int c = cost(y);
            unsigned rank = 0;
            for (unsigned z = 0; z < rows; ++z) {
              const int other = cost(z);
              rank += other > c || (other == c && z < y);
            }
            order[rank] = static_cast<int32_t>(y);
          }
          work_order = order;
        }
      }
    }
    T* shared = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t{1023});
    T* staging = shared + STAGES * kStageElements;
    uint64_t* full = reinterpret_cast<uint64_t*>(staging + kStagingElements);
    uint64_t* empty = full + STAGES;
    auto stage_a = [&](int s) { return shared + s * kStageElements; };
    auto stage_b = [&](int s) { return shared + s * kStageElements + ATile::kElements; };
    // What the producer's warps other than the first read ahead for the epilogue, in
    // Epilogue::kAheadBuffers buffers used in turn (Work::read_ahead).
    constexpr int kAheadThreads = wgmma::kThreads - 32;
    constexpr int kAheadBuffers = Epilogue::kAheadBuffers > 0 ? Epilogue::kAheadBuffers : 1;
    auto ahead_full = [&](int i) { return Epilogue::ahead_barrier(raw, i % kAheadBuffers); };
    auto ahead_empty = [&](int i) { return Epilogue::ahead_barrier(raw, kAheadBuffers + i % kAheadBuffers); };
    if (threadIdx.x == 0) {
      for (int s = 0; s < STAGES; ++s) {
        tma::barrier_init(&full[s], 1);
        tma::barrier_init(&empty[s], kConsumerThreads / 32);
      }
      if constexpr (kAhead)
        for (int i = 0; i < Epilogue::kAheadBuffers; ++i) {
          tma::barrier_init(ahead_full(i), kAheadThreads);
          tma::barrier_init(ahead_empty(i), kConsumerThreads);
        }
      tma::fence_barrier_init();
    }
    __syncthreads();
    const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / wgmma::kThreads, 0);
    // This thread block's tile of a pass, or `tiles` past its last. In the grid's order: tiles b,
    // b + gridDim.x, ... With ranked rows: pass k takes tiles k gridDim.x .. of the ranked order,
    // thread blocks in turn forwards on even passes and backwards on odd ones, so that the block
    // that drew the heaviest tile of one pass draws the lightest of the next.
    auto tile_of = [&](unsigned pass) -> unsigned {
      const unsigned blocks = gridDim.x, b = blockIdx.x;
      const unsigned i = pass * blocks + (work_order && (pass & 1) ? blocks - 1 - b : b);
      if (i >= tiles) return tiles;
      return work_order ? static_cast<unsigned>(work_order[i / width]) * width + i % width : i;
    };

    if (warpgroup == 0) {
      lower_registers<kAhead ? kAheadRegisters : kProducerRegisters>();
      if constexpr (kAhead) {
        if (threadIdx.x >= 32) {
          // Tile k (counted over the block's tiles with work) into buffer k % kAheadBuffers once
          // the consumers are done with its previous occupant.
          int k = 0;
          for (unsigned walked = 0, w = tile_of(0); w < tiles; w = tile_of(++walked)) {
            typename Work::Tile t;
            if (!work.tile(w, t)) continue;
            if (k >= kAheadBuffers) tma::wait(ahead_empty(k), (k / kAheadBuffers - 1) & 1);
            work.read_ahead(t, Epilogue::ahead(raw, k), static_cast<int>(threadIdx.x) - 32, kAheadThreads);
            tma::arrive_if(ahead_full(k), true);
            ++k;
          }
          return;
        }
      }
      if (threadIdx.x != 0) return;
      // Chunk `it` (counted over all the block's tiles) into stage it % STAGES once its previous
      // occupant is released.
      uint32_t it = 0;
      for (unsigned walked = 0, w = tile_of(0); w < tiles; w = tile_of(++walked)) {
        typename Work::Tile t;
        if (!work.tile(w, t)) continue;
        const int n = work.chunks(t);
        for (int i = 0; i < n; ++i, ++it) {
          const int s = static_cast<int>(it % STAGES);
          if (it >= STAGES) tma::wait(&empty[s], (it / STAGES - 1) & 1);
          wgmma::load_chunk<T, B_KMAJOR, kPieces>(work.chunk(t, i), stage_a(s), stage_b(s), BTile::kElements, kABytes,
                                                  kPieceBytes, &full[s]);
        }
      }
      return;
    }

    raise_registers<kAhead ? kAheadConsumerRegisters : kConsumerRegisters>();
    const int consumer_thread = static_cast<int>(threadIdx.x) - wgmma::kThreads;
    const int a_rows = (warpgroup - 1) * wgmma::kM * mma::kBK;
    const bool lane0 = threadIdx.x % 32 == 0;
    uint32_t it = 0;
    int done = 0;
    // Broadcast from lane 0, the tile is uniform to the compiler (see n and live below).
    auto uniform_tile_of = [&](unsigned pass) { return __shfl_sync(0xffffffffu, tile_of(pass), 0); };
    for (unsigned walked = 0, w = uniform_tile_of(0); w < tiles; w = uniform_tile_of(++walked)) {
      typename Work::Tile t;
      if (!__shfl_sync(0xffffffffu, work.tile(w, t), 0)) continue;  // uniform, as n and live below
      const int k = done++;
      float* s_bias = Epilogue::buffer(raw, k);
      // Each consumer thread's bias column (BN of them, one per thread), loaded here and stored
      // to shared memory only after the products: only the epilogue reads it, and the load's
      // latency, which the consumers waited out before every tile's first chunk, hides behind
      // the products instead.
      static_assert(BN == kConsumerThreads, "one bias column per consumer thread");
      float bias_value = 0.0f;
      if constexpr (Work::kBiased) {
        const auto* bias = work.bias();
        const int64_t base = bias ? work.bias_column(t, consumer_thread) : -1;
        if (base >= 0) bias_value = static_cast<float>(bias[base]);
      }
      Acc acc;
      zero(acc);
      // The chunk count and the live pieces (the first is live wherever the second is) decide
      // which wgmma each chunk issues: broadcast from lane 0, they are uniform to the compiler too.
      // Left to it, a tile position found by a search loop read as divergent, and ptxas serialized
      // every wgmma of fc1 and dH (its warning C7518; 9% slower at density 1, session 20).
      const int n = __shfl_sync(0xffffffffu, work.chunks(t), 0);
      const int live = __shfl_sync(0xffffffffu, work.live(t, 0) ? (work.live(t, 1) ? 2 : 1) : 0, 0);
      const bool one = live >= 1, two = live == 2;
      for (int i = 0; i < n; ++i, ++it) {
        const int s = static_cast<int>(it % STAGES);
        tma::wait(&full[s], (it / STAGES) & 1);
        if (two)
          multiply<2>(acc, stage_a(s) + a_rows, stage_b(s));
        else if (one)
          multiply<1>(acc, stage_a(s) + a_rows, stage_b(s));
        // The previous chunk's products are done: its stage may be refilled. The last chunk
        // drains, so that no wgmma is in flight where the loop's exit joins the path that skipped it.
        if (i + 1 < n)
          wgmma::wait_one();
        else
          wgmma::wait_all();
        tma::arrive_if(&empty[(it + STAGES - 1) % STAGES], i > 0 && lane0);
      }
      if (n > 0) tma::arrive_if(&empty[(it - 1) % STAGES], lane0);
      if constexpr (Work::kBiased) {
        s_bias[consumer_thread] = bias_value;
        consumers_sync(kConsumerThreads);
      }
      const unsigned char* ahead = nullptr;
      if constexpr (kAhead) {
        tma::wait(ahead_full(k), (k / kAheadBuffers) & 1);
        ahead = Epilogue::ahead(raw, k);
      }
      // STAGED: through the staging boxes where the tile allows (stored by TMA while the next
      // tile's products run), else from registers. Stored from registers, each SM's outputs go
      // out while its tensor cores idle, and the SMs, in step, all at once: fc1 took 407 us with
      // its stores and 358 without (OPT-1.3B, density 1, session 21). Staged, with the ring cut
      // to three stages to make room, fwd+bwd measured 3-8% slower (H100, session 22): the ring
      // costs more than the stores gain.
      if (STAGED && __shfl_sync(0xffffffffu, work.staged(t), 0)) {
        // The previous tile's boxes are read out of the staging memory before it is written.
        if (consumer_thread == 0) tma::wait_stores_read();
        consumers_sync(kConsumerThreads);
        StageSink sink{staging};
        work.epilogue(t, acc, s_bias, ahead, sink);
        wgmma::fence_proxy();
        consumers_sync(kConsumerThreads);
        if (consumer_thread == 0) {
          work.store_boxes(t, [&](const CUtensorMap* map, int b, int c0, int c1) {
            tma::store_box(map, c0, c1, staging + b * (BM * 64));
          });
          tma::commit_stores();
        }
      } else {
        StoreNow sink;
        work.epilogue(t, acc, s_bias, ahead, sink);
      }
      if constexpr (kAhead) tma::arrive_if(ahead_empty(k), true);
    }
    if (STAGED && consumer_thread == 0) tma::wait_stores();
  }
};

}  // namespace neuron_block
}  // namespace long_exposure
