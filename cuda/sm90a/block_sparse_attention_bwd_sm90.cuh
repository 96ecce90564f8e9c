// The block-sparse causal attention backward on Hopper's wgmma (sm_90a only; contract:
// attention.h, the same outputs as dkv_kernel and dq_kernel in block_sparse_attention.cuh, whose
// transposed layout this path keeps; delta comes from this path's dQ pass, which runs first).
//
// Why: the mma.sync backward holds 16 rows per warp and re-reads every operand through ldmatrix
// for each of its four products, about twice cuDNN's time at OPT-1.3B shapes; wgmma multiplies 64
// rows per warpgroup with the shared operands read by the tensor cores themselves.
//
// dK/dV pass. One thread block per (key block or prefix block, head, batch), one warpgroup per 64
// keys; a 128-key block has two, sharing every query tile. As in the mma.sync kernel every product
// is taken transposed, keys as rows, so each warpgroup's dK and dV rows are its own and nothing
// is reduced across threads. Per query tile (64 queries, 32 at head dim 128 where dK and dV take
// 128 registers):
//   S^T = K Q^T and dP^T = V dO^T   two shared-memory wgmma groups, both operands K-major;
//   P^T = exp2(S^T scale log2e - lse) as soon as S^T lands, while dP^T still runs;
//   dV += P^T dO                    register-A wgmma (P^T rounded in place), dO read MN-major;
//   dS^T = P^T (dP^T - delta)       while dV's product runs;
//   dK += dS^T Q                    register-A wgmma, Q read MN-major.
// The accumulator layout of a 64 x N product is the register-A layout of the next (see
// wgmma_attention.cuh), so neither P nor dS touches shared memory. Tile t's dV and dK products
// are not waited for in iteration t: they run on behind the next barrier and the next tile's
// S^T and dP^T, whose first wait retires them, so the tensor cores see the products back to back.
// Hence three buffers of Q and dO tiles (and of their rows' lse and delta): the copy of tile t + 1
// starts right behind the barrier that publishes tile t, into the buffers of tile t - 2, which
// every warpgroup retired in iteration t - 1.
//
// dQ pass. One thread block per (query block, head, batch), one warpgroup per 64 query rows, keys
// in 64-key segments exactly as the forward walks them (prefix first): S = Q K^T and dP = dO V^T
// from shared memory, P and dS in registers, dQ += dS K with K read MN-major; key and value tiles
// triple-buffered the same way (double-buffered, dQ waited for in its own iteration, where three
// buffers would cost an SM one of its thread blocks). Before its first tile it also takes delta =
// rowsum(dO * O) for its rows, from the dO block it holds anyway, and writes it for dK/dV.
//
// Both passes take their tiles as the forward does: one thread starts a tile's TMA boxes on the
// barrier of the stage it fills, every thread waits for that barrier's phase, and a block-wide
// barrier then certifies that the stage the next copy reuses is retired. The registers that
// cp.async's per-thread addresses held went to the products: dK/dV at head dim 64 and 64-key
// blocks fits 168 registers, and so three thread blocks per SM, where it needed 210.
//
// Every exit of the products' registers from the tensor cores is marked by fence_registers
// right after the wait that retires them, so the compiler keeps those registers, fragments
// included, untouched while a product may still read or write them.
//
// lse arrives as the forward wrote it (natural log) and is taken to log2 units by backward_lse,
// which turns it into +inf for rows past the sequence or with nothing visible, so their P is 0.
// Keys past the sequence or the prefix are zero-filled; their rows of dK/dV hold values that are
// never stored, and their columns of dQ's products are masked.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "block_sparse_attention.cuh"
#include "block_sparse_attention_sm90.cuh"
#include "kernel_choice.cuh"
#include "wgmma_attention.cuh"

