// The block-sparse causal attention forward on Hopper's wgmma (sm_90a only; contract:
// attention.h, the same outputs as forward_kernel in block_sparse_attention.cuh, whose backward
// consumes the logsumexp written here).
//
// Why a second forward: the mma.sync kernel holds 16 query rows per warp and reaches about half of
// cuDNN's rate at density 1 (bench/RESULTS.md); wgmma lets a warpgroup multiply 64 rows at once
// with operands read straight from shared memory, which the older instruction cannot.
//
// Shape of the work. One thread block per (query block, head, batch) as before; one warpgroup
// (128 threads) per 64 query rows, so a 128-row layout block has two, which share every key and
// value tile. Keys arrive in 64-key segments: the prefix's first, then BLK / 64 per listed key
// block. A tile is kSegments segments (128 keys for 128-row blocks, 64 for 64-row ones: Config),
// each segment one TMA box per 64-column panel (a key block's rows are contiguous in its plane), so
// segments from different places (the prefix's last and a block's first half) still make one
// 128-wide product; a segment past the end is zero-filled and masked out entirely. TMA rather
// than cp.async: one thread starts a tile, and the 128 threads' address work per 16-byte piece
// leaves the tile loop (613 SASS instructions a tile down to 473 at head dim 64; forward 17%
// faster at OPT-1.3B, bench/RESULTS.md session 26).
//
// Per tile t, every warpgroup:
//   issue S_t = Q K_t^T        wgmma, both operands in shared memory (K-major), fp32 in registers;
//   rescale O for S_{t-1}'s maxima while S_t runs;
//   issue O += P_{t-1} V_{t-1} wgmma with A from registers, right behind S_t;
//   wait for S_t only, then mask, online softmax and exponentiate S_t while the tensor cores are
//   still on P_{t-1} V_{t-1};
//   (next iteration) wait for that, round S_t into P_t's A fragments.
// P never touches shared memory: the accumulator layout of S is the register-A layout of the
// second product (wgmma_attention.cuh). One more pass after the last tile adds P_last V_last.
// The two warpgroups of a 128-row block also interleave on the tensor cores by themselves.
//
// Shared memory: Q (BLK x D), two key tiles and two value tiles, all in 128-byte-swizzled 64-column
// panels (wgmma::Panels) but for head dim 80's last 16 columns, which take a narrow panel
// (tile_offset, Config::kNarrow); each tile has its TMA barrier. At the top of iteration t every thread waits
// for K_t's and V_{t-1}'s barriers (their copies started one iteration earlier); then one block-wide
// barrier certifies that every warpgroup has finished S_{t-1} and P_{t-2} V_{t-2}, whose buffers
// the copies of K_{t+1} and V_t then reuse.
//
// Softmax in base 2 on scores times scale * log2(e), as in the mma.sync kernel; the saved
// logsumexp is (m + log2 l) * ln 2, the natural log of the sum of exp(scale * q.k).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "block_sparse_attention.cuh"
#include "tma.cuh"
#include "wgmma_attention.cuh"