namespace long_exposure {
namespace attention_cuda {
namespace sm90 {

template <int D, int BLK>
struct DkvConfig {
  static_assert(BLK == 64 || BLK == 128, "the wgmma backward takes blocks of 64 and 128");
  static constexpr int kWidth = panel_width<D>();
  static constexpr int kGroups = BLK / 64, kThreads = 128 * kGroups;
  static constexpr int kBq = D == 128 ? 32 : 64;  // queries per tile
  static constexpr int kPerBlock = BLK / kBq;
  // Three 64-key blocks per SM cap registers at 168. At head dim 64 that fits without spills since
  // the tiles arrive by TMA (210 registers with cp.async's addresses), and the third block took
  // the kernel from 0.460 to 0.407 ms at OPT-1.3B, density 1, and 0.126 to 0.109 at 0.18
  // (bench/RESULTS.md session 26). Wider heads need more than 168 for dK and dV.
  static constexpr int kMinBlocks = BLK == 64 ? (D == 64 ? 3 : 2) : 1;
  // Three query-tile buffers: tile t + 1 loads while tile t computes and tile t - 1's last
  // products may still read theirs. Two also work, each tile's products then waited for within
  // its own iteration; head dim 80 with 64-key blocks takes two, as three (128 KiB, its 64-query
  // tiles two panels wide) would leave an SM one thread block.
  static constexpr int kStages = (D == 80 && BLK == 64) ? 2 : 3;
  static constexpr int kKvElements = BLK * kWidth, kTileElements = kBq * kWidth;
  template <typename T>
  static size_t smem_bytes(int n_q) {
    return 1024 + static_cast<size_t>(2 * kKvElements + 2 * kStages * kTileElements) * sizeof(T) +
           (1 + kStages) * sizeof(uint64_t) + 2 * kStages * kBq * sizeof(float) + (n_q + 4) * sizeof(int);
  }
};

template <int D, int BLK>
struct DqConfig {
  static_assert(BLK == 64 || BLK == 128, "the wgmma backward takes blocks of 64 and 128");
  static constexpr int kWidth = panel_width<D>();
  static constexpr int kGroups = BLK / 64, kThreads = 128 * kGroups;
  static constexpr int kKeys = 64;
  static constexpr int kPerBlock = BLK / kKeys;
  static constexpr int kMinBlocks = BLK == 64 ? (D == 64 ? 3 : 2) : 1;
  // Three key/value buffers let tile t's dQ product run on into iteration t + 1 (see dkv_kernel);
  // a 64-row block two panels wide (head dim 80 or 128) keeps two, which leave room for two
  // thread blocks per SM (96 KiB each instead of 128).
  static constexpr int kStages = kWidth == 128 && BLK == 64 ? 2 : 3;
  static constexpr int kQElements = BLK * kWidth, kTileElements = kKeys * kWidth;
  template <typename T>
  static size_t smem_bytes(int n_q) {
    return 1024 + static_cast<size_t>(2 * kQElements + 2 * kStages * kTileElements) * sizeof(T) +
           (1 + kStages) * sizeof(uint64_t) + (n_q + 4) * sizeof(int);
  }
};

// The backward's operands as TMA maps (tma::planes_map), a __grid_constant__ kernel parameter as
// the forward's. Q's and dO's boxes have the rows of the pass's query tiles (dK/dV's kBq); O is
// the dQ pass's alone.
struct BackwardMaps {
  CUtensorMap q, dout, out, k, v, pk, pv;
};

// Programmatic dependent launch (on unless LONG_EXPOSURE_ATTENTION_PDL=0; 0.5-1.5% off fwd+bwd in
// each of eight A/B pairs at OPT-1.3B and 2.7B shapes, bench/RESULTS.md session 20): the dK/dV grid
// may launch once every dQ thread block has started, so that its thread blocks take the SMs that
// dQ's last wave leaves and run their prologue (list, K and V, the first query tile) before dQ has
// finished. They wait for dQ's completion, and its delta, only where they first read delta.
// Without the launch attribute both instructions do nothing.
__device__ __forceinline__ void allow_dependent_launch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void wait_for_prerequisite_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// delta = rowsum(dO * O) for a thread's two accumulator rows (lane / 4 and lane / 4 + 8 of its
// warp's 16), taken where the dQ pass already holds the query block's dO in shared memory, so that
// the backward needs no pass of its own for it (0.021 ms at OPT-1.3B, 0.038 at OPT-2.7B, batch 4,
// 2048 tokens: bench/RESULTS.md). O comes through shared memory as well: held in registers across
// the loads' wait, it pushed the 64-row dQ kernel past its register budget. The four threads of a
// quad share the two rows' 16-byte pieces. do_row and o_row: the first row's row in each tile.
template <typename T, int D, int DO_ROWS, int O_ROWS>
__device__ __forceinline__ void row_deltas(const T* s_do, int do_row, const T* s_o, int o_row, float& lo, float& hi) {
  constexpr int kPieces = D / 8;
  lo = hi = 0.f;
#pragma unroll
  for (int c = static_cast<int>(threadIdx.x % 4); c < 2 * kPieces; c += 4) {
    const int dr = c < kPieces ? 0 : 8, col = (c % kPieces) * 8;
    const uint4 x = *reinterpret_cast<const uint4*>(s_do + wgmma::Panels<DO_ROWS>::offset(do_row + dr, col));
    const uint4 y = *reinterpret_cast<const uint4*>(s_o + wgmma::Panels<O_ROWS>::offset(o_row + dr, col));
    const T* xs = reinterpret_cast<const T*>(&x);
    const T* ys = reinterpret_cast<const T*>(&y);
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += static_cast<float>(xs[e]) * static_cast<float>(ys[e]);
    (dr == 0 ? lo : hi) += acc;
  }
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    lo += __shfl_xor_sync(0xffffffffu, lo, off);
    hi += __shfl_xor_sync(0xffffffffu, hi, off);
  }
}

template <typename T, int D, int BLK>
__global__ void __launch_bounds__(DkvConfig<D, BLK>::kThreads, DkvConfig<D, BLK>::kMinBlocks)
    dkv_kernel(const BackwardParams p, const __grid_constant__ BackwardMaps maps) {
  using C = DkvConfig<D, BLK>;
  constexpr int kBq = C::kBq, kPerBlock = C::kPerBlock, kThreads = C::kThreads, kStages = C::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_k = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  T* s_v = s_k + C::kKvElements;
  T* s_q = s_v + C::kKvElements;                // kStages query tiles
  T* s_do = s_q + kStages * C::kTileElements;   // kStages output-gradient tiles
  // TMA barriers: [0] K and V, [1 + i] stage i's query and output-gradient tiles.
  uint64_t* bars = reinterpret_cast<uint64_t*>(s_do + kStages * C::kTileElements);
  float* s_lse = reinterpret_cast<float*>(bars + 1 + kStages);
  float* s_delta = s_lse + kStages * kBq;
  int* s_list = reinterpret_cast<int*>(s_delta + kStages * kBq);
  int* s_count = s_list + p.n_q;

  const GridItem item = grid_item(p.rank_group, p.heads);
  if (item.rank >= key_block_ranks<BLK>(p)) return;
  const int h = item.h, b = item.b;
  const int group = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int i = 0; i < 1 + kStages; ++i) tma::barrier_init(bars + i, 1);
    tma::fence_barrier_init();
  }
  // Its closing barrier also publishes the initialised barriers.
  const KeyBlockQueries work = key_block_queries<BLK, kThreads>(p, item.rank, b, h, s_list, s_count);
  const bool is_prefix = work.is_prefix;
  const int kb = work.kb, n_list = work.n_list;
  const int n_tiles = n_list * kPerBlock;

  const int64_t bh = (static_cast<int64_t>(b) * p.heads + h) * p.seq;
  auto tile_q0 = [&](int t) { return s_list[t / kPerBlock] * BLK + (t % kPerBlock) * kBq; };
  // Thread 0 starts every copy; tile t lands on stage t % kStages's barrier, whose phase
  // t / kStages % 2 the others wait for.
  auto issue = [&](int t) {
    const int buf = t % kStages, q0 = tile_q0(t);
    uint64_t* bar = bars + 1 + buf;
    tma::arrive_expecting(bar, 2 * sm90::kRowsBytes<T, D, kBq>);
    load_rows_by_tma<D, kBq, kBq, kBq>(s_q + buf * C::kTileElements, 0, &maps.q, q0, b, h, bar);
    load_rows_by_tma<D, kBq, kBq, kBq>(s_do + buf * C::kTileElements, 0, &maps.dout, q0, b, h, bar);
  };
  // Thread r < kBq carries row r's lse and delta; they travel through registers, read from global
  // memory right after a barrier and stored to shared memory just before the next, so that their
  // latency hides behind a tile's products instead of holding up the warpgroup's first wgmma.
  auto fetch_rows = [&](int t, float& lse, float& delta) {
    const int i = tile_q0(t) + static_cast<int>(threadIdx.x);
    lse = backward_lse(p.lse + bh, i, p.seq);
    delta = i < p.seq ? p.delta[bh + i] : 0.f;
  };
  auto stage_rows = [&](int t, float lse, float delta) {
    s_lse[(t % kStages) * kBq + threadIdx.x] = lse;
    s_delta[(t % kStages) * kBq + threadIdx.x] = delta;
  };