namespace long_exposure {
namespace attention_cuda {
namespace sm90 {

// Columns a tile of head dim D holds: whole 64-column panels, as the swizzle works on 128-byte
// rows. Head dim 80 (OPT-2.7B) thus takes the room of 128; its products read only the 16 columns
// of the second panel that the loads wrote, the K-major ones in five 16-column k-steps and the
// MN-major ones (O, dK, dV, dQ) as one 80-wide N.
template <int D>
constexpr int panel_width() {
  static_assert(D == 64 || D == 80 || D == 128, "the wgmma kernels take head dims 64, 80 and 128");
  return (D + 63) / 64 * 64;
}

// Where element (row, col) of a shared tile of R rows lies: whole 64-column panels under the
// 128-byte swizzle (wgmma::Panels), or, where NARROW, the first panel and then columns 64 .. 79 of
// head dim 80 in a narrow panel of 32-byte rows (wgmma::narrow_offset). The forward takes the
// narrow form; it holds head dim 80 in 80 columns where whole panels take 128.
template <int R, bool NARROW>
__device__ __forceinline__ int tile_offset(int row, int col) {
  if (NARROW && col >= 64) return R * 64 + wgmma::narrow_offset(row, col - 64);
  return wgmma::Panels<R>::offset(row, col);
}

template <int D, int BLK>
struct Config {
  static_assert(BLK == 64 || BLK == 128, "the wgmma forward takes blocks of 64 and 128");
  // Head dim 80 keeps its last 16 columns in a narrow panel (tile_offset): a tile then takes 80
  // columns of shared memory, not 128, and four 64-row blocks fit an SM where two did.
  static constexpr bool kNarrow = D == 80;
  static constexpr int kWidth = kNarrow ? 80 : panel_width<D>();
  static constexpr int kGroups = BLK / 64;  // warpgroups, 64 query rows each
  static constexpr int kThreads = 128 * kGroups;
  // A 64-row block takes 64-key tiles. At head dim 128, two thread blocks then fit an SM (80 KiB
  // of shared memory each); with 128-key tiles one would (144 KiB) and idle through its barriers.
  // At head dim 64, four fit (41 KiB, at most 128 registers a thread) where 128-key tiles fit
  // three, and a short list no longer ends on a half-empty tile: the kernel is 4% faster at
  // density 1 and 20% at 0.18 (OPT-1.3B shapes, bench/RESULTS.md session 24). Head dim 80, in 80
  // columns, fits four too (51 KiB).
  static constexpr int kSegments = BLK == 64 ? 1 : 2;
  static constexpr int kKeys = 64 * kSegments;
  static constexpr int kMinBlocks = BLK == 128 ? 1 : (D == 128 ? 2 : 4);
  static constexpr int kQElements = BLK * kWidth, kTileElements = kKeys * kWidth;
  static constexpr int kBarriers = 5;  // Q's, and one for each of the two key and two value tiles
  template <typename T>
  static size_t smem_bytes(int n_q) {
    // 1 KiB of slack puts the tiles on the 1024-byte boundary the swizzle pattern is taken from.
    return 1024 + static_cast<size_t>(kQElements + 4 * kTileElements) * sizeof(T) + kBarriers * sizeof(uint64_t) +
           (n_q + 4) * sizeof(int);
  }
};

// Writes this warp's 16 rows of a warpgroup's 64 x D accumulator to rows [row0, row0 + 16) of a
// plane, rows lane / 4 times factor_lo and rows lane / 4 + 8 times factor_hi, rows at or past
// `limit` left alone. They pass through the warp's own rows (from warp_row) of a panelled shared
// tile, which only its warpgroup's finished products read, so that global stores are 16 bytes wide
// and coalesced; the swizzle keeps both the fragment writes and the row reads free of bank
// conflicts. The forward's output and the backward's dQ, dK and dV leave this way.
template <typename T, int D, int TILE_ROWS, bool NARROW = false>
__device__ __forceinline__ void store_warp_rows(const float (&acc)[D / 2], float factor_lo, float factor_hi, T* tile,
                                                int warp_row, T* plane, int64_t stride, int row0, int limit) {
  const int lane = threadIdx.x % 32, c = (lane % 4) * 2, r_lo = warp_row + lane / 4;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    *reinterpret_cast<uint32_t*>(tile + tile_offset<TILE_ROWS, NARROW>(r_lo, 8 * i + c)) =
        ptx::Mma<T>::pack(acc[4 * i] * factor_lo, acc[4 * i + 1] * factor_lo);
    *reinterpret_cast<uint32_t*>(tile + tile_offset<TILE_ROWS, NARROW>(r_lo + 8, 8 * i + c)) =
        ptx::Mma<T>::pack(acc[4 * i + 2] * factor_hi, acc[4 * i + 3] * factor_hi);
  }
  __syncwarp();
  constexpr int kPieces = D / 8;
#pragma unroll
  for (int i = lane; i < 16 * kPieces; i += 32) {
    const int r = i / kPieces, col = (i % kPieces) * 8;
    if (row0 + r < limit)
      *reinterpret_cast<uint4*>(plane + static_cast<int64_t>(row0 + r) * stride + col) =
          *reinterpret_cast<const uint4*>(tile + tile_offset<TILE_ROWS, NARROW>(warp_row + r, col));
  }
}

// The forward's operands as TMA maps (tma::planes_map), passed as a __grid_constant__ kernel
// parameter: TMA reads a map where it lies, and the parameter space is where the launch puts it.
// Each operand has two: [0] in 64-column boxes, [1] (head dim 80 only) the narrow panel's
// 16-column boxes.
struct ForwardMaps {
  CUtensorMap q[2], k[2], v[2], pk[2], pv[2];
};

// Starts the TMA copy of rows [row0, row0 + ROWS) of plane (b, h) of `map`, whose boxes are
// BOX_ROWS x 64, into rows [dst_row, dst_row + ROWS) of a shared tile of TILE_ROWS rows laid out as
// tile_offset's, completing on `barrier`; one thread issues it. Where NARROW, map[1] brings
// columns 64 .. 79 in 16-column boxes. Rows outside the plane arrive as zeros.
template <int D, int TILE_ROWS, int ROWS, int BOX_ROWS = 64, bool NARROW = false, typename T>
__device__ __forceinline__ void load_rows_by_tma(T* tile, int dst_row, const CUtensorMap* map, int row0, int b, int h,
                                                 uint64_t* barrier) {
#pragma unroll
  for (int r = 0; r < ROWS; r += BOX_ROWS) {
#pragma unroll
    for (int c = 0; c < (NARROW ? 64 : D); c += 64)
      tma::load_box(tile + c * TILE_ROWS + (dst_row + r) * 64, map, c, row0 + r, h, b, barrier);
    if constexpr (NARROW) tma::load_box(tile + 64 * TILE_ROWS + (dst_row + r) * 16, map + 1, 64, row0 + r, h, b, barrier);
  }
}
// The bytes such a copy lands, zeros included: what its barrier expects.
template <typename T, int D, int ROWS, bool NARROW = false>
constexpr uint32_t kRowsBytes = ROWS * (NARROW ? 80 : panel_width<D>()) * sizeof(T);

// The keys a query block visits, as 64-key segments: the prefix's, then BLK / 64 segments of each
// listed key block in list order; segment numbers at or past n are empty.
template <typename T, int BLK>
struct Segments {
  static constexpr int kPerBlock = BLK / 64;
  const int* list;  // the query block's compacted key-block list, in shared memory
  int qb, prefix, seq, n_prefix, n;

  __device__ Segments(const ForwardParams& p, const int* s_list, int n_list, int query_block)
      : list(s_list), qb(query_block), prefix(p.prefix), seq(p.seq), n_prefix((p.prefix + 63) / 64),
        n(n_prefix + n_list * kPerBlock) {}

  // Starts the copy of segment u's keys (or values) into rows [64 slot, 64 slot + 64) of a tile of
  // TILE_ROWS rows (load_rows_by_tma: a box per panel), completing on `barrier`; one thread issues
  // it. A segment past the end reads the box below the last row, which TMA fills with zeros.
  template <int D, int TILE_ROWS, bool NARROW>
  __device__ __forceinline__ void load(T* tile, int slot, int u, const CUtensorMap* map, const CUtensorMap* prefix_map,
                                       int b, int h, uint64_t* barrier) const {
    int row0 = seq;
    if (u < n_prefix) {
      map = prefix_map;
      row0 = u * 64;
    } else if (u < n) {
      const int w = u - n_prefix;
      row0 = list[w / kPerBlock] * BLK + (w % kPerBlock) * 64;
    }
    load_rows_by_tma<D, TILE_ROWS, 64, 64, NARROW>(tile, 64 * slot, map, row0, b, h, barrier);
  }

  // Segment u's first key and the last key each of a thread's two query rows may see. Returns
  // false when both see all 64 keys, so the caller can skip the comparisons: a partial prefix
  // segment, the diagonal block (causality) and empty segments need them. Keys past the sequence
  // only exist in the last block, which only its own query block lists, on its diagonal.
  __device__ __forceinline__ bool bounds(int u, int i_lo, int i_hi, int& key0, int& last_lo, int& last_hi) const {
    if (u < n_prefix) {
      key0 = u * 64;
      last_lo = last_hi = prefix - 1;
      return key0 + 64 > prefix;
    }
    if (u < n) {
      const int w = u - n_prefix, kb = list[w / kPerBlock];
      key0 = kb * BLK + (w % kPerBlock) * 64;
      last_lo = last_hi = INT_MAX;
      if (kb != qb) return false;
      last_lo = i_lo;
      last_hi = i_hi;
      return true;
    }
    key0 = 0;
    last_lo = last_hi = -1;
    return true;
  }
};

template <typename T, int D, int BLK>
__global__ void __launch_bounds__(Config<D, BLK>::kThreads, Config<D, BLK>::kMinBlocks)
    forward_kernel(const ForwardParams p, const __grid_constant__ ForwardMaps maps) {
  using C = Config<D, BLK>;
  constexpr int kKeys = C::kKeys, kSegments = C::kSegments;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  T* s_k = s_q + C::kQElements;         // two key tiles
  T* s_v = s_k + 2 * C::kTileElements;  // two value tiles
  // Where each tile's TMA copies land: [0] Q, [1 + i] key tile i, [3 + i] value tile i.
  uint64_t* bars = reinterpret_cast<uint64_t*>(s_v + 2 * C::kTileElements);
  int* s_list = reinterpret_cast<int*>(bars + C::kBarriers);
  int* s_count = s_list + p.n_q;

  // The last query blocks see the most keys; starting them first evens out the tail.
  const GridItem item = grid_item(p.rank_group, p.heads);
  if (item.rank >= p.n_q) return;
  const int qb = p.n_q - 1 - item.rank, h = item.h, b = item.b;
  const int group = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int64_t layout_row = ((p.shared_layout ? 0 : b) * static_cast<int64_t>(p.heads) + h) * p.n_q + qb;
  if (threadIdx.x == 0) {
    for (int i = 0; i < C::kBarriers; ++i) tma::barrier_init(bars + i, 1);
    tma::fence_barrier_init();
  }
  // Its closing barrier also publishes the initialised barriers.
  const int n_list = compact_list(s_list, s_count, p.indices + layout_row * p.capacity, p.counts + layout_row,
                                  p.capacity, 0, qb);
  const Segments<T, BLK> segments(p, s_list, n_list, qb);
  const int n_tiles = (segments.n + kSegments - 1) / kSegments;
  constexpr bool kNarrow = C::kNarrow;
  constexpr uint32_t kTileBytes = kRowsBytes<T, D, kKeys, kNarrow>;
  // Thread 0 starts every copy: tile t's keys (or values) on barrier 1 + t % 2 (3 + t % 2), and
  // the others wait for that barrier's phase t / 2 % 2, as each buffer takes every second tile.
  auto issue = [&](int t, bool values) {
    T* tile = (values ? s_v : s_k) + (t & 1) * C::kTileElements;
    uint64_t* bar = bars + (values ? 3 : 1) + (t & 1);
    tma::arrive_expecting(bar, kTileBytes);
#pragma unroll
    for (int g = 0; g < kSegments; ++g)
      segments.template load<D, kKeys, kNarrow>(tile, g, t * kSegments + g, values ? maps.v : maps.k,
                                                values ? maps.pv : maps.pk, b, h, bar);
  };
  auto wait_for = [&](int t, bool values) { tma::wait(bars + (values ? 3 : 1) + (t & 1), (t >> 1) & 1); };

  // Every buffer is filled at once: Q, the first two key tiles and the first two value tiles. A
  // block with one or two tiles (low densities) then waits for memory once, not three times.
  if (n_tiles > 0 && threadIdx.x == 0) {
    tma::arrive_expecting(bars, kRowsBytes<T, D, BLK, kNarrow>);
    load_rows_by_tma<D, BLK, BLK, 64, kNarrow>(s_q, 0, maps.q, qb * BLK, b, h, bars);
    issue(0, false);
    issue(0, true);
    if (n_tiles > 1) {
      issue(1, false);
      issue(1, true);
    }
  }

  // This thread's accumulator rows (query positions) and first column within each 8-column group.
  const int i_lo = qb * BLK + group * 64 + warp * 16 + lane / 4, i_hi = i_lo + 8;
  const int c = (lane % 4) * 2;
  const T* q_rows = s_q + group * 64 * 64;  // this warpgroup's 64 rows of Q's first panel
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  float o[D / 2];
  float s[kKeys / 2];
  uint32_t pf[kKeys / 16][4];  // P_{t-1} as the A fragments of the second product
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
#pragma unroll
  for (int i = 0; i < kKeys / 2; ++i) s[i] = 0.f;  // only so the first product reads defined values

  // Waits for the tiles this iteration's products read (Q with the first; K_t; V_{t-1}), then
  // starts K_{t+1} and V_t into the buffers of K_{t-1} and V_{t-2}, which the barrier certifies
  // every warpgroup has finished with; the prologue took K_1, V_0 and V_1.
  auto next_tile = [&](int t) {
    if (t == 0) tma::wait(bars, 0);
    if (t < n_tiles) wait_for(t, false);
    if (t >= 1) wait_for(t - 1, true);
    __syncthreads();
    if (threadIdx.x == 0) {
      if (t >= 1 && t + 1 < n_tiles) issue(t + 1, false);
      if (t >= 2 && t < n_tiles) issue(t, true);
    }
  };
  auto issue_scores = [&](int t) {
    const T* k_tile = s_k + (t & 1) * C::kTileElements;
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
      // K-major: a k-step is 32 bytes along the 128-byte rows of one panel; 8-row atoms 1 KiB apart.
      // The narrow panel's rows are one k-step each; its 8-row atoms are 256 bytes apart.
      const bool narrow = kNarrow && kk >= 64;
      const uint64_t da = narrow ? wgmma::descriptor_32b(s_q + 64 * BLK + group * 64 * 16, 16, 256)
                                 : wgmma::descriptor(q_rows + (kk / 64) * BLK * 64 + kk % 64, 16, 1024);
      const uint64_t db = narrow ? wgmma::descriptor_32b(k_tile + 64 * kKeys, 16, 256)
                                 : wgmma::descriptor(k_tile + (kk / 64) * kKeys * 64 + kk % 64, 16, 1024);
      wgmma::WgmmaSS<T, kKeys>::run(s, da, db, kk > 0);
    }
    wgmma::commit();
  };
  auto issue_values = [&](int t) {
    const T* v_tile = s_v + (t & 1) * C::kTileElements;
#pragma unroll
    for (int ks = 0; ks < kKeys / 16; ++ks) {
      // MN-major: a k-step is 16 key rows of 128 bytes; head-dim panels kKeys rows apart.
      const uint64_t db = wgmma::descriptor(v_tile + ks * 16 * 64, kKeys * 64 * sizeof(T), 1024);
      if constexpr (kNarrow) {
        // Output columns 0 .. 63 from the first panel, 64 .. 79 (the accumulator's last 8
        // registers) from the narrow one, 16 key rows of 32 bytes a k-step.
        wgmma::WgmmaRS<T, 64>::run(*reinterpret_cast<float(*)[32]>(o), pf[ks], db);
        wgmma::WgmmaRS<T, 16>::run(*reinterpret_cast<float(*)[8]>(o + 32), pf[ks],
                                   wgmma::descriptor_32b(v_tile + 64 * kKeys + ks * 16 * 16, kKeys * 16 * sizeof(T), 256));
      } else {
        wgmma::WgmmaRS<T, D>::run(o, pf[ks], db);
      }
    }
    wgmma::commit();
  };
  // Masks and exponentiates S_t in place and updates the running maxima and sums; alpha gets the
  // factors that bring O from the old maxima to the new ones. The maxima are taken over the raw
  // scores (the scale is positive, so it commutes with max) and the scale is folded into the one
  // FFMA in front of each exponential: the softmax's FP32 work, not the tensor cores, is what a
  // 64-wide head keeps the SM issuing (bench/RESULTS.md).
  auto softmax = [&](int t, float& alpha_lo, float& alpha_hi) {
#pragma unroll
    for (int g = 0; g < kSegments; ++g) {
      int key0, last_lo, last_hi;
      if (segments.bounds(t * kSegments + g, i_lo, i_hi, key0, last_lo, last_hi)) {
#pragma unroll
        for (int i = 8 * g; i < 8 * g + 8; ++i) {
          const int j = key0 + (i - 8 * g) * 8 + c;
          if (j > last_lo) s[4 * i] = -INFINITY;
          if (j + 1 > last_lo) s[4 * i + 1] = -INFINITY;
          if (j > last_hi) s[4 * i + 2] = -INFINITY;
          if (j + 1 > last_hi) s[4 * i + 3] = -INFINITY;
        }
      }
    }
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int i = 0; i < kKeys / 8; ++i) {
      mx_lo = fmaxf(mx_lo, fmaxf(s[4 * i], s[4 * i + 1]));
      mx_hi = fmaxf(mx_hi, fmaxf(s[4 * i + 2], s[4 * i + 3]));
    }
    // A row's columns are spread over the four threads of a quad.
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
    }
    const float new_lo = fmaxf(m_lo, mx_lo * p.scale_log2), new_hi = fmaxf(m_hi, mx_hi * p.scale_log2);
    // A row with no visible key so far keeps m = -inf; subtracting 0 then keeps exp2 at 0, not NaN.
    const float base_lo = new_lo == -INFINITY ? 0.f : new_lo;
    const float base_hi = new_hi == -INFINITY ? 0.f : new_hi;
    alpha_lo = wgmma::exp2_ftz(m_lo - base_lo);
    alpha_hi = wgmma::exp2_ftz(m_hi - base_hi);
    m_lo = new_lo;
    m_hi = new_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int i = 0; i < kKeys / 8; ++i) {
      s[4 * i] = wgmma::exp2_ftz(fmaf(s[4 * i], p.scale_log2, -base_lo));
      s[4 * i + 1] = wgmma::exp2_ftz(fmaf(s[4 * i + 1], p.scale_log2, -base_lo));
      s[4 * i + 2] = wgmma::exp2_ftz(fmaf(s[4 * i + 2], p.scale_log2, -base_hi));
      s[4 * i + 3] = wgmma::exp2_ftz(fmaf(s[4 * i + 3], p.scale_log2, -base_hi));
      sum_lo += s[4 * i] + s[4 * i + 1];
      sum_hi += s[4 * i + 2] + s[4 * i + 3];
    }
    l_lo = l_lo * alpha_lo + sum_lo;
    l_hi = l_hi * alpha_hi + sum_hi;
  };

  auto rescale = [&](float alpha_lo, float alpha_hi) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[4 * i] *= alpha_lo;
      o[4 * i + 1] *= alpha_lo;
      o[4 * i + 2] *= alpha_hi;
      o[4 * i + 3] *= alpha_hi;
    }
  };

  // The first and the last tile are peeled off the loop, so that no wgmma sits on a path ptxas
  // cannot prove uniform (it would serialize them all). ptxas also schedules a wgmma wait at the
  // top of its basic block, whatever independent work precedes it there; so the wait for
  // P_{t-1} V_{t-1} opens the next iteration, where the loop's back edge keeps it behind the
  // exponentials of S_t, and O is rescaled for S_t's maxima while S_{t+1} runs.
  if (n_tiles > 0) {
    float alpha_lo, alpha_hi;
    next_tile(0);
    wgmma::fence_registers(s);
    wgmma::fence();
    issue_scores(0);
    wgmma::wait_all();
    wgmma::fence_registers(s);
    softmax(0, alpha_lo, alpha_hi);

    for (int t = 1; t < n_tiles; ++t) {
      // O and P_{t-2}'s registers are the tensor cores' until this wait.
      wgmma::wait_all();
      wgmma::fence_registers(o);
      wgmma::fence_registers(pf);
      wgmma::to_fragments<T, kKeys>(pf, s);  // P_{t-1}
      next_tile(t);
      wgmma::fence_registers(s);
      wgmma::fence();
      issue_scores(t);
      rescale(alpha_lo, alpha_hi);
      wgmma::fence_registers(o);
      wgmma::fence_registers(pf);
      wgmma::fence();  // O was just written: the product must read the new values
      issue_values(t - 1);
      wgmma::wait_one();  // S_t is done; P_{t-1} V_{t-1} may still run
      wgmma::fence_registers(s);
      softmax(t, alpha_lo, alpha_hi);
    }

    wgmma::wait_all();
    wgmma::fence_registers(o);
    wgmma::fence_registers(pf);
    wgmma::to_fragments<T, kKeys>(pf, s);  // P_{n-1}
    next_tile(n_tiles);
    rescale(alpha_lo, alpha_hi);
    wgmma::fence_registers(o);
    wgmma::fence_registers(pf);
    wgmma::fence();
    issue_values(n_tiles - 1);
    wgmma::wait_all();
    wgmma::fence_registers(o);
  }