  // With three stages tile 1 starts with tile 0: a key block of one or two query tiles (low
  // densities) then waits for memory once.
  constexpr int kFirstInLoop = kStages == 3 ? 2 : 1;
  const int key_limit = is_prefix ? p.prefix : p.seq;
  if (n_tiles > 0 && threadIdx.x == 0) {
    tma::arrive_expecting(bars, 2 * sm90::kRowsBytes<T, D, BLK>);
    load_rows_by_tma<D, BLK, BLK>(s_k, 0, is_prefix ? &maps.pk : &maps.k, kb * BLK, b, h, bars);
    load_rows_by_tma<D, BLK, BLK>(s_v, 0, is_prefix ? &maps.pv : &maps.v, kb * BLK, b, h, bars);
    for (int t = 0; t < kFirstInLoop && t < n_tiles; ++t) issue(t);
  }
  // Every thread block waits, including one with nothing to do: the grid's completion then implies
  // dQ's, which whatever follows in the stream relies on.
  wait_for_prerequisite_grid();
  if (n_tiles > 0) {
    if (threadIdx.x < kBq) {
      float lse, delta;
      fetch_rows(0, lse, delta);
      stage_rows(0, lse, delta);
    }
  }

  // This thread's accumulator rows (keys) and first column (query) within each 8-column group.
  const int j_lo = kb * BLK + group * 64 + warp * 16 + lane / 4, j_hi = j_lo + 8;
  const int c = (lane % 4) * 2;
  const T* k_rows = s_k + group * 64 * 64;  // this warpgroup's 64 rows of the first panel
  const T* v_rows = s_v + group * 64 * 64;
  float dk[D / 2], dv[D / 2];
  float s[kBq / 2], dp[kBq / 2];
  uint32_t pf[kBq / 16][4], dsf[kBq / 16][4];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
#pragma unroll
  for (int i = 0; i < kBq / 2; ++i) s[i] = dp[i] = 0.f;  // only so the first products read defined values
#pragma unroll
  for (int i = 0; i < kBq / 16; ++i) {
    pf[i][0] = pf[i][1] = pf[i][2] = pf[i][3] = 0u;
    dsf[i][0] = dsf[i][1] = dsf[i][2] = dsf[i][3] = 0u;
  }

  // Tile t's dV and dK products are left running into iteration t + 1, behind its barrier and its
  // S^T and dP^T; the first wait there retires them. Every warpgroup has thus finished tile t - 2
  // before the barrier of iteration t, behind which tile t + 1 loads into tile t - 2's buffers.
  for (int t = 0; t < n_tiles; ++t) {
    if (t == 0) tma::wait(bars, 0);
    tma::wait(bars + 1 + t % kStages, (t / kStages) & 1);
    __syncthreads();  // also publishes the tile's lse and delta rows
    if (threadIdx.x == 0 && t + 1 >= kFirstInLoop && t + 1 < n_tiles) issue(t + 1);
    const bool carry = t + 1 < n_tiles && threadIdx.x < kBq;
    float next_lse = 0.f, next_delta = 0.f;
    if (carry) fetch_rows(t + 1, next_lse, next_delta);
    const int buf = t % kStages;
    const T* tq = s_q + buf * C::kTileElements;
    const T* tdo = s_do + buf * C::kTileElements;
    const float* tl = s_lse + buf * kBq;
    const float* td = s_delta + buf * kBq;
    const int q0 = tile_q0(t);
    const bool diagonal = !is_prefix && s_list[t / kPerBlock] == kb;

    wgmma::fence_registers(s);
    wgmma::fence_registers(dp);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
      // K-major: a k-step is 32 bytes along the 128-byte rows of one panel; 8-row atoms 1 KiB apart.
      const uint64_t da = wgmma::descriptor(k_rows + (kk / 64) * BLK * 64 + kk % 64, 16, 1024);
      const uint64_t db = wgmma::descriptor(tq + (kk / 64) * kBq * 64 + kk % 64, 16, 1024);
      wgmma::WgmmaSS<T, kBq>::run(s, da, db, kk > 0);
    }
    wgmma::commit();
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
      const uint64_t da = wgmma::descriptor(v_rows + (kk / 64) * BLK * 64 + kk % 64, 16, 1024);
      const uint64_t db = wgmma::descriptor(tdo + (kk / 64) * kBq * 64 + kk % 64, 16, 1024);
      wgmma::WgmmaSS<T, kBq>::run(dp, da, db, kk > 0);
    }
    wgmma::commit();

    wgmma::wait_one();  // S^T and tile t - 1's products are done; dP^T may still run
    wgmma::fence_registers(s);
    wgmma::fence_registers(dk);
    wgmma::fence_registers(dv);
    wgmma::fence_registers(pf);
    wgmma::fence_registers(dsf);