#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
  }
  float* lse = p.lse + (static_cast<int64_t>(b) * p.heads + h) * p.seq;
  if (lane % 4 == 0) {
    if (i_lo < p.seq) lse[i_lo] = l_lo > 0.f ? (m_lo + log2f(l_lo)) * kLn2 : -INFINITY;
    if (i_hi < p.seq) lse[i_hi] = l_hi > 0.f ? (m_hi + log2f(l_hi)) * kLn2 : -INFINITY;
  }

  const float f_lo = l_lo > 0.f ? 1.f / l_lo : 0.f, f_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
  // The output leaves through this warp's own rows of the Q tile, which only this warpgroup's
  // finished products read.
  const int warp_row = group * 64 + warp * 16;
  store_warp_rows<T, D, BLK, kNarrow>(o, f_lo, f_hi, s_q, warp_row, p.out.plane<T>(b, h), p.out.ss, qb * BLK + warp_row, p.seq);
}

}  // namespace sm90

// The TMA map of a [batch, heads, rows, D] operand, in boxes of box_rows x 64 (blank where the
// operand is absent). Encoding a map is host work only (about a microsecond), so each launch takes
// fresh ones.
template <typename T>
CUtensorMap operand_map(const TensorView& t, const char* name, int box_rows = 64, int box_cols = 64) {
  if (!t.defined()) return CUtensorMap{};
  return tma::planes_map<T>(t.ptr<const T>(), t.size(0), t.size(1), t.size(2), t.size(3), t.stride(0), t.stride(1),
                            t.stride(2), name, box_rows, box_cols);
}

template <typename T, int D, int BLK>
void launch_forward_sm90(const AttentionForwardArgs& a) {
  using C = sm90::Config<D, BLK>;
  ForwardParams p = forward_params(a);

  const size_t smem = C::template smem_bytes<T>(p.n_q);
  auto kernel = sm90::forward_kernel<T, D, BLK>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "attention forward (wgmma) shared memory");
  // The narrow panel's maps only where the forward keeps one (head dim 80).
  auto pair = [](const TensorView& t, const char* name, bool present, CUtensorMap(&out)[2]) {
    if (!present) return;
    out[0] = operand_map<T>(t, name);
    if (C::kNarrow) out[1] = operand_map<T>(t, name, 64, 16);
  };
  sm90::ForwardMaps maps{};
  pair(a.q, "q", true, maps.q);
  pair(a.k, "k", true, maps.k);
  pair(a.v, "v", true, maps.v);
  pair(a.prefix_k, "prefix_k", p.prefix > 0, maps.pk);
  pair(a.prefix_v, "prefix_v", p.prefix > 0, maps.pv);
  const dim3 grid = rank_grid(p, p.n_q, static_cast<int>(a.q.size(0)));
  kernel<<<grid, C::kThreads, smem, stream_of(a.q.stream)>>>(p, maps);
  check_cuda(cudaGetLastError(), "attention forward (wgmma) kernel launch");
}

}  // namespace attention_cuda
}  // namespace long_exposure