#pragma unroll
    for (int n = 0; n < kBq / 8; ++n) {
      const int col = 8 * n + c, i = q0 + col;
      const float l0 = tl[col], l1 = tl[col + 1];
      s[4 * n] = !diagonal || j_lo <= i ? wgmma::exp2_ftz(s[4 * n] * p.scale_log2 - l0) : 0.f;
      s[4 * n + 1] = !diagonal || j_lo <= i + 1 ? wgmma::exp2_ftz(s[4 * n + 1] * p.scale_log2 - l1) : 0.f;
      s[4 * n + 2] = !diagonal || j_hi <= i ? wgmma::exp2_ftz(s[4 * n + 2] * p.scale_log2 - l0) : 0.f;
      s[4 * n + 3] = !diagonal || j_hi <= i + 1 ? wgmma::exp2_ftz(s[4 * n + 3] * p.scale_log2 - l1) : 0.f;
    }
    wgmma::to_fragments<T, kBq>(pf, s);
    wgmma::fence_registers(dv);
    wgmma::fence_registers(pf);
    wgmma::fence();
#pragma unroll
    for (int ks = 0; ks < kBq / 16; ++ks) {
      // MN-major: a k-step is 16 query rows of 128 bytes; head-dim panels kBq rows apart.
      const uint64_t db = wgmma::descriptor(tdo + ks * 16 * 64, kBq * 64 * sizeof(T), 1024);
      wgmma::WgmmaRS<T, D>::run(dv, pf[ks], db);
    }
    wgmma::commit();

    wgmma::wait_one();  // dP^T is done; dV's product may still run
    wgmma::fence_registers(dp);
#pragma unroll
    for (int n = 0; n < kBq / 8; ++n) {
      const int col = 8 * n + c;
      const float d0 = td[col], d1 = td[col + 1];
      dp[4 * n] = s[4 * n] * (dp[4 * n] - d0);
      dp[4 * n + 1] = s[4 * n + 1] * (dp[4 * n + 1] - d1);
      dp[4 * n + 2] = s[4 * n + 2] * (dp[4 * n + 2] - d0);
      dp[4 * n + 3] = s[4 * n + 3] * (dp[4 * n + 3] - d1);
    }
    wgmma::to_fragments<T, kBq>(dsf, dp);
    wgmma::fence_registers(dk);
    wgmma::fence_registers(dsf);
    wgmma::fence();
#pragma unroll
    for (int ks = 0; ks < kBq / 16; ++ks) {
      const uint64_t db = wgmma::descriptor(tq + ks * 16 * 64, kBq * 64 * sizeof(T), 1024);
      wgmma::WgmmaRS<T, D>::run(dk, dsf[ks], db);
    }
    wgmma::commit();
    if constexpr (kStages == 2) {
      // Done before the next barrier, behind which tile t + 2 overwrites this tile's buffers.
      wgmma::wait_all();
      wgmma::fence_registers(dk);
      wgmma::fence_registers(dv);
      wgmma::fence_registers(pf);
      wgmma::fence_registers(dsf);
    }
    // The rows of tile t + 1's buffer were last read in iteration t + 1 - kStages.
    if (carry) stage_rows(t + 1, next_lse, next_delta);
  }
  wgmma::wait_all();
  wgmma::fence_registers(dk);
  wgmma::fence_registers(dv);
  wgmma::fence_registers(pf);
  wgmma::fence_registers(dsf);

  const Output out_k = is_prefix ? p.dpk : p.dk;
  const Output out_v = is_prefix ? p.dpv : p.dv;
  const int warp_row = group * 64 + warp * 16;
  store_warp_rows<T, D, BLK>(dk, p.scale, p.scale, s_k, warp_row, out_k.plane<T>(b, h), out_k.ss, kb * BLK + warp_row,
                             key_limit);
  store_warp_rows<T, D, BLK>(dv, 1.f, 1.f, s_v, warp_row, out_v.plane<T>(b, h), out_v.ss, kb * BLK + warp_row,
                             key_limit);
}

template <typename T, int D, int BLK>
__global__ void __launch_bounds__(DqConfig<D, BLK>::kThreads, DqConfig<D, BLK>::kMinBlocks)
    dq_kernel(const BackwardParams p, const __grid_constant__ BackwardMaps maps) {
  using C = DqConfig<D, BLK>;
  constexpr int kKeys = C::kKeys, kPerBlock = C::kPerBlock, kStages = C::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  T* s_do = s_q + C::kQElements;
  T* s_k = s_do + C::kQElements;              // kStages key tiles
  T* s_v = s_k + kStages * C::kTileElements;  // kStages value tiles
  // TMA barriers: [0] dO, O and Q, [1 + i] stage i's key and value tiles.
  uint64_t* bars = reinterpret_cast<uint64_t*>(s_v + kStages * C::kTileElements);
  int* s_list = reinterpret_cast<int*>(bars + 1 + kStages);
  int* s_count = s_list + p.n_q;

  allow_dependent_launch();
  // The last query blocks see the most keys; starting them first evens out the tail.
  const GridItem item = grid_item(p.rank_group, p.heads);
  if (item.rank >= p.n_q) return;
  const int qb = p.n_q - 1 - item.rank, h = item.h, b = item.b;
  const int group = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int64_t layout_row = ((p.shared_layout ? 0 : b) * static_cast<int64_t>(p.heads) + h) * p.n_q + qb;
  if (threadIdx.x == 0) {
    for (int i = 0; i < 1 + kStages; ++i) tma::barrier_init(bars + i, 1);
    tma::fence_barrier_init();
  }
  // Its closing barrier also publishes the initialised barriers.
  const int n_list = compact_list(s_list, s_count, p.indices + layout_row * p.capacity, p.counts + layout_row,
                                  p.capacity, 0, qb);
  const int n_prefix = (p.prefix + kKeys - 1) / kKeys;
  const int n_tiles = n_prefix + n_list * kPerBlock;

  // Thread 0 starts every copy; tile t's keys and values land on stage t % kStages's barrier, whose
  // phase t / kStages % 2 the others wait for.
  auto issue = [&](int t) {
    const int buf = t % kStages;
    uint64_t* bar = bars + 1 + buf;
    const bool prefix = t < n_prefix;
    const int w = t - n_prefix;
    const int key0 = prefix ? t * kKeys : s_list[w / kPerBlock] * BLK + (w % kPerBlock) * kKeys;
    tma::arrive_expecting(bar, 2 * sm90::kRowsBytes<T, D, kKeys>);
    load_rows_by_tma<D, kKeys, kKeys>(s_k + buf * C::kTileElements, 0, prefix ? &maps.pk : &maps.k, key0, b, h, bar);
    load_rows_by_tma<D, kKeys, kKeys>(s_v + buf * C::kTileElements, 0, prefix ? &maps.pv : &maps.v, key0, b, h, bar);
  };

  // dO and O are loaded even for a block with no keys to visit: its rows' delta is written all the
  // same. Each warpgroup's 64 rows of O go to the last stage's key or value tile, which no tile
  // takes before the loop's first barrier.
  auto o_rows = [&](int g) { return (g == 0 ? s_k : s_v) + (kStages - 1) * C::kTileElements; };
  // With three stages tile 1 starts here too, into the one stage O leaves free: a block of one or
  // two tiles (low densities) then waits for memory once.
  constexpr int kFirstInLoop = kStages == 3 ? 2 : 1;
  if (threadIdx.x == 0) {
    tma::arrive_expecting(bars, (n_tiles > 0 ? 3 : 2) * sm90::kRowsBytes<T, D, BLK>);
    load_rows_by_tma<D, BLK, BLK>(s_do, 0, &maps.dout, qb * BLK, b, h, bars);
#pragma unroll
    for (int g = 0; g < C::kGroups; ++g) load_rows_by_tma<D, 64, 64>(o_rows(g), 0, &maps.out, qb * BLK + 64 * g, b, h, bars);
    if (n_tiles > 0) {
      load_rows_by_tma<D, BLK, BLK>(s_q, 0, &maps.q, qb * BLK, b, h, bars);
      for (int t = 0; t < kFirstInLoop && t < n_tiles; ++t) issue(t);
    }
  }

  // This thread's accumulator rows (queries) and first column (key) within each 8-column group.
  const int warp_row = group * 64 + warp * 16;
  const int i_lo = qb * BLK + warp_row + lane / 4, i_hi = i_lo + 8;
  const int c = (lane % 4) * 2;
  const int64_t bh = (static_cast<int64_t>(b) * p.heads + h) * p.seq;
  const float lse_lo = backward_lse(p.lse + bh, i_lo, p.seq);
  const float lse_hi = backward_lse(p.lse + bh, i_hi, p.seq);
  // dO and O must have landed before delta, which the first dS needs anyway.
  tma::wait(bars, 0);
  float delta_lo, delta_hi;
  row_deltas<T, D, BLK, 64>(s_do, warp_row + lane / 4, o_rows(group), warp * 16 + lane / 4, delta_lo, delta_hi);
  if (lane % 4 == 0) {
    if (i_lo < p.seq) p.delta[bh + i_lo] = delta_lo;
    if (i_hi < p.seq) p.delta[bh + i_hi] = delta_hi;
  }
  const T* q_rows = s_q + group * 64 * 64;  // this warpgroup's 64 rows of the first panel
  const T* do_rows = s_do + group * 64 * 64;
  float dq[D / 2];
  float s[kKeys / 2], dp[kKeys / 2];
  uint32_t dsf[kKeys / 16][4];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
#pragma unroll
  for (int i = 0; i < kKeys / 2; ++i) s[i] = dp[i] = 0.f;  // only so the first products read defined values
#pragma unroll
  for (int i = 0; i < kKeys / 16; ++i) dsf[i][0] = dsf[i][1] = dsf[i][2] = dsf[i][3] = 0u;

  for (int t = 0; t < n_tiles; ++t) {
    tma::wait(bars + 1 + t % kStages, (t / kStages) & 1);
    __syncthreads();
    if (threadIdx.x == 0 && t + 1 >= kFirstInLoop && t + 1 < n_tiles) {
      // The last stage held O, which the threads read as plain loads before this barrier; TMA
      // writes through the async proxy.
      if ((t + 1) % kStages == kStages - 1) wgmma::fence_proxy();
      issue(t + 1);
    }
    const T* tk = s_k + (t % kStages) * C::kTileElements;
    const T* tv = s_v + (t % kStages) * C::kTileElements;

    wgmma::fence_registers(s);
    wgmma::fence_registers(dp);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
      const uint64_t da = wgmma::descriptor(q_rows + (kk / 64) * BLK * 64 + kk % 64, 16, 1024);
      const uint64_t db = wgmma::descriptor(tk + (kk / 64) * kKeys * 64 + kk % 64, 16, 1024);
      wgmma::WgmmaSS<T, kKeys>::run(s, da, db, kk > 0);
    }
    wgmma::commit();
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
      const uint64_t da = wgmma::descriptor(do_rows + (kk / 64) * BLK * 64 + kk % 64, 16, 1024);
      const uint64_t db = wgmma::descriptor(tv + (kk / 64) * kKeys * 64 + kk % 64, 16, 1024);
      wgmma::WgmmaSS<T, kKeys>::run(dp, da, db, kk > 0);
    }
    wgmma::commit();

    // The tile's first key and the last key each of this thread's rows may see: prefix keys past
    // the prefix length are invisible, and causality applies inside the diagonal block.
    int key0, last_lo, last_hi;
    if (t < n_prefix) {
      key0 = t * kKeys;
      last_lo = last_hi = p.prefix - 1;
    } else {
      const int w = t - n_prefix, kb = s_list[w / kPerBlock];
      key0 = kb * BLK + (w % kPerBlock) * kKeys;
      last_lo = kb == qb ? i_lo : INT_MAX;
      last_hi = kb == qb ? i_hi : INT_MAX;
    }

    wgmma::wait_one();  // S and tile t - 1's product are done; dP may still run
    wgmma::fence_registers(s);
    wgmma::fence_registers(dq);
    wgmma::fence_registers(dsf);
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
      const int j = key0 + 8 * n + c;
      s[4 * n] = j <= last_lo ? wgmma::exp2_ftz(s[4 * n] * p.scale_log2 - lse_lo) : 0.f;
      s[4 * n + 1] = j + 1 <= last_lo ? wgmma::exp2_ftz(s[4 * n + 1] * p.scale_log2 - lse_lo) : 0.f;
      s[4 * n + 2] = j <= last_hi ? wgmma::exp2_ftz(s[4 * n + 2] * p.scale_log2 - lse_hi) : 0.f;
      s[4 * n + 3] = j + 1 <= last_hi ? wgmma::exp2_ftz(s[4 * n + 3] * p.scale_log2 - lse_hi) : 0.f;
    }
    wgmma::wait_all();
    wgmma::fence_registers(dp);
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
      dp[4 * n] = s[4 * n] * (dp[4 * n] - delta_lo);
      dp[4 * n + 1] = s[4 * n + 1] * (dp[4 * n + 1] - delta_lo);
      dp[4 * n + 2] = s[4 * n + 2] * (dp[4 * n + 2] - delta_hi);
      dp[4 * n + 3] = s[4 * n + 3] * (dp[4 * n + 3] - delta_hi);
    }
    wgmma::to_fragments<T, kKeys>(dsf, dp);
    wgmma::fence_registers(dq);
    wgmma::fence_registers(dsf);
    wgmma::fence();
#pragma unroll
    for (int ks = 0; ks < kKeys / 16; ++ks) {
      // MN-major: a k-step is 16 key rows of 128 bytes; head-dim panels kKeys rows apart.
      const uint64_t db = wgmma::descriptor(tk + ks * 16 * 64, kKeys * 64 * sizeof(T), 1024);
      wgmma::WgmmaRS<T, D>::run(dq, dsf[ks], db);
    }
    wgmma::commit();
    if constexpr (kStages == 2) {
      // Done before the next barrier, behind which tile t + 2 overwrites this tile's buffers.
      wgmma::wait_all();
      wgmma::fence_registers(dq);
      wgmma::fence_registers(dsf);
    }
  }
  wgmma::wait_all();
  wgmma::fence_registers(dq);
  wgmma::fence_registers(dsf);

  store_warp_rows<T, D, BLK>(dq, p.scale, p.scale, s_q, warp_row, p.dq.plane<T>(b, h), p.dq.ss, qb * BLK + warp_row, p.seq);
}

}  // namespace sm90

template <typename T, int D, int BLK>
void launch_backward_sm90(const AttentionBackwardArgs& a) {
  BackwardParams p = backward_params(a);
  cudaStream_t stream = stream_of(a.q.stream);
  // Q and dO in boxes of a pass's query tile; O for dQ only.
  auto maps = [&](int query_rows, bool with_out) {
    const bool prefix = p.prefix > 0;
    return sm90::BackwardMaps{operand_map<T>(a.q, "q", query_rows),
                              operand_map<T>(a.dout, "dout", query_rows),
                              with_out ? operand_map<T>(a.out, "out") : CUtensorMap{},
                              operand_map<T>(a.k, "k"),
                              operand_map<T>(a.v, "v"),
                              prefix ? operand_map<T>(a.prefix_k, "prefix_k") : CUtensorMap{},
                              prefix ? operand_map<T>(a.prefix_v, "prefix_v") : CUtensorMap{}};
  };

  // dQ first: it computes delta for the dK/dV pass, which reads it for every query tile it visits.
  {
    using C = sm90::DqConfig<D, BLK>;
    const size_t smem = C::template smem_bytes<T>(p.n_q);
    auto kernel = sm90::dq_kernel<T, D, BLK>;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "attention dQ (wgmma) shared memory");
    const dim3 grid = rank_grid(p, p.n_q, static_cast<int>(a.q.size(0)));
    kernel<<<grid, C::kThreads, smem, stream>>>(p, maps(64, true));
    check_cuda(cudaGetLastError(), "attention dQ (wgmma) kernel launch");
  }
  {
    using C = sm90::DkvConfig<D, BLK>;
    const size_t smem = C::template smem_bytes<T>(p.n_q);
    auto kernel = sm90::dkv_kernel<T, D, BLK>;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "attention dK/dV (wgmma) shared memory");
    cudaLaunchConfig_t config{};
    config.gridDim = rank_grid(p, key_block_ranks<BLK>(p), static_cast<int>(a.q.size(0)));
    config.blockDim = dim3(C::kThreads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    config.attrs = &attribute;
    config.numAttrs = kernel_variable_is("LONG_EXPOSURE_ATTENTION_PDL", "0") ? 0 : 1;
    check_cuda(cudaLaunchKernelEx(&config, kernel, p, maps(C::kBq, false)), "attention dK/dV (wgmma) kernel launch");
  }
}

}  // namespace attention_cuda
}  // namespace long_exposure
